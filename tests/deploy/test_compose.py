"""deploy/compose: validated by the compose binary itself, then cross-checked."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml

from .tools import COMPOSE_DIR, REPO_ROOT, check_route_config, find_tool, parse_duration, run

COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
CONFIG_TARGET = "/etc/tcpproxy"


@functools.cache
def resolved() -> dict[str, Any]:
    """The compose model after interpolation, anchors and defaults, as compose sees it."""
    out = run([find_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "--format", "json"])
    model: dict[str, Any] = json.loads(out.stdout)
    return model


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def test_compose_config_is_valid() -> None:
    proc = run([find_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q"])
    assert proc.stdout == ""
    assert "warn" not in proc.stderr.lower(), proc.stderr


def test_services_are_proxy_and_two_versions_from_one_image() -> None:
    services = resolved()["services"]
    assert set(services) == {"proxy", "v1", "v2"}
    image = services["proxy"]["image"]
    assert Path(services["proxy"]["build"]["context"]).resolve() == REPO_ROOT
    assert (Path(services["proxy"]["build"]["context"]) / "Dockerfile").is_file()
    for name in ("v1", "v2"):
        assert services[name]["image"] == image
        assert services[name]["command"] == ["echo", "--listen", "0.0.0.0:9000", "--name", name]
        assert services[name].get("pull_policy") == "never"


def test_config_directory_is_mounted_not_the_file() -> None:
    proxy = resolved()["services"]["proxy"]
    (mount,) = [v for v in proxy["volumes"] if v["target"] == CONFIG_TARGET]
    assert mount["type"] == "bind"
    assert mount["read_only"] is True
    source = Path(mount["source"])
    assert source.is_dir(), f"{source} must be a directory (the reloader watches it)"
    config_path = flag(proxy["command"], "--config")
    assert config_path == f"{CONFIG_TARGET}/tcpproxy.yaml"
    assert (source / "tcpproxy.yaml").is_file()


def test_route_config_is_valid_and_points_at_the_backends(tmp_path: Path) -> None:
    services = resolved()["services"]
    proxy = services["proxy"]
    (mount,) = [v for v in proxy["volumes"] if v["target"] == CONFIG_TARGET]
    text = (Path(mount["source"]) / "tcpproxy.yaml").read_text()
    check_route_config(text, tmp_path)
    (listener,) = yaml.safe_load(text)["listeners"]
    published = {int(p["target"]) for p in proxy["ports"]}
    assert int(listener["bind"].rpartition(":")[2]) in published
    for backend in listener["backends"]:
        host, _, port = backend["address"].rpartition(":")
        assert host in services, f"{backend['address']}: no compose service {host!r}"
        assert flag(services[host]["command"], "--listen").endswith(f":{port}")


def test_ports_and_admin() -> None:
    proxy = resolved()["services"]["proxy"]
    ports = {int(p["target"]): p for p in proxy["ports"]}
    assert set(ports) == {8008, 9901}
    assert ports[8008]["published"] == "8008"
    assert ports[9901]["published"] == "9901"
    # The admin API can reload the config: keep it on the host's loopback.
    assert ports[9901]["host_ip"] == "127.0.0.1"
    assert flag(proxy["command"], "--admin") == "0.0.0.0:9901"


def test_containers_are_locked_down_and_stop_gracefully() -> None:
    services = resolved()["services"]
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    proxy = services["proxy"]
    shutdown = parse_duration(proxy["environment"]["TCPPROXY_SHUTDOWN_TIMEOUT"])
    assert parse_duration(proxy["stop_grace_period"]) > shutdown
