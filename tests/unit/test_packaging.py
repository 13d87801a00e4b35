"""What a non-editable install (a wheel, the container image) carries besides modules."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_template_is_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["tcpproxy"]
    package = REPO / "tcpproxy"
    templates = [p.relative_to(package).as_posix() for p in (package / "templates").iterdir()]
    assert "templates/status.html" in templates
    for name in templates:
        assert any(fnmatch(name, pattern) for pattern in patterns), name
