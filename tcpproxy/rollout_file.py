"""`tcpproxy rollout pause|resume|abort --config FILE`: the operator's decision written into
the route config, so that every replica reading the file (a mounted ConfigMap) takes it, and
a restart or a new replica keeps it. The file is edited round-trip (ruamel.yaml): comments,
order and layout stay as the user wrote them; only the rollout's decision keys change.

- pause:  `paused_at: <now>`: held at that instant, whenever a replica reads it.
- resume: `paused_for += now - paused_at`, `paused_at` removed: the schedule moves on by the
  time it was held, so every replica lands on the same step.
- abort:  `aborted_at: <now>` and `abort_reason`: all of the pair's share back to `from`.
- start:  `started_at: <now>`, every decision removed: a new rollout from step 1 (its
  identity changes with started_at), on every replica at the same moment.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from tcpproxy.config import ConfigError, parse_config, parse_duration, read_config_bytes
from tcpproxy.k8s_routes import is_route_document
from tcpproxy.rollout import elapsed_at, format_seconds

DEFAULT_CONFIGMAP = "tcpproxy-routes"
ACTIONS = ("start", "pause", "resume", "abort")
DECISIONS = ("paused_at", "paused_for", "aborted_at", "abort_reason", "completed")


class EditError(Exception):
    """The edit cannot be made; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Edit:
    listener: str
    summary: str  # "paused at 2026-12-01T12:00:00Z (step 2 of 4)"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _instant(value: object, where: str) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise EditError(f"{where}: {value!r} is not an ISO 8601 time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _put_after(block: CommentedMap, key: str, value: object, after: tuple[str, ...]) -> None:
    """Set `key`, placed after the first of `after` present (new keys read in order)."""
    if key in block:
        block[key] = value
        return
    keys = list(block.keys())
    anchor = next((k for k in reversed(after) if k in block), None)
    position = keys.index(anchor) + 1 if anchor is not None else len(keys)
    block.insert(position, key, value)


def _step_index(block: CommentedMap, now: float) -> int | None:
    """The step in force as the file and the clock say (len(steps) once the schedule has
    ended); None without steps or started_at."""
    steps = list(block.get("steps") or ())
    started = block.get("started_at")
    if not steps or started is None:
        return None
    paused_at = block.get("paused_at")
    elapsed = elapsed_at(
        _instant(started, "started_at"),
        parse_duration(block.get("paused_for", 0)),
        None if paused_at is None else _instant(paused_at, "paused_at"),
        now,
    )
    return min(int(elapsed // parse_duration(block["step_duration"])), len(steps))


def _step_text(block: CommentedMap, now: float) -> str:
    """' (step 2 of 4, 25%)', for the message only."""
    index = _step_index(block, now)
    if index is None:
        return ""
    steps = list(block["steps"])
    if index >= len(steps):
        return " (its schedule has ended)"
    return f" (step {index + 1} of {len(steps)}, {steps[index]}%)"


# A line that starts a YAML document; nothing else may start with `---` at column 0.
_DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?\n?", re.MULTILINE)


def _native_part(text: str) -> tuple[str, str, str] | None:
    """For a file of several documents (route documents and the native one holding the
    rollouts): (text before the native document, the native document, text after), so that
    the edit leaves every other document byte for byte. None for one document."""
    cuts = sorted({0, len(text), *(m.start() for m in _DOCUMENT_START.finditer(text))})
    segments = list(itertools.pairwise(cuts))
    if len(segments) < 2:
        return None
    for start, end in segments:
        marker = _DOCUMENT_START.match(text, start)
        body = marker.end() if marker else start
        try:
            document = pyyaml.safe_load(text[body:end])
        except pyyaml.YAMLError:
            continue
        if isinstance(document, dict) and not is_route_document(document):
            return text[:body], text[body:end], text[end:]
    return None


def edit_text(
    text: str, action: str, listener: str | None, now: datetime, reason: str | None = None
) -> tuple[str, list[Edit]]:
    """The file's text with `action` recorded in the rollout of `listener` (or of every
    listener that has one), and what was done. EditError when nothing can be done."""
    if (split := _native_part(text)) is not None:
        before, native, after = split
        edited, edits = _edit_document(native, action, listener, now, reason)
        return before + edited + after, edits
    return _edit_document(text, action, listener, now, reason)


def _edit_document(
    text: str, action: str, listener: str | None, now: datetime, reason: str | None
) -> tuple[str, list[Edit]]:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long line the user wrote on one
    try:
        # Written back with the file's own indentation, so that only the edited keys differ.
        _, sequence, offset = load_yaml_guess_indent(text)
        sequence, offset = sequence or 2, offset or 0
        yaml.indent(mapping=max(2, sequence - offset), sequence=sequence, offset=offset)
        document: Any = yaml.load(text)
    except Exception as exc:  # ruamel raises many kinds; the file must be valid to edit it
        raise EditError(f"invalid YAML: {str(exc).splitlines()[0]}") from None
    listeners = document.get("listeners") if isinstance(document, dict) else None
    if not isinstance(listeners, list):
        raise EditError("no 'listeners' list at the top")
    edits: list[Edit] = []
    stamp = DoubleQuotedScalarString(_iso(now))
    for i, entry in enumerate(listeners):
        if not isinstance(entry, dict) or not isinstance(entry.get("rollout"), dict):
            continue
        name = str(entry.get("name"))
        if listener is not None and name != listener:
            continue
        block: CommentedMap = entry["rollout"]
        where = f"listeners[{i}].rollout"
        if action == "start":
            for key in DECISIONS:
                block.pop(key, None)
            _put_after(block, "started_at", stamp, ("step_duration",))
            steps = list(block.get("steps") or ())
            summary = f"started at {stamp}: step 1 of {len(steps)}, {steps[0] if steps else 0}%"
            edits.append(Edit(name, f"rollout {block.get('from')} -> {block.get('to')} {summary}"))
            continue
        if "aborted_at" in block:
            raise EditError(f"{where}: {name}: the rollout is aborted already; nothing to {action}")
        index = _step_index(block, now.timestamp())
        ended = index is not None and index >= len(block["steps"])
        if action == "pause":
            if "paused_at" in block:
                raise EditError(f"{where}.paused_at: {name}: paused already")
            if ended:
                raise EditError(f"{where}: {name}: its schedule has ended; nothing to pause")
            _put_after(block, "paused_at", stamp, ("step_duration", "started_at", "paused_for"))
            summary = f"paused at {stamp}{_step_text(block, now.timestamp())}"
        elif action == "resume":
            if "paused_at" not in block:
                raise EditError(f"{where}.paused_at: {name}: not paused; nothing to resume")
            held = max(0.0, now.timestamp() - _instant(block["paused_at"], f"{where}.paused_at"))
            total = parse_duration(block.get("paused_for", 0)) + held
            seconds = f"{total:.3f}".rstrip("0").rstrip(".")
            _put_after(block, "paused_for", f"{seconds}s", ("step_duration", "started_at"))
            del block["paused_at"]
            summary = (
                f"resumed at {stamp} after {format_seconds(held)} paused"
                f"{_step_text(block, now.timestamp())}"
            )
        elif action == "abort":
            after = ("step_duration", "started_at", "paused_at", "paused_for")
            _put_after(block, "aborted_at", stamp, after)
            text_reason = reason or "aborted with tcpproxy rollout abort"
            _put_after(
                block, "abort_reason", DoubleQuotedScalarString(text_reason), (*after, "aborted_at")
            )
            summary = (
                f"aborted at {stamp}: all of the pair's new connections to {block.get('from')}"
            )
        else:
            raise ValueError(action)
        edits.append(Edit(name, f"rollout {block.get('from')} -> {block.get('to')} {summary}"))
    if not edits:
        where = f"listener {listener!r}" if listener else "any listener"
        raise EditError(f"no rollout on {where}")
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue(), edits


def write_atomically(path: Path, data: bytes) -> None:
    """Replace the file's contents in one rename (a reader sees the old file or the new
    one, never half of it); through a symlink, its target is replaced."""
    target = path.resolve()
    mode = target.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def kubectl_patch(text: str, configmap: str, key: str, namespace: str | None) -> str:
    """The same edit for a cluster: a merge patch of the ConfigMap's key with the new file."""
    patch = json.dumps({"data": {key: text}}, separators=(",", ":"))
    ns = f" --namespace {shlex.quote(namespace)}" if namespace else ""
    return (
        f"kubectl patch configmap {shlex.quote(configmap)}{ns} --type merge -p {shlex.quote(patch)}"
    )


def edit_file(
    path: Path,
    action: str,
    *,
    listener: str | None,
    reason: str | None,
    configmap: str,
    key: str | None,
    namespace: str | None,
    now: datetime | None = None,
) -> list[str]:
    """Edit `path` in place and return the lines to print. EditError or ConfigError (the
    file, before or after, is not a valid config) when it cannot."""
    source = str(path)
    text = read_config_bytes(path).decode()
    parse_config(text.encode(), source)  # only a valid config is edited
    new_text, edits = edit_text(text, action, listener, now or datetime.now(UTC), reason)
    try:
        parse_config(new_text.encode(), source)
    except ConfigError as exc:  # a bug here, never the user's: say so rather than write
        raise EditError(f"the edited file would not be valid: {exc.problems[0]}") from None
    write_atomically(path, new_text.encode())
    lines = [f"{source}: {edit.listener}: {edit.summary}" for edit in edits]
    lines.append(
        "Every replica that reads this file applies it on its next reload. In a cluster, "
        "the same edit:"
    )
    lines.append("  " + kubectl_patch(new_text, configmap, key or path.name, namespace))
    return lines
