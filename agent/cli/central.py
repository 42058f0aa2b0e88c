"""The central side's commands: registry, dashboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.cli.service import run_service, run_until_signal, setup_logging
from agent.contract.topics import DEFAULT_PREFIX


def port(value: str) -> int:
    """A TCP port for argparse: one line naming the flag's value instead of a traceback."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a TCP port (0-65535)")
    return number


#: the first 16 bytes of every SQLite 3 database file
SQLITE_HEADER = b"SQLite format 3\x00"


def not_a_database(db: str) -> str | None:
    """Why an existing --db file cannot be a registry database (None: fine, or new)."""
    path = Path(db)
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return None  # created on first start
    except IsADirectoryError:
        return f"--db {db}: is a directory, not a database file"
    except OSError as e:
        return f"--db {db}: {e.strerror or e}"
    if head and head != SQLITE_HEADER:
        return f"--db {db}: not an SQLite database (wrong file?)"
    return None


def _check_db(db: str | None) -> bool:
    from agent.central.stores import is_dsn

    if db is None or is_dsn(db):
        return True
    problem = not_a_database(db)
    if problem is not None:
        print(problem, file=sys.stderr)
    return problem is None


def cmd_registry(args: argparse.Namespace) -> int:
    if not _check_db(args.db):
        return 1
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
        )
    )


def _add_dashboard_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dashboard", help="fleet dashboard: stations, outboxes, alerts, commands")
    p.add_argument("--host", default="127.0.0.1", help="MQTT broker")
    p.add_argument("--port", type=port, default=1883, help="MQTT broker port")
    p.add_argument("--db", default=None, help="registry database: SQLite file or postgresql:// DSN")
    p.add_argument("--topic-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--http-host", default="127.0.0.1", help="address of the web page")
    p.add_argument("--http-port", type=port, default=8780, help="port of the web page")
    p.add_argument("--stuck-after", type=float, default=120.0, help="seconds: outbox stuck")
    p.add_argument("--gap-timeout", type=float, default=300.0, help="seconds: seq gap alert")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    p.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    from agent.central.dashboard import Dashboard, Thresholds
    from agent.central.stores import is_dsn

    if not _check_db(args.db):
        return 1
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
    p.add_argument("--port", type=port, default=1883)
    p.add_argument(
        "--db",
        required=True,
        help="SQLite file of the registry, or a PostgreSQL DSN (postgresql://...)",
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
    p.set_defaults(func=cmd_registry)

    _add_dashboard_parser(sub)
