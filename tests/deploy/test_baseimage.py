"""The mirror for debootstrap comes from this machine's apt configuration, in both formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from .baseimage import apt_sources, debian_mirror, os_codename


def test_reads_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one-line.example/debian bookworm-updates main\n"
    )
    (tmp_path / "sources.list.d" / "a-disabled.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\n"
        "Components: main\nEnabled: no\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "# a comment inside the stanza\n"
        "URIs: http://deb822.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
    )
    (tmp_path / "sources.list.d" / "other.list.disabled").write_text(
        "deb http://ignored.example/debian bookworm main\n"
    )
    sources = apt_sources(tmp_path)
    assert debian_mirror("bookworm", sources) == "http://deb822.example/debian"
    assert [s.uri for s in sources] == [
        "http://src.example/debian",
        "http://one-line.example/debian",
        "http://deb822.example/debian",
        "http://security.example/debian-security",
    ]


def test_no_matching_source_is_a_clear_failure(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://x.example/debian trixie main\n")
    with pytest.raises(pytest.fail.Exception, match="no `deb` source for suite 'bookworm'"):
        debian_mirror("bookworm", apt_sources(tmp_path))


def test_this_machine_has_a_mirror_for_its_release() -> None:
    """What the image test will use: it must exist here (CI runs on this kind of machine)."""
    mirror = debian_mirror(os_codename(), apt_sources())
    assert mirror.startswith(("http://", "https://", "file:/"))


def test_codename_from_os_release(tmp_path: Path) -> None:
    release = tmp_path / "os-release"
    release.write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=bookworm\nID=debian\n')
    assert os_codename(release) == "bookworm"
