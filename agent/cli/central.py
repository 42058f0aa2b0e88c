"""The central side's commands: registry, dashboard.

Each runs from central.toml (`--config`, what the systemd units do) or, for a quick
try, from flags. Flags are turned into the same validated `CentralConfig`, so both
ways meet the same checks (no password in a DSN, tls_cert with tls_key, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agent.central.config import Role
from agent.cli.service import run_service, setup_logging
from agent.contract.topics import DEFAULT_PREFIX
from agent.errors import ConfigError, MadoguchiError

# flags that describe what central.toml describes: not both at once
_QUICK = (
    "host",
    "port",
    "db",
    "db_password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "username",
    "password_file",
    "shared",
    "token_file",
    "allowed_origin",
    "personal_retention_hours",
    "heartbeat",
    "dataset_key",
)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="central.toml (then the connection flags are not used)"
    )
    p.add_argument("--host", default=None, help="MQTT broker (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="MQTT broker port (default 1883)")
    p.add_argument("--topic-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--tls-ca", default=None, help="fleet CA bundle (PEM): connect with TLS")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM); its CN is who")
    p.add_argument("--tls-key", default=None, help="private key of --tls-cert (PEM)")
    p.add_argument("--username", default=None, help="MQTT user name (password brokers)")
    p.add_argument("--password-file", default=None, help="file holding the MQTT password")
    p.add_argument(
        "--db-password-file",
        default=None,
        help="file holding the PostgreSQL password of --db (never put it in the DSN)",
    )


def _broker_from_args(args: argparse.Namespace) -> dict[str, Any]:
    broker: dict[str, Any] = {
        "host": args.host or "127.0.0.1",
        "port": args.port or 1883,
        "topic_prefix": args.topic_prefix,
    }
    if args.tls_ca is not None:
        broker["tls_ca"] = args.tls_ca
    return broker


def _identity_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: getattr(args, key)
        for key in ("tls_cert", "tls_key", "username", "password_file")
        if getattr(args, key) is not None
    }


def _config(args: argparse.Namespace, need: Role, section: dict[str, Any]) -> Any:
    """The validated CentralConfig from --config or from the flags; None after printing
    every problem."""
    from agent.central.config import load_central_config, validate_central

    try:
        if args.config is not None:
            mixed = [k for k in _QUICK if getattr(args, k, None) is not None]
            if mixed:
                flags = ", ".join("--" + k.replace("_", "-") for k in mixed)
                raise ConfigError(
                    [f"{args.config}: (command line): {flags} with --config: put them in the file"]
                )
            return load_central_config(args.config, need)
        section = {**section, **_identity_from_args(args)}
        raw: dict[str, Any] = {"broker": _broker_from_args(args), need: section}
        if need == "registry" and args.db is not None:
            raw["database"] = {"dsn": args.db}
            if args.db_password_file is not None:
                raw["database"]["password_file"] = args.db_password_file
        elif need == "dashboard" and args.db is not None:
            section["database_dsn"] = args.db
            if args.db_password_file is not None:
                section["database_password_file"] = args.db_password_file
        return validate_central(raw, Path.cwd() / "(command line)", need)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


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
    """A --db that is a file but no SQLite database is one line before anything starts."""
    from agent.central.stores import is_dsn

    if db is None or is_dsn(db):
        return True
    problem = not_a_database(db)
    if problem is not None:
        print(problem, file=sys.stderr)
    return problem is None


def cmd_registry(args: argparse.Namespace) -> int:
    if args.config is None and args.db is None:
        print("madoguchi registry: --db or --config is required", file=sys.stderr)
        return 2
    if not _check_db(args.db):
        return 1
    section: dict[str, Any] = {
        "gap_timeout_s": args.gap_timeout,
        "batch_max_messages": args.batch_max,
        "quiet": args.quiet,
        "log_level": args.log_level or "INFO",
    }
    if args.shared is not None:
        section["shared"] = args.shared
    if args.personal_retention_hours is not None:
        section["personal_retention_hours"] = args.personal_retention_hours
    if args.dataset_key is not None:
        section["dataset_key"] = args.dataset_key
    if args.heartbeat is not None:
        section["heartbeat_s"] = args.heartbeat
    config = _config(args, "registry", section)
    if config is None:
        return 1
    reg = config.registry
    setup_logging(args.log_level or reg.log_level)
    from agent.central.registry import run_registry, tune_gc

    try:
        tls = config.tls_context("registry")
        password = config.mqtt_password("registry")
        db = config.database_target("registry")
        assert db is not None
        if reg.dataset_key is not None and reg.shared is not None:
            raise ConfigError(
                [
                    f"{config.source}: registry.dataset_key: not with shared = {reg.shared!r}:"
                    " each member sees a share of the records; give the key to one"
                    " unshared registry"
                ]
            )
        feed = _used_tickets_feed(reg.dataset_key, db, config.broker.topic_prefix)
        station_status = None
        if (ss := config.station_status) is not None:
            from agent.central.station_status import StationStatusFeed
            from agent.contract.topics import registry_name

            # members of a shared group publish one topic: each hears every station
            group = "madoguchi-registry" + ("" if reg.shared is None else f"-{reg.shared}")
            station_status = StationStatusFeed(
                config.broker.host,
                config.broker.port,
                registry_name(args.client_id or group),
                interval_s=ss.interval_s,
                topic_prefix=config.broker.topic_prefix,
                tls_context=config.tls_context("station_status"),
                username=ss.username,
                password=config.mqtt_password("station_status"),
            )
        transport = _amqp_transport(config) if reg.transport == "amqp" else None
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    tune_gc()
    return run_service(
        lambda stop: run_registry(
            config.broker.host,
            config.broker.port,
            db,
            config.broker.topic_prefix,
            args.client_id,
            stop,
            tls_context=tls,
            shared=reg.shared,
            gap_timeout_s=reg.gap_timeout_s,
            batch_max_messages=reg.batch_max_messages,
            quiet=reg.quiet or args.quiet,
            blob_dir=reg.blob_dir,
            username=reg.username,
            password=password,
            personal_retention_hours=reg.personal_retention_hours or None,
            show_data=args.show_data,
            datasets=feed,
            heartbeat_s=reg.heartbeat_s,
            station_status=station_status,
            transport=transport,
        )
    )


def _amqp_transport(config: Any) -> Any:
    """`[registry] transport = "amqp"`: the records quorum queue of [amqp]."""
    from agent.central.amqp import AmqpTransport

    amqp = config.amqp
    tls = config.tls_context("registry") if amqp.tls else None
    return AmqpTransport(
        config.amqp_urls(), queue=amqp.queue, prefetch=amqp.prefetch, ssl_context=tls
    )


def _used_tickets_feed(key: Path | None, db: Any, prefix: str) -> Any:
    """The registry's `used_tickets` publisher, its state beside a SQLite database."""
    if key is None:
        return None
    from agent.central.datasets import UsedTicketsFeed, load_key
    from agent.errors import DatasetKeyError

    try:
        signing = load_key(key)
    except DatasetKeyError as e:
        raise ConfigError([f"dataset_key: {e}"]) from e
    path = Path(db) if isinstance(db, Path | str) and "://" not in str(db) else None
    state = path.with_name(path.stem + "-datasets.db") if path else Path("registry-datasets.db")
    return UsedTicketsFeed(state, signing, prefix)


def _add_dashboard_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dashboard", help="fleet dashboard: stations, outboxes, alerts, commands")
    _add_connection_flags(p)
    p.add_argument("--db", default=None, help="registry database: SQLite file or postgresql:// DSN")
    p.add_argument("--http-host", default="127.0.0.1", help="address of the web page")
    p.add_argument("--http-port", type=int, default=8780, help="port of the web page")
    p.add_argument(
        "--token-file",
        default=None,
        help="access tokens, one a line (`name token`); created with a random one if missing",
    )
    p.add_argument("--allowed-host", action="append", default=[], help="extra Host to answer")
    p.add_argument("--allowed-origin", default=None, help="the one Origin browsers may send")
    p.add_argument("--audit-file", default="dashboard-audit.jsonl", help="command audit (JSONL)")
    p.add_argument("--stuck-after", type=float, default=120.0, help="seconds: outbox stuck")
    p.add_argument("--gap-timeout", type=float, default=300.0, help="seconds: seq gap alert")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING"])
    p.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    if not _check_db(args.db):
        return 1
    section: dict[str, Any] = {
        "listen_host": args.http_host,
        "listen_port": args.http_port,
        "allowed_hosts": args.allowed_host,
        "audit_file": args.audit_file,
        "stuck_after_s": args.stuck_after,
        "gap_timeout_s": args.gap_timeout,
    }
    if args.allowed_origin is not None:
        section["allowed_origin"] = args.allowed_origin
    if args.config is None:
        from agent.central.dashboard_guard import ensure_token_file

        token_file = Path(args.token_file or "dashboard-token")
        try:
            if ensure_token_file(token_file):
                print(f"{token_file}: created with a new access token", file=sys.stderr)
        except OSError as e:
            print(f"{token_file}: --token-file: {e.strerror}", file=sys.stderr)
            return 1
        section["token_file"] = str(token_file)
    config = _config(args, "dashboard", section)
    if config is None:
        return 1
    d = config.dashboard
    setup_logging(args.log_level or d.log_level)
    from agent.central.audit import AuditLog
    from agent.central.dashboard import Dashboard, Thresholds
    from agent.central.dashboard_guard import DashboardGuard, load_tokens

    try:
        tls = config.tls_context("dashboard")
        password = config.mqtt_password("dashboard")
        db = config.database_target("dashboard")
        tokens = {} if d.token_file is None else load_tokens(d.token_file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except MadoguchiError as e:
        print(e, file=sys.stderr)
        return 1
    guard = DashboardGuard(
        listen_host=d.listen_host,
        tokens=tokens,
        trusted_header=d.trusted_header,
        trusted_proxies=d.trusted_proxies,
        allowed_hosts=d.allowed_hosts,
        allowed_origin=d.allowed_origin,
    )
    dashboard = Dashboard(
        config.broker.host,
        config.broker.port,
        db=db,
        topic_prefix=config.broker.topic_prefix,
        http_host=d.listen_host,
        http_port=d.listen_port,
        thresholds=Thresholds(stuck_after_s=d.stuck_after_s, gap_timeout_s=d.gap_timeout_s),
        tls_context=tls,
        guard=guard,
        audit=AuditLog(d.audit_file),
        remote_photo=d.remote_photo,
        username=d.username,
        password=password,
    )
    return run_service(dashboard.run)


def add_central_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("registry", help="reference registry consumer (stores, then acks)")
    _add_connection_flags(p)
    p.add_argument(
        "--db",
        default=None,
        help="SQLite file of the registry, or a PostgreSQL DSN (postgresql://..., no password)",
    )
    p.add_argument(
        "--client-id",
        default=None,
        help="MQTT client id (default madoguchi-registry; with --shared, one per process; "
        "a broker with use_username_as_clientid uses the certificate CN instead)",
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
    p.add_argument("--batch-max", type=int, default=512, help="messages committed together at most")
    p.add_argument("--quiet", action="store_true", help="do not print each record")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING"])
    p.add_argument(
        "--personal-retention-hours",
        type=_retention,
        default=None,
        help="hours the sealed personal part of a record is kept, then purged "
        "(default 72; 'never' keeps it)",
    )
    p.add_argument(
        "--show-data",
        action="store_true",
        help="print scanned identifiers in full (masked as 1111-****-2345 by default)",
    )
    p.add_argument(
        "--dataset-key",
        type=Path,
        default=None,
        help="Ed25519 private key (PEM): keep and publish the signed used_tickets dataset",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between retained status heartbeats (default 10)",
    )
    p.set_defaults(func=cmd_registry, registry_parser=p)
    _add_personal_parsers(p)

    _add_dashboard_parser(sub)
    _add_refdata_parsers(sub)


def _add_refdata_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`madoguchi refdata publish|status` (issue #20): the desk's reference-data commands."""
    r = sub.add_parser("refdata", help="reference datasets: publish a version, see who holds what")
    rsub = r.add_subparsers(dest="refdata_action", required=True, metavar="{publish,status}")
    pd = rsub.add_parser(
        "publish", help="validate, sign and publish a reference dataset (CSV or JSON) retained"
    )
    pd.add_argument("kind", help="recalled_lots, jpki_anchors, used_tickets, reservations or staff")
    pd.add_argument("file", type=Path, help="CSV with a header row, or a JSON list of objects")
    pd.add_argument(
        "--scope",
        default="fleet",
        help="fleet (default), site:SITE (that site's stations) or station:SITE/AGENT",
    )
    pd.add_argument("--key", type=Path, required=True, help="the Ed25519 private key (PEM)")
    pd.add_argument("--expires-at", default=None, help="ISO 8601 time the version expires")
    _add_connection_flags(pd)
    pd.set_defaults(func=cmd_refdata_publish, db=None, site=None)
    st = rsub.add_parser(
        "status", help="which station holds which version (from their retained status)"
    )
    st.add_argument(
        "--wait", type=float, default=1.0, help="seconds of quiet that end the gathering"
    )
    st.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_connection_flags(st)
    st.set_defaults(func=cmd_refdata_status, db=None)
    acl = rsub.add_parser(
        "acl", help="broker acl stanzas: each station reads its own site's datasets only"
    )
    acl.add_argument("stations", nargs="+", metavar="SITE/NAME", help="station CNs")
    acl.add_argument("--topic-prefix", default=DEFAULT_PREFIX)
    acl.set_defaults(func=cmd_refdata_acl)


def looks_central(path: str) -> bool:
    """central.toml or the station's agent.toml? ([broker] and no [agent]: central)."""
    from agent.central.config import is_central_file, read_toml

    try:
        return is_central_file(read_toml(Path(path)))
    except ConfigError:
        return False  # the station's loader reports the unreadable file


def check_central_config(path: str) -> int:
    """`madoguchi check-config central.toml`: every problem as `file: key: reason`."""
    from agent.central.config import is_postgres, load_central_config

    try:
        config = load_central_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    b = config.broker
    parts = [f"broker {b.host}:{b.port} ({'TLS' if b.tls_ca else 'plaintext'})"]
    if config.database is not None:
        parts.append("database " + ("PostgreSQL" if is_postgres(config.database.dsn) else "SQLite"))
    parts += [name for name in ("registry", "dashboard") if getattr(config, name) is not None]
    print(f"{path}: ok: central: " + ", ".join(parts))
    return 0


# -- the sealed personal part: keys, hand-off, purge (agent/personal_seal.py) -----------


def _retention(value: str) -> float:
    """Hours, or 'never' (0: kept until purge-personal)."""
    if value == "never":
        return 0.0
    try:
        hours = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of hours, or 'never'") from None
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

    d = sub.add_parser("dataset-keygen", help="new Ed25519 key pair for signing datasets")
    d.add_argument("--private", type=Path, required=True, help="private key (central, 0600)")
    d.add_argument("--public", type=Path, required=True, help="public key hex (stations pin it)")
    d.set_defaults(func=cmd_dataset_keygen)

    pd = sub.add_parser(
        "publish-dataset", help="sign and publish a reference dataset (CSV or JSON) retained"
    )
    pd.add_argument("kind", help="recalled_lots, jpki_anchors, used_tickets, reservations or staff")
    pd.add_argument("file", type=Path, help="CSV with a header row, or a JSON list of objects")
    pd.add_argument("--key", type=Path, required=True, help="the Ed25519 private key (PEM)")
    pd.add_argument("--expires-at", default=None, help="ISO 8601 time the version expires")
    pd.add_argument(
        "--site", default=None, help="publish for this site's stations only (site scope)"
    )
    _add_connection_flags(pd)
    pd.set_defaults(func=cmd_publish_dataset, db=None)


def _db(value: str) -> str | Path:
    from agent.central.stores import is_dsn

    return value if is_dsn(value) else Path(value)


def _fail(e: Exception) -> int:
    print(f"madoguchi registry: {e}", file=sys.stderr)
    return 1


def _key_file_error(e: OSError) -> int:
    """A key pair could not be written: one line naming the file (never overwritten)."""
    if isinstance(e, FileExistsError):
        return _fail(Exception(f"{e.filename}: exists; a key is never overwritten"))
    return _fail(Exception(f"{e.filename}: {e.strerror}"))


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.personal_seal import generate_keypair

    try:
        kid = generate_keypair(args.private, args.public)
    except OSError as e:
        return _key_file_error(e)
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


def cmd_dataset_keygen(args: argparse.Namespace) -> int:
    from agent.central.datasets import generate_key

    try:
        pub = generate_key(args.private, args.public)
    except OSError as e:
        return _key_file_error(e)
    print(f'dataset key: private {args.private}; stations pin [datasets] public_key = "{pub}"')
    return 0


def cmd_refdata_publish(args: argparse.Namespace) -> int:
    """`madoguchi refdata publish KIND FILE --scope ...`: the same code as publish-dataset."""
    from agent.contract.datasets import parse_scope

    try:
        _, site, agent = parse_scope(args.scope)
    except ValueError as e:
        print(f"--scope: {e}", file=sys.stderr)
        return 1
    return _publish(args, site, agent)


def cmd_publish_dataset(args: argparse.Namespace) -> int:
    """`madoguchi registry publish-dataset KIND FILE [--site S]` (kept: `refdata publish`)."""
    from agent.contract.datasets import valid_site

    if args.site is not None and not valid_site(args.site):
        print(f"--site: {args.site[:64]!r} is not a site name ([a-z0-9_-], 1-64)", file=sys.stderr)
        return 1
    return _publish(args, args.site, None)


def _publish(args: argparse.Namespace, site: str | None, agent: str | None) -> int:
    """Validate every row (all problems at once), sign, publish retained, print the version."""
    from agent.central.datasets import load_key, publish_dataset, read_rows
    from agent.contract.datasets import scope_label
    from agent.errors import MadoguchiError

    try:
        rows = read_rows(args.kind, args.file)
        key = load_key(args.key)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except MadoguchiError as e:
        return _fail(e)
    from agent.central.config import load_central_config, validate_central

    try:
        if args.config is not None:  # the broker and the registry's identity, no database
            config = load_central_config(args.config)
        else:
            raw = {"broker": _broker_from_args(args), "registry": _identity_from_args(args)}
            config = validate_central(raw, Path.cwd() / "(command line)")
        version = asyncio.run(
            publish_dataset(
                config.broker.host,
                config.broker.port,
                config.broker.topic_prefix,
                key,
                args.kind,
                rows,
                expires_at=args.expires_at,
                site=site,
                agent=agent,
                **config.mqtt_login("registry"),
            )
        )
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except aiomqtt_error() as e:
        return _fail(Exception(f"broker {config.broker.host}:{config.broker.port}: {e}"))
    where = (
        ""
        if site is None
        else f" for site {site}"
        if agent is None
        else f" for station {site}/{agent}"
    )
    label = scope_label("fleet" if site is None else "site" if agent is None else "station",
                        site, agent)  # fmt: skip
    print(f"{args.kind} v{version}: {len(rows)} row(s) published{where} (scope {label})")
    return 0


def cmd_refdata_acl(args: argparse.Namespace) -> int:
    """`madoguchi refdata acl SITE/NAME ...`: the lines to append to the broker's acl file
    (provisioning/broker/acl) so that each station reads its own site's datasets."""
    from agent.contract.datasets import DATASETS_SITE, valid_site

    bad = [s for s in args.stations if len(s.split("/")) != 2 or not all(
        valid_site(part) for part in s.split("/"))]  # fmt: skip
    for s in bad:
        print(f"{s[:80]!r}: not a station CN SITE/NAME ([a-z0-9_-], 1-64 each)", file=sys.stderr)
    if bad:
        return 1
    for cn in args.stations:
        site = cn.split("/")[0]
        print(f"user {cn}\ntopic read {args.topic_prefix}/{DATASETS_SITE}/site/{site}/#\n")
    return 0


def cmd_refdata_status(args: argparse.Namespace) -> int:
    """`madoguchi refdata status`: per station and kind, the version held and its state."""
    import json

    from agent.central.config import load_central_config, validate_central
    from agent.central.datasets import fleet_status, status_rows

    try:
        if args.config is not None:
            config = load_central_config(args.config)
        else:
            raw = {"broker": _broker_from_args(args), "registry": _identity_from_args(args)}
            config = validate_central(raw, Path.cwd() / "(command line)")
        report = asyncio.run(
            fleet_status(
                config.broker.host,
                config.broker.port,
                config.broker.topic_prefix,
                wait_s=args.wait,
                **config.mqtt_login("registry"),
            )
        )
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except aiomqtt_error() as e:
        return _fail(Exception(f"broker {config.broker.host}:{config.broker.port}: {e}"))
    rows = status_rows(report)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    for (kind, label), p in sorted(report["published"].items()):
        print(f"published {kind} {label} v{p['version']} ({p['rows']} rows)")
    for row in rows:
        if row["kind"] is None:
            print(f"{row['station']} offline")
            continue
        held = "-" if row["version"] is None else f"v{row['version']}"
        age = "" if row["age_s"] is None else f" age {row['age_s']:.0f}s"
        why = f": {row['reason']}" if "reason" in row else ""
        print(f"{row['station']} {row['kind']} {held}{age} {row['state']}{why}")
    if not rows:
        print("no station status on the broker", file=sys.stderr)
    return 0


def aiomqtt_error() -> type[Exception]:
    import aiomqtt

    return aiomqtt.MqttError
