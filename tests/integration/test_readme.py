"""The README names exactly what the code has: every command-line flag, environment
variable, admin endpoint, metric and config key, in both directions.

The code side is introspected (the argparse parsers, the settings model, the admin app's
router, a running proxy's /metrics, the route config models), so a flag, key, endpoint or
metric added anywhere is checked without a change here: it fails until the README names it.
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from pydantic import BaseModel

from tcpproxy.cli import build_parser
from tcpproxy.config import RouteConfig
from tcpproxy.settings import Settings
from tests.harness import Backends, RunningProxy, config_yaml, free_port, listener_yaml
from tests.integration import admin_http
from tests.integration.admin_http import Admin, StartAdmin

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

admins = pytest.fixture(admin_http.admins)
Start = Callable[[str], RunningProxy]


def assert_none(found: Iterable[Any], what: str) -> None:
    """Fail naming every item found, not the first few."""
    items = sorted(found)
    assert not items, f"{what}: {items}"


# -- the README, taken apart ---------------------------------------------------------------

_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")
_SEPARATORS = {"|", "||", "&&", ";", "&", "--"}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str


@dataclass(frozen=True)
class Readme:
    blocks: tuple[Block, ...]
    # The prose split in paragraphs (a table row is one), each as its code spans, and
    # sections (a heading starts one), each as its paragraphs.
    sections: tuple[tuple[tuple[str, ...], ...], ...]
    text: str

    @property
    def paragraphs(self) -> Iterator[tuple[str, ...]]:
        for section in self.sections:
            yield from section


@functools.cache
def readme() -> Readme:
    text = README.read_text()
    blocks = tuple(
        Block(m.group(2), "\n".join(line[len(m.group(1)) :] for line in m.group(3).splitlines()))
        for m in _FENCE.finditer(text)
    )
    prose = _FENCE.sub("\n\n", text)
    sections: list[list[tuple[str, ...]]] = [[]]
    for chunk in re.split(r"\n\s*\n", prose):
        if chunk.startswith("#"):
            sections.append([])
        lines = chunk.splitlines()
        rows = [line for line in lines if line.lstrip().startswith("|")]
        groups = [[row] for row in rows] + [[line for line in lines if line not in rows]]
        sections[-1] += [tuple(_SPAN.findall("\n".join(group))) for group in groups]
    return Readme(blocks, tuple(tuple(p for p in s if p) for s in sections), text)


def _command_lines(block: Block) -> Iterator[str]:
    """Command lines of a shell, console or usage block, continuations joined, comments cut."""
    if block.lang not in ("", "sh", "console"):
        return
    command = ""
    for raw in block.text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if command and (command.endswith("\\") or (block.lang == "" and raw[:1] == " ")):
            command = command.removesuffix("\\") + " " + line.strip()
            continue
        if command:
            yield command
        command = line
    if command:
        yield command


def _tokens(command: str) -> list[str]:
    return [token.strip("[](){},\"'") for token in command.split()]


@dataclass(frozen=True)
class Use:
    """A command in the README: the program (`tcpproxy SUBCOMMAND`, `tcpproxy` for
    top-level flags, or a script such as `benchmarks/soak.py`) and the flags given to it."""

    program: str
    flags: tuple[str, ...]


def uses(command: str, subcommands: set[str]) -> Iterator[Use]:
    tokens = _tokens(command)
    for i, token in enumerate(tokens):
        program = None
        rest = tokens[i + 1 :]
        if token == "tcpproxy" and rest and (rest[0] in subcommands or rest[0] == "--version"):
            program = "tcpproxy" if rest[0].startswith("--") else f"tcpproxy {rest.pop(0)}"
        elif token in ("python", "python3") and rest[:2] == ["-m", "tcpproxy"]:
            rest = rest[2:]
            if rest and rest[0] in subcommands:
                program = f"tcpproxy {rest.pop(0)}"
        elif token in ("python", "python3") and rest and rest[0].endswith(".py"):
            program = rest.pop(0)
        if program is None:
            continue
        flags = []
        for arg in rest:
            if arg in _SEPARATORS or arg in ("tcpproxy", "python", "python3"):
                break
            # `ID|--backend B`: each alternative may be a flag.
            flags += [
                f for part in arg.split("|") for f in _FLAG.findall(part)[:1] if part.startswith(f)
            ]
        yield Use(program, tuple(flags))


@dataclass(frozen=True)
class Named:
    """A flag the README names and what it names it for (None: no command, in prose)."""

    flag: str
    program: str | None
    scripts: tuple[str, ...]  # scripts run in the same paragraph, for a flag in prose
    where: str


def named_flags(subcommands: set[str]) -> Iterator[Named]:
    doc = readme()
    for block in doc.blocks:
        for command in _command_lines(block):
            for use in uses(command, subcommands):
                for flag in use.flags:
                    yield Named(flag, use.program, (), command)
    for section in doc.sections:
        # A flag in prose that is not tcpproxy's may be a script's: one this paragraph runs,
        # else the one the section last ran.
        scripts: tuple[str, ...] = ()
        for spans in section:
            yield from _named_in_paragraph(spans, subcommands, scripts)
            scripts = _scripts_in(spans, subcommands) or scripts


def _scripts_in(spans: tuple[str, ...], subcommands: set[str]) -> tuple[str, ...]:
    return tuple(
        use.program
        for span in spans
        for use in uses(span, subcommands)
        if not use.program.startswith("tcpproxy")
    )


def _named_in_paragraph(
    spans: tuple[str, ...], subcommands: set[str], section_scripts: tuple[str, ...]
) -> Iterator[Named]:
    scripts = _scripts_in(spans, subcommands) or section_scripts
    for span in spans:
        found = list(uses(span, subcommands))
        for use in found:
            for flag in use.flags:
                yield Named(flag, use.program, (), span)
        if not found and span.startswith("--"):
            yield Named(_FLAG.findall(span)[0], None, scripts, span)


# -- the code, introspected ----------------------------------------------------------------


def parser_flags() -> dict[str, set[str]]:
    """Flags by program: "tcpproxy" (top level) and "tcpproxy SUBCOMMAND"."""

    def options(parser: argparse.ArgumentParser) -> set[str]:
        return {
            opt
            for action in parser._actions
            for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"
        }

    parser = build_parser()
    out = {"tcpproxy": options(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"tcpproxy {name}"] = options(sub)
    return out


@functools.cache
def script_flags(script: str) -> frozenset[str]:
    """A repository script's flags, from its own --help."""
    proc = subprocess.run(
        [sys.executable, str(REPO / script), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stdout}{proc.stderr}"
    return frozenset(_FLAG.findall(proc.stdout)) - {"--help"}


def env_vars() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def _models_in(annotation: Any) -> Iterator[tuple[type[BaseModel], bool]]:
    """The models a field holds, and whether in a list (tuple or list of them)."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, False
    elif origin in (tuple, list):
        for arg in typing.get_args(annotation):
            for model, _ in _models_in(arg):
                yield model, True
    elif origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)


def model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key of the route config, as a path: `listeners[].backends[].weight`."""
    paths = set()
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        paths.add(path)
        for sub, in_list in _models_in(field.annotation):
            paths |= model_paths(sub, path + ("[]." if in_list else "."))
    return paths


def yaml_paths(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for key, sub in value.items():
            yield prefix + str(key)
            yield from yaml_paths(sub, f"{prefix}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from yaml_paths(item, prefix.removesuffix(".") + "[].")


def readme_config_paths() -> tuple[set[str], set[str]]:
    """(paths from the README's whole route configs, keys of its fragments)."""
    rooted: set[str] = set()
    fragments: set[str] = set()
    for block in readme().blocks:
        if block.lang != "yaml":
            continue
        for doc in yaml.safe_load_all(block.text):
            if isinstance(doc, dict) and "apiVersion" in doc:
                continue  # a Kubernetes object (the mesh's resources shown beside ours)
            if isinstance(doc, dict) and "listeners" in doc:
                rooted |= set(yaml_paths(doc))
            else:
                fragments |= {path.rpartition(".")[2] for path in yaml_paths(doc)}
    return rooted, fragments


# -- flags -------------------------------------------------------------------------------


def subcommands_of(flags: dict[str, set[str]]) -> set[str]:
    return {program.split()[1] for program in flags if " " in program}


def readme_commands(subcommands: set[str]) -> set[str]:
    doc = readme()
    lines = [line for block in doc.blocks for line in _command_lines(block)]
    lines += [span for spans in doc.paragraphs for span in spans]
    return {use.program for line in lines for use in uses(line, subcommands)}


def test_every_command_and_flag_is_in_the_readme() -> None:
    flags = parser_flags()
    subcommands = subcommands_of(flags)
    assert_none(
        {p for p in flags if " " in p} - readme_commands(subcommands),
        "commands the README never shows",
    )
    named = {
        n.flag
        for n in named_flags(subcommands)
        if n.program is None or n.program.startswith("tcpproxy")
    }
    assert_none(
        {(program, flag) for program, some in flags.items() for flag in some - named},
        "flags the README never names",
    )


def test_every_flag_the_readme_names_exists() -> None:
    flags = parser_flags()
    every_tcpproxy_flag = set().union(*flags.values())
    problems = []
    for n in named_flags(subcommands_of(flags)):
        if n.program is not None and n.program.startswith("tcpproxy"):
            if n.flag not in flags[n.program]:
                problems.append(f"{n.program} has no {n.flag} (README: {n.where!r})")
        elif n.program is not None:
            if n.flag not in script_flags(n.program):
                problems.append(f"{n.program} has no {n.flag} (README: {n.where!r})")
        elif n.flag not in every_tcpproxy_flag and not any(
            n.flag in script_flags(script) for script in n.scripts
        ):
            problems.append(f"no command has {n.flag} (README: {n.where!r})")
    assert problems == [], "\n".join(problems)


def test_the_flag_check_sees_commands_usage_lines_and_prose() -> None:
    """Guard the guard: the README parser finds flags where the README puts them."""
    subcommands = {"run", "check", "rollout"}
    command = "tcpproxy run [--config PATH]\n    [--no-watch] # see --not-this"
    (joined,) = _command_lines(Block("", command))
    assert list(uses(joined, subcommands)) == [Use("tcpproxy run", ("--config", "--no-watch"))]
    inside = "kubectl exec deploy/tcpproxy -- tcpproxy rollout pause --admin 127.0.0.1:9901"
    assert list(uses(inside, subcommands)) == [Use("tcpproxy rollout", ("--admin",))]
    assert list(uses("kubectl get service tcpproxy --watch", subcommands)) == []
    either = "tcpproxy check ID|--config PATH|--max-config-size=1MiB"
    assert list(uses(either, subcommands)) == [
        Use("tcpproxy check", ("--config", "--max-config-size"))
    ]
    script = "python benchmarks/soak.py --quick"
    assert list(uses(script, subcommands)) == [Use("benchmarks/soak.py", ("--quick",))]
    assert "--quick" in script_flags("benchmarks/soak.py")


# -- environment variables -------------------------------------------------------------------


def test_environment_variables_match_the_settings() -> None:
    named = set(re.findall(r"\bTCPPROXY_[A-Z][A-Z0-9_]*\b", readme().text))
    assert_none(env_vars() - named, "settings the README never names")
    assert_none(named - env_vars(), "variables the README names that nothing reads")


# -- config keys -----------------------------------------------------------------------------


def test_config_keys_match_the_models() -> None:
    code = model_paths(RouteConfig)
    rooted, fragment_keys = readme_config_paths()
    assert_none(code - rooted, "config keys the README's examples never show")
    assert_none(rooted - code, "keys in the README's configs that the models reject")
    keys = {path.rpartition(".")[2].removesuffix("[]") for path in code}
    assert_none(fragment_keys - keys, "keys in README snippets that no model has")


def test_model_paths_follow_optional_and_repeated_models() -> None:
    paths = model_paths(RouteConfig)
    assert "listeners[].backends[].weight" in paths
    assert "listeners[].health_check.expect" in paths  # HealthCheckConfig | None
    assert "listeners[].rollout.from" in paths  # by its alias
    assert "listeners[].rollout.abort.window" in paths  # nested twice
    assert set(yaml_paths({"listeners": [{"backends": [{"name": "a"}]}]})) == {
        "listeners",
        "listeners[].backends",
        "listeners[].backends[].name",
    }


# -- admin endpoints and metrics, from a running proxy -------------------------------------

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_ENDPOINT = re.compile(rf"^({'|'.join(_METHODS)}) (/\S*)")


def _route_pattern(resource: Any) -> str:
    """An aiohttp resource's path, as `/rollout/{}/pause|resume|abort` for
    `/rollout/{listener}/{action:pause|resume|abort}`."""
    info = resource.get_info()
    if "pattern" not in info:
        return str(resource.canonical)
    return re.sub(
        r"\(\?P<\w+>([^()]*)\)",
        # A parameter is `{}`, unless its pattern is a list of words the README spells out.
        lambda m: m.group(1) if re.fullmatch(r"[\w-]+(\|[\w-]+)+", m.group(1)) else "{}",
        info["pattern"].pattern,
    )


def _readme_pattern(path: str) -> str:
    """The README's `/rollout/<listener>/pause\\|resume\\|abort` -> the same form."""
    return re.sub(r"<[^>]*>", "{}", path.replace("\\|", "|"))


def readme_endpoints() -> set[tuple[str, str]]:
    found = set()
    for spans in readme().paragraphs:
        for span in spans:
            match = _ENDPOINT.match(span)
            if match:
                path = match.group(2).partition("?")[0]  # the endpoint, not its query
                found.add((match.group(1), _readme_pattern(path)))
    return found


def running_proxy_admin(backends: Backends, start_proxy: Start, admins: StartAdmin) -> Admin:
    """The admin server of a proxy with a rollout, so that its families are there too."""
    v1, v2 = backends.start("v1"), backends.start("v2")
    text = listener_yaml("app", free_port(), {"v1": (v1, 1), "v2": (v2, 0)})
    rollout = "    rollout: {from: v1, to: v2, steps: [50, 100], step_duration: 1h}\n"
    return admins(start_proxy(config_yaml(text + rollout)).proxy)


def test_admin_endpoints_match_the_router(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    admin = running_proxy_admin(backends, start_proxy, admins)
    routes = {
        (route.method, _route_pattern(route.resource))
        for route in admin.runner.app.router.routes()
        if route.method in _METHODS and route.resource is not None
    }
    named = readme_endpoints()
    assert_none(routes - named, "admin endpoints the README never names")

    def served(method: str, pattern: str) -> bool:
        if pattern.endswith("..."):  # `POST /rollout/<listener>/...`: any of them
            return any(m == method and p.startswith(pattern.removesuffix("...")) for m, p in routes)
        return (method, pattern) in routes

    assert_none([e for e in named if not served(*e)], "README endpoints nothing serves")


def test_metrics_match_a_running_proxys_scrape(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    scrape = running_proxy_admin(backends, start_proxy, admins).scrape()
    exported = {
        name + "_total" if kind == "counter" else name
        for name, kind in scrape.types.items()
        if name.startswith("tcpproxy_")
    }
    # A histogram's series, and a counter's name without _total, are names of it too.
    samples = {name for name, _ in scrape.samples} | set(scrape.types)
    assert "tcpproxy_rollout_weight" in exported  # the scrape has every kind of family
    named = set(re.findall(r"\btcpproxy_[a-z0-9_]*[a-z0-9]", readme().text))
    assert_none(exported - named, "metrics the README never names")
    assert_none(named - exported - samples, "README metrics no scrape has")


def test_route_and_readme_endpoints_are_compared_alike() -> None:
    app = web.Application()
    paths = ("/rollout/{listener}/{action:pause|resume|abort}", "/connections/{id:\\d{1,19}}", "/")
    for path in paths:
        app.router.add_post(path, _no_handler)
    assert [_route_pattern(r.resource) for r in app.router.routes()] == [
        _readme_pattern("/rollout/<listener>/pause\\|resume\\|abort"),
        _readme_pattern("/connections/<ID>"),
        "/",
    ]


async def _no_handler(request: web.Request) -> web.Response:
    raise AssertionError("never called")
