"""The Dockerfile: hadolint clean, and the contract the manifests and the image test rely on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .tools import DOCKERFILE, K8S_DIR, REPO_ROOT, find_tool, run


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    stage: int  # -1 before the first FROM


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends with a line continuation"
    result: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append(Instruction(keyword, value.strip(), stage))
    return result


def final_stage() -> list[Instruction]:
    all_ = instructions()
    last = max(i.stage for i in all_)
    return [i for i in all_ if i.stage == last]


def only(keyword: str, stage: list[Instruction]) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def exec_form(instruction: Instruction) -> list[str]:
    value = re.sub(r"^(--\S+\s+)*(CMD\s+)?", "", instruction.value)
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{instruction.keyword} is not in exec form"
    assert all(isinstance(p, str) for p in parsed)
    return [str(p) for p in parsed]


def test_hadolint_is_clean() -> None:
    proc = run([find_tool("hadolint"), str(DOCKERFILE)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_hadolint_would_catch_a_problem(tmp_path: Path) -> None:
    """Guard the guard: the same hadolint run fails a Dockerfile with a known mistake."""
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    assert run([find_tool("hadolint"), str(broken)], check=False).returncode != 0


def test_multi_stage_from_a_base_given_as_build_argument() -> None:
    all_ = instructions()
    assert all_[0].keyword == "ARG"
    arg_name = all_[0].value.split("=")[0]
    assert "slim" in all_[0].value.split("=", 1)[1], "the default base should be a slim image"
    froms = [i for i in all_ if i.keyword == "FROM"]
    assert len(froms) >= 2
    for instruction in froms:
        assert instruction.value.split()[0] == f"${{{arg_name}}}", instruction


def test_dependencies_are_installed_in_their_own_layer() -> None:
    build = [i for i in instructions() if i.stage == 0]
    keywords = [(i.keyword, i.value) for i in build]
    copy_meta = next(n for n, (k, v) in enumerate(keywords) if k == "COPY" and "pyproject" in v)
    copy_code = next(n for n, (k, v) in enumerate(keywords) if k == "COPY" and "tcpproxy/" in v)
    installs = [n for n, (k, v) in enumerate(keywords) if k == "RUN" and "pip install" in v]
    assert any(copy_meta < n < copy_code for n in installs), "no dependency layer before the code"
    assert "tcpproxy/" not in keywords[copy_meta][1]


def test_runtime_stage_contract() -> None:
    stage = final_stage()
    user = only("USER", stage).value
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user} must be a non-root number"
    assert exec_form(only("ENTRYPOINT", stage)) == ["tcpproxy"]
    cmd = exec_form(only("CMD", stage))
    assert cmd[0] == "run"
    config = cmd[cmd.index("--config") + 1]
    assert config.startswith("/etc/tcpproxy/")
    assert only("STOPSIGNAL", stage).value == "SIGTERM"
    healthcheck = only("HEALTHCHECK", stage)
    assert "/livez" in healthcheck.value
    exec_form(healthcheck)
    assert set(only("EXPOSE", stage).value.split()) == {"8008", "9901"}


def test_default_config_path_matches_the_kubernetes_mount() -> None:
    cmd = exec_form(only("CMD", final_stage()))
    image_config = cmd[cmd.index("--config") + 1]
    deployment = yaml.safe_load((K8S_DIR / "base" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--config") + 1] == image_config
    kustomization = yaml.safe_load((K8S_DIR / "base" / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [image_config.rpartition("/")[2]]
    env = " ".join(i.value for i in final_stage() if i.keyword == "ENV")
    assert f"TCPPROXY_CONFIG={image_config}" in env
    assert "TCPPROXY_ADMIN=0.0.0.0:9901" in env


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context is an allow-list"
    for instruction in instructions():
        if instruction.keyword != "COPY" or instruction.value.startswith("--from"):
            continue
        *sources, _dest = instruction.value.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert f"!{source}" in ignore, f"COPY {source}: excluded by .dockerignore"


def test_the_usage_example_publishes_the_admin_port_on_loopback_only() -> None:
    """The admin API can change state: `docker run -p 9901:9901` would offer it to every
    network the host is on."""
    header = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    published = re.findall(r"-p\s+(\S+)", "\n".join(header))
    assert "8008:8008" in published
    admin = [p for p in published if p.endswith(":9901")]
    assert admin == ["127.0.0.1:9901:9901"], published
