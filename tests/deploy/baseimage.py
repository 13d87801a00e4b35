"""A local slim-Python base image, made with debootstrap, for building the Dockerfile offline.

No container registry is reachable where the tests run, so the Dockerfile's PYTHON_IMAGE
build argument is pointed at an image built here from Debian packages: a `minbase`
debootstrap of this machine's release with python3 and python3-venv, from the mirror this
machine's apt already uses. The root filesystem is cached as a tarball (and the imported
image stays in podman's store), keyed on everything that went into it, so only the first run
on a machine pays for debootstrap.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .tools import find_tool, run

CACHE_DIR = Path(os.environ.get("TCPPROXY_CI_CACHE", "/var/cache/tcpproxy-ci"))
IMAGE_REPO = "localhost/tcpproxy-ci-base"
VARIANT = "minbase"
# python3-venv brings ensurepip (the Dockerfile makes a venv); ca-certificates lets pip reach
# the package index over TLS.
INCLUDE = ("python3", "python3-venv", "ca-certificates")
# Extra trust anchors of this machine (for example a TLS-intercepting egress proxy's CA):
# the build's `pip install` must trust what the machine's own pip trusts.
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
# Bump when the recipe below changes, so stale caches are not reused.
RECIPE_VERSION = "1"


@dataclass(frozen=True)
class AptSource:
    types: tuple[str, ...]
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _parse_one_line(text: str) -> Iterator[AptSource]:
    """Parse the classic `deb [options] URI suite component...` format."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kind = words.pop(0)
        if words and words[0].startswith("["):
            while words and not words.pop(0).endswith("]"):
                pass
        if len(words) < 2:
            continue
        yield AptSource((kind,), words[0], (words[1],), tuple(words[2:]))


def _parse_deb822(text: str) -> Iterator[AptSource]:
    """Parse the deb822 `.sources` format: blank-line separated stanzas of `Key: value`."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            yield AptSource(
                tuple(fields.get("types", "").split()),
                uri,
                tuple(fields.get("suites", "").split()),
                tuple(fields.get("components", "").split()),
            )


def apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every source this machine's apt is configured with, in apt's reading order."""
    sources: list[AptSource] = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        sources.extend(_parse_one_line(main_list.read_text()))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources.extend(_parse_one_line(path.read_text()))
            elif path.suffix == ".sources":
                sources.extend(_parse_deb822(path.read_text()))
    return sources


def os_codename(os_release: Path = Path("/etc/os-release")) -> str:
    for line in os_release.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value:
            return value.strip().strip('"')
    pytest.fail(f"{os_release} has no VERSION_CODENAME; cannot tell which release to debootstrap")


def debian_mirror(codename: str, sources: list[AptSource]) -> str:
    """The URI apt uses for `codename` main: the mirror debootstrap must use too."""
    for source in sources:
        if "deb" in source.types and codename in source.suites and "main" in source.components:
            return source.uri
    pytest.fail(
        f"no `deb` source for suite {codename!r} with component main in /etc/apt/sources.list"
        " or /etc/apt/sources.list.d/; cannot choose a mirror for debootstrap"
    )


def _local_ca_files() -> list[Path]:
    if not LOCAL_CA_DIR.is_dir():
        return []
    return sorted(p for p in LOCAL_CA_DIR.rglob("*.crt") if p.is_file())


def _cache_key(mirror: str, codename: str) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, mirror, codename, VARIANT, *INCLUDE):
        digest.update(part.encode() + b"\0")
    for ca in _local_ca_files():
        digest.update(ca.read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _debootstrap(mirror: str, codename: str, tarball: Path) -> None:
    rootfs = tarball.with_suffix(".rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        run(
            [
                find_tool("debootstrap"),
                f"--variant={VARIANT}",
                f"--include={','.join(INCLUDE)}",
                "--components=main",
                codename,
                str(rootfs),
                mirror,
            ],
            timeout=900,
        )
        ca_target = rootfs / "usr/local/share/ca-certificates"
        for ca in _local_ca_files():
            dest = ca_target / ca.relative_to(LOCAL_CA_DIR)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ca, dest)
        run(["chroot", str(rootfs), "update-ca-certificates"], timeout=120)
        # What a slim image leaves out: package caches, indexes and documentation.
        for junk in (
            "var/cache/apt",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
        ):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], timeout=300)
        partial.rename(tarball)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base_image() -> str:
    """Return the name of a local slim-Python base image, building it on first use."""
    if os.geteuid() != 0:
        pytest.fail("the image test needs root (debootstrap, podman with the runc runtime)")
    podman = find_tool("podman")
    codename = os_codename()
    mirror = debian_mirror(codename, apt_sources())
    key = _cache_key(mirror, codename)
    image = f"{IMAGE_REPO}:{codename}-{key}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_DIR / "lock"):
        exists = subprocess.run(
            [podman, "image", "exists", image], capture_output=True, check=False, timeout=60
        )
        if exists.returncode == 0:
            return image
        tarball = CACHE_DIR / f"base-{codename}-{key}.tar"
        if not tarball.is_file():
            _debootstrap(mirror, codename, tarball)
        run(
            [
                podman,
                "import",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python3"]',
                str(tarball),
                image,
            ],
            timeout=300,
        )
    return image
