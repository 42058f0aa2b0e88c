"""`madoguchi` command line: one subcommand per job, each a thin shell over a module."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent import __version__
from agent.config import Config, load_config
from agent.errors import ConfigError, MadoguchiError

log = logging.getLogger("agent")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return None


def run_until_signal(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `body(stop)`; SIGTERM / SIGINT set `stop` so it can finish cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    asyncio.run(main())
    return 0


def run_service(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """`run_until_signal`, with the project's errors logged (they name file, key or
    device) and exit status 1 instead of a traceback."""
    failed = False
    try:
        run_until_signal(body)
    except* MadoguchiError as group:  # (no `return` is allowed inside except*)
        failed = True
        for e in group.exceptions:
            log.error("%s", e)
    return 1 if failed else 0


# -- run ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    setup_logging(config.agent.log_level)
    from agent.supervisor import Station

    return run_service(Station(config).run)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.path)
    if config is None:
        return 1
    print(
        f"{args.path}: ok: site {config.agent.site}, agent {config.agent.name}, "
        f"{len(config.devices)} device(s)"
    )
    for dev in config.devices:
        print(f"  {dev.name}: driver {dev.driver}, profile {dev.profile}")
    return 0


def cmd_outbox_stats(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from agent.outbox import read_stats

    try:
        stats = read_stats(config.outbox_path)
    except MadoguchiError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{key:26} {value}")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from agent.registry import is_dsn, run_registry

    db: str | Path = args.db if is_dsn(args.db) else Path(args.db)
    return run_until_signal(
        lambda stop: run_registry(
            args.host,
            args.port,
            db,
            args.topic_prefix,
            args.client_id,
            stop,
            shared=args.shared,
            gap_timeout_s=args.gap_timeout,
            batch_max_messages=args.batch_max,
            quiet=args.quiet,
        )
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(loop=args.loop, scans=args.scans)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="madoguchi",
        description="Edge agent of municipal reception stations: scans -> durable outbox -> MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"madoguchi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the agent in the foreground (logs to stderr)")
    p.add_argument("--config", required=True, help="agent.toml")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a configuration without opening devices")
    p.add_argument("path", help="agent.toml")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("outbox", help="inspect the local outbox")
    osub = p.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    s = osub.add_parser("stats", help="counts, oldest unconfirmed record, size")
    s.add_argument("--config", required=True, help="agent.toml")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_outbox_stats)

    p = sub.add_parser("registry", help="reference registry consumer (stores, then acks)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument(
        "--db",
        required=True,
        help="SQLite file of the registry, or a PostgreSQL DSN (postgresql://...)",
    )
    p.add_argument("--topic-prefix", default="madoguchi/v1")
    p.add_argument(
        "--client-id",
        default=None,
        help="MQTT client id (default madoguchi-registry; with --shared, one per process)",
    )
    p.add_argument(
        "--shared",
        metavar="GROUP",
        default=None,
        help="consume through the MQTT 5 shared subscription $share/GROUP/... "
        "(run several consumers with the same GROUP)",
    )
    p.add_argument(
        "--gap-timeout",
        type=float,
        default=300.0,
        help="seconds a seq gap may stay open before it is an alert",
    )
    p.add_argument("--batch-max", type=int, default=64, help="messages committed together at most")
    p.add_argument("--quiet", action="store_true", help="do not print each record")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    p.set_defaults(func=cmd_registry)

    from agent.dashboard import add_dashboard_parser

    add_dashboard_parser(sub)

    p = sub.add_parser("demo", help="broker + registry + agent + simulated scanner, end to end")
    p.add_argument("--loop", action="store_true", help="keep scanning until Ctrl-C")
    p.add_argument("--scans", type=int, default=0, help="how many scans (default: one set)")
    p.set_defaults(func=cmd_demo)

    from agent.interpret.cli import add_decode_parser

    add_decode_parser(sub)
    from agent.drivers.hid import add_hid_replay_parser

    add_hid_replay_parser(sub)
    from agent.enroll import add_enroll_parser

    add_enroll_parser(sub)
    from agent.cardinfo import add_card_info_parser

    add_card_info_parser(sub)
    from agent.scan_image import add_scan_image_parser

    add_scan_image_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
