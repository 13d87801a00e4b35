"""Command line: run, check, convert, demo, rollout, echo."""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tcpproxy import __version__
from tcpproxy.config import ConfigError, split_host_port
from tcpproxy.config_worker import load_isolated
from tcpproxy.logs import plural, setup_logging
from tcpproxy.settings import Settings, SettingsError, load_settings, read_admin_token


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="route config YAML [TCPPROXY_CONFIG]")
    parser.add_argument("--admin", help="admin HTTP HOST:PORT, or off [TCPPROXY_ADMIN]")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="[TCPPROXY_LOG_LEVEL]"
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="[TCPPROXY_LOG_FORMAT]")
    parser.add_argument(
        "--shutdown-timeout",
        help="how long live connections may finish after SIGTERM [TCPPROXY_SHUTDOWN_TIMEOUT]",
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_const",
        const=False,
        help="no log line per closed connection [TCPPROXY_ACCESS_LOG=false]",
    )
    parser.add_argument(
        "--no-watch",
        dest="watch",
        action="store_const",
        const=False,
        help="do not watch the config directory; reload on SIGHUP, POST /-/reload "
        "and polling only [TCPPROXY_WATCH=false]",
    )
    parser.add_argument(
        "--metrics-linger",
        help="keep a drained-away backend's metrics this long [TCPPROXY_METRICS_LINGER]",
    )
    parser.add_argument(
        "--poll-interval",
        help="re-read the config this often even without file events, 0 = never "
        "[TCPPROXY_POLL_INTERVAL]",
    )
    _add_config_size_flag(parser)
    parser.add_argument(
        "--config-settle",
        help="apply a config file written in place once it has not changed for this long "
        "(default 1s; a rename applies at once), 0 = at once [TCPPROXY_CONFIG_SETTLE]",
    )
    _add_token_flag(parser)
    parser.add_argument(
        "--admin-allowed-hosts",
        metavar="HOST[,HOST...]",
        help="Host header values the admin control endpoints accept besides loopback names "
        "and addresses and the admin address; * = any [TCPPROXY_ADMIN_ALLOWED_HOSTS]",
    )
    parser.add_argument(
        "--admin-read-timeout",
        help="an admin client has this long to send a whole request (default 10s) "
        "[TCPPROXY_ADMIN_READ_TIMEOUT]",
    )
    parser.add_argument(
        "--admin-max-connections",
        type=int,
        help="open admin connections at most (default 64) [TCPPROXY_ADMIN_MAX_CONNECTIONS]",
    )


def _add_config_size_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-config-size",
        help="reject a config file larger than this, e.g. 512KiB (default 1MiB) "
        "[TCPPROXY_MAX_CONFIG_SIZE]",
    )


def _add_token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="PATH",
        help="file holding the admin token that reload, rollout control and closing "
        "connections need; or the token itself in TCPPROXY_ADMIN_TOKEN. Without one they "
        "answer only on a loopback admin address [TCPPROXY_ADMIN_TOKEN_FILE]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpproxy",
        description="TCP proxy that shifts traffic between backends by hot-reloaded weights.",
    )
    parser.add_argument("--version", action="version", version=f"tcpproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy")
    _add_process_flags(run)
    check = sub.add_parser("check", help="validate a config file (exit 0 valid, 1 invalid)")
    check.add_argument("--config", type=Path, help="route config YAML [TCPPROXY_CONFIG]")
    _add_config_size_flag(check)
    convert = sub.add_parser(
        "convert",
        help="print a file of Istio VirtualService / Gateway API TCPRoute documents as "
        "native route config",
    )
    convert.add_argument("file", type=Path, help="the route documents (YAML)")
    _add_config_size_flag(convert)
    demo = sub.add_parser("demo", help="two echo backends v1/v2 and the proxy on :8008")
    _add_process_flags(demo)
    rollout = sub.add_parser(
        "rollout",
        help="show or steer a rollout: in the config file (every replica), or on one proxy "
        "through its admin API",
    )
    rollout.add_argument("action", choices=["status", "start", "pause", "resume", "abort"])
    rollout.add_argument("--listener", help="the listener (default: every one with a rollout)")
    rollout.add_argument(
        "--config",
        dest="rollout_config",
        type=Path,
        metavar="FILE",
        help="record start (step 1 now), pause, resume or abort in this route config file "
        "(in place, comments kept), for every replica that reads it; with status, the "
        "schedule it gives now",
    )
    rollout.add_argument("--reason", help="abort: why, kept in the file (abort_reason)")
    rollout.add_argument(
        "--configmap",
        default="tcpproxy-routes",
        help="the ConfigMap in the printed kubectl patch (default tcpproxy-routes)",
    )
    rollout.add_argument(
        "--configmap-key", help="its key holding the file (default: the file's name)"
    )
    rollout.add_argument("--namespace", help="its namespace in the printed kubectl patch")
    rollout.add_argument(
        "--prometheus",
        metavar="URL",
        help="status: every replica's step, state and share, and the fleet's measured "
        "share, from this Prometheus",
    )
    rollout.add_argument(
        "--window", default="5m", help="status --prometheus: measure shares over this (5m)"
    )
    rollout.add_argument(
        "--admin",
        help="admin HOST:PORT of one proxy: status, or pause/resume/abort on that replica "
        "only [TCPPROXY_ADMIN]",
    )
    _add_token_flag(rollout)
    conns = sub.add_parser(
        "connections", help="list live connections, or close one or a backend's (via admin)"
    )
    conns.add_argument(
        "action", nargs="?", choices=["close"], metavar="close", help="close instead of list"
    )
    conns.add_argument("id", nargs="?", type=int, metavar="ID", help="the connection to close")
    conns.add_argument("--listener", help="only this listener's")
    conns.add_argument("--backend", help="only this backend's (close: all of them)")
    conns.add_argument("--state", help="only in this state (established, half_closed, ...)")
    conns.add_argument("--older-than", metavar="DURATION", help="only open longer than this")
    conns.add_argument("--admin", help="admin HOST:PORT of the proxy [TCPPROXY_ADMIN]")
    _add_token_flag(conns)
    echo = sub.add_parser("echo", help="the demo backend: greets with its name, echoes lines")
    echo.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    echo.add_argument("--name", required=True, help="name in the greeting")
    return parser


def _settings(args: argparse.Namespace, **defaults: object) -> Settings:
    flags = {
        key: getattr(args, key, None)
        for key in (
            "config",
            "admin",
            "log_level",
            "log_format",
            "shutdown_timeout",
            "access_log",
            "poll_interval",
            "watch",
            "metrics_linger",
            "max_config_size",
            "config_settle",
            "admin_token_file",
            "admin_allowed_hosts",
            "admin_read_timeout",
            "admin_max_connections",
        )
    }
    for key, value in defaults.items():
        if flags.get(key) is None:
            flags[key] = value
    return load_settings(**flags)


def admin_token(settings: Settings) -> str | None:
    """The token the admin server expects, for clients of it (already validated)."""
    if settings.admin_token_file is not None:
        return read_admin_token(settings.admin_token_file)
    return settings.admin_token.get_secret_value() if settings.admin_token else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "demo") and hasattr(signal, "SIGHUP"):
        # Until the proxy handles SIGHUP itself, its default action would kill the process
        # while it starts; the config is read after this, so nothing is lost.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from tcpproxy.server import run_loop  # noqa: PLC0415

    try:
        if args.command == "check":
            settings = _settings(args)
            try:
                # In a child process with a time and memory limit, as `run` parses it.
                loaded = asyncio.run(load_isolated(settings.config, settings.max_config_size))
            except ConfigError as exc:
                print("\n".join(settings.hint_missing_config(exc.problems)), file=sys.stderr)
                return 1
            for warning in loaded.warnings():
                print(warning, file=sys.stderr)
            from tcpproxy.rollout import schedule_problems  # noqa: PLC0415

            if problems := schedule_problems(loaded.config, str(settings.config), time.time()):
                print("\n".join(problems), file=sys.stderr)
                return 1
            count = sum(len(lst.backends) for lst in loaded.config.listeners)
            print(
                f"{settings.config}: ok ({plural(len(loaded.config.listeners), 'listener')}, "
                f"{plural(count, 'backend')}, sha256 {loaded.sha256[:12]})"
            )
            return 0
        if args.command == "convert":
            from tcpproxy.k8s_routes import native_yaml  # noqa: PLC0415

            try:
                loaded = asyncio.run(load_isolated(args.file, _settings(args).max_config_size))
            except ConfigError as exc:
                print("\n".join(exc.problems), file=sys.stderr)
                return 1
            print(native_yaml(loaded.config, str(args.file)), end="")
            return 0
        if args.command == "rollout":
            from tcpproxy import rollout_cli  # noqa: PLC0415

            if args.rollout_config or args.prometheus or args.action == "start":
                return rollout_cli.fleet_command(args)
            settings = _settings(args)
            return rollout_cli.rollout_command(
                settings.admin, args.action, args.listener, admin_token(settings)
            )
        if args.command == "connections":
            from tcpproxy.connections_cli import connections_command  # noqa: PLC0415

            settings = _settings(args)
            filters = {
                "listener": args.listener,
                "backend": args.backend,
                "state": args.state,
                "older_than": args.older_than,
            }
            return connections_command(
                settings.admin, args.action, args.id, filters, admin_token(settings)
            )
        if args.command == "echo":
            from tcpproxy.demo import echo_main  # noqa: PLC0415

            try:
                split_host_port(args.listen)
            except ValueError as exc:
                print(f"--listen: {exc}", file=sys.stderr)
                return 2
            setup_logging()
            return run_loop(echo_main(args.name, args.listen))
        if args.command in ("demo", "run") and not hasattr(select, "epoll"):
            print(
                f"tcpproxy: the proxy needs Linux (epoll), not {sys.platform}; "
                "run the container image instead (README: docker compose)",
                file=sys.stderr,
            )
            return 2
        if args.command == "demo":
            from tcpproxy.demo import demo_config, demo_main  # noqa: PLC0415

            with demo_config(args.config) as config:
                settings = _settings(args, config=config)
                setup_logging(settings.log_level, settings.log_format, settings.access_log)
                return run_loop(demo_main(settings))
        settings = _settings(args)
        from tcpproxy.server import serve  # noqa: PLC0415

        setup_logging(settings.log_level, settings.log_format, settings.access_log)
        return run_loop(serve(settings))
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output went away (`| head`): nothing more to say, and nothing
        # to flush at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
