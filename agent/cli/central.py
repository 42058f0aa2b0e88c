"""The central side's commands: registry, dashboard."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agent.cli.service import run_service, run_until_signal, setup_logging
from agent.contract.topics import DEFAULT_PREFIX


def cmd_registry(args: argparse.Namespace) -> int:
    if args.db is None:
        args.registry_parser.error("the following arguments are required: --db")
    setup_logging(args.log_level)
    from agent.central.registry import run_registry
    from agent.central.stores import is_dsn

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
            personal_retention_hours=args.personal_retention_hours,
            show_data=args.show_data,
        )
    )


def _add_dashboard_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dashboard", help="fleet dashboard: stations, outboxes, alerts, commands")
    p.add_argument("--host", default="127.0.0.1", help="MQTT broker")
    p.add_argument("--port", type=int, default=1883, help="MQTT broker port")
    p.add_argument("--db", default=None, help="registry database: SQLite file or postgresql:// DSN")
    p.add_argument("--topic-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--http-host", default="127.0.0.1", help="address of the web page")
    p.add_argument("--http-port", type=int, default=8780, help="port of the web page")
    p.add_argument("--stuck-after", type=float, default=120.0, help="seconds: outbox stuck")
    p.add_argument("--gap-timeout", type=float, default=300.0, help="seconds: seq gap alert")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    p.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    from agent.central.dashboard import Dashboard, Thresholds
    from agent.central.stores import is_dsn

    setup_logging(args.log_level)
    db: str | Path | None = None
    if args.db is not None:
        db = args.db if is_dsn(args.db) else Path(args.db)
    dashboard = Dashboard(
        args.host,
        args.port,
        db=db,
        topic_prefix=args.topic_prefix,
        http_host=args.http_host,
        http_port=args.http_port,
        thresholds=Thresholds(stuck_after_s=args.stuck_after, gap_timeout_s=args.gap_timeout),
    )
    return run_service(dashboard.run)


def add_central_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("registry", help="reference registry consumer (stores, then acks)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument(
        "--db",
        default=None,
        help="SQLite file of the registry, or a PostgreSQL DSN (postgresql://...); required",
    )
    p.add_argument("--topic-prefix", default=DEFAULT_PREFIX)
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
    p.add_argument(
        "--personal-retention-hours",
        type=_retention,
        default=72.0,
        help="hours the sealed personal part of a record is kept, then purged "
        "(default 72; 'never' keeps it)",
    )
    p.add_argument(
        "--show-data",
        action="store_true",
        help="print scanned identifiers in full (masked as 1111-****-2345 by default)",
    )
    p.set_defaults(func=cmd_registry, registry_parser=p)
    _add_personal_parsers(p)

    _add_dashboard_parser(sub)


# -- the sealed personal part: keys, hand-off, purge (agent/personal_seal.py) -----------


def _retention(value: str) -> float | None:
    if value == "never":
        return None
    hours = float(value)
    if not hours > 0:
        raise argparse.ArgumentTypeError("must be > 0 hours, or 'never'")
    return hours


def _who() -> str:
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()}"


def _add_personal_parsers(registry: argparse.ArgumentParser) -> None:
    sub = registry.add_subparsers(dest="registry_action", metavar="{keygen,export-personal,...}")
    k = sub.add_parser("keygen", help="new X25519 key pair for sealing personal data")
    k.add_argument("--private", type=Path, required=True, help="private key (back office, 0600)")
    k.add_argument("--public", type=Path, required=True, help="public key (for the stations)")
    k.set_defaults(func=cmd_keygen)

    e = sub.add_parser(
        "export-personal",
        help="back-office hand-off: decrypt sealed personal parts to a file, log the access",
    )
    e.add_argument("--db", required=True, help="registry SQLite file or postgresql:// DSN")
    e.add_argument("--key", type=Path, required=True, help="the private key (mode 0600)")
    e.add_argument("--out", type=Path, required=True, help="JSON Lines file to create (0600)")
    e.add_argument("--who", default=None, help="who takes the data (default user@host)")
    e.add_argument("--again", action="store_true", help="include records already handed off")
    e.set_defaults(func=cmd_export_personal)

    g = sub.add_parser("purge-personal", help="delete sealed personal parts now")
    g.add_argument("--db", required=True, help="registry SQLite file or postgresql:// DSN")
    g.add_argument(
        "--older-than-hours", type=float, default=72.0, help="stored longer ago than this"
    )
    g.add_argument("--handed-off", action="store_true", help="also every one handed off")
    g.add_argument("--who", default=None, help="who purges (default user@host)")
    g.set_defaults(func=cmd_purge_personal)


def _db(value: str) -> str | Path:
    from agent.central.stores import is_dsn

    return value if is_dsn(value) else Path(value)


def _fail(e: Exception) -> int:
    print(f"madoguchi registry: {e}", file=sys.stderr)
    return 1


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.personal_seal import generate_keypair

    try:
        kid = generate_keypair(args.private, args.public)
    except FileExistsError as e:
        return _fail(Exception(f"{e.filename}: exists; a key is never overwritten"))
    except OSError as e:
        return _fail(Exception(f"{e.filename}: {e.strerror}"))
    print(f"key {kid}: private {args.private} (keep it in the back office), public {args.public}")
    return 0


def cmd_export_personal(args: argparse.Namespace) -> int:
    from agent.central.personal import export_personal
    from agent.errors import MadoguchiError

    try:
        n, failed = asyncio.run(
            export_personal(
                _db(args.db), args.key, args.out, who=args.who or _who(), again=args.again
            )
        )
    except MadoguchiError as e:
        return _fail(e)
    except OSError as e:  # the hand-off file: exists, or the disk is full (nothing marked)
        return _fail(Exception(f"{e.filename or args.out}: {e.strerror}; nothing handed off"))
    print(f"{n} record(s) handed off to {args.out}", file=sys.stderr)
    for line in failed:
        print(f"not exported: {line}", file=sys.stderr)
    return 1 if failed else 0


def cmd_purge_personal(args: argparse.Namespace) -> int:
    from agent.central.personal import purge_personal
    from agent.errors import MadoguchiError

    try:
        ids = asyncio.run(
            purge_personal(
                _db(args.db),
                args.older_than_hours * 3600,
                who=args.who or _who(),
                handed_off=args.handed_off,
            )
        )
    except MadoguchiError as e:
        return _fail(e)
    print(f"purged the sealed personal part of {len(ids)} record(s)", file=sys.stderr)
    return 0
