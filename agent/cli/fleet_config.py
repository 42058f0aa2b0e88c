"""`madoguchi fleet config push --site S --agent A FILE`: remote configuration with
rollback (issue #22, point 3; docs/fleet-config.md)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, MadoguchiError


def add_config_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`config push` under the `fleet` group."""
    from agent.cli.central import _add_connection_flags

    p = sub.add_parser("config", help="push an agent.toml to a station (rolled back on lockout)")
    csub = p.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    push = csub.add_parser(
        "push",
        help="send FILE over cmd/config: validated on the station, applied, confirmed or "
        "rolled back by the station itself",
    )
    _add_connection_flags(push)
    push.add_argument("--site", required=True, help="the station's site id")
    push.add_argument("--agent", required=True, help="the station's name within the site")
    push.add_argument("file", help="the new agent.toml, whole")
    push.add_argument(
        "--revision",
        default=None,
        help="revision id reported back in status (default: the first 12 hex of its sha256)",
    )
    push.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also wait this long for the station to confirm the revision or roll it back",
    )
    push.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the command's result"
    )
    push.add_argument(
        "--audit-file",
        default=None,
        help="audit log (default: central.toml's dashboard.audit_file; with flags: "
        "fleet-audit.jsonl)",
    )
    push.set_defaults(func=run_config_push, db=None)


def run_config_push(args: argparse.Namespace) -> int:
    from agent.cli.central import _config, _who

    try:
        text = Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        print(f"{args.file}: cannot read: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    section: dict[str, Any] = {
        # the push acts as the dashboard role (its certificate and ACL) but serves no page
        "trusted_header": "X-Madoguchi-Cli",
        "audit_file": args.audit_file or "fleet-audit.jsonl",
    }
    config = _config(args, "dashboard", section)
    if config is None:
        return 1
    revision = args.revision or hashlib.sha256(text.encode()).hexdigest()[:12]
    from agent.central.audit import AuditLog
    from agent.central.fleet_config import ConfigPusher

    try:
        audit = AuditLog(Path(args.audit_file) if args.audit_file else config.dashboard.audit_file)
        pusher = ConfigPusher(
            config.broker.host,
            config.broker.port,
            audit=audit,
            who=_who(),
            topic_prefix=config.broker.topic_prefix,
            tls_context=config.tls_context("dashboard"),
            username=config.dashboard.username,
            password=config.mqtt_password("dashboard"),
            result_timeout_s=args.timeout,
        )
        outcome = asyncio.run(pusher.push(args.site, args.agent, text, revision, wait_s=args.wait))
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except MadoguchiError as e:
        print(e, file=sys.stderr)
        return 1
    except Exception as e:  # aiomqtt.MqttError, without importing it for the parser
        if type(e).__name__ != "MqttError":
            raise
        print(f"broker {config.broker.host}:{config.broker.port}: {e}", file=sys.stderr)
        return 1
    where = f"{args.site}/{args.agent}"
    if outcome.outcome == "refused":
        print(f"{where}: revision {revision} refused: {outcome.reason}", file=sys.stderr)
        for problem in outcome.result.get("problems") or []:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if outcome.outcome == "applied":
        after = outcome.result.get("rollback_after_s")
        print(f"{where}: revision {revision} applied (rolled back unless confirmed in {after} s)")
        return 0
    if outcome.outcome == "confirmed":
        print(f"{where}: revision {revision} applied and confirmed")
        return 0
    print(f"{where}: revision {revision} {outcome.outcome}: {outcome.reason}", file=sys.stderr)
    return 1


def add_ca_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ca-serve` under the `fleet` group: the signer for certificate renewal."""
    from agent.cli.central import _add_connection_flags

    p = sub.add_parser(
        "ca-serve",
        help="sign the renewal CSRs stations send over MQTT (allowlisted names only)",
    )
    _add_connection_flags(p)
    p.add_argument("--ca-cert", required=True, type=Path, help="the fleet CA certificate (PEM)")
    p.add_argument("--ca-key", required=True, type=Path, help="the fleet CA private key (PEM)")
    p.add_argument(
        "--allow",
        required=True,
        type=Path,
        help="stations that may renew, one site/name a line (# comments; read at each CSR)",
    )
    p.add_argument("--days", type=float, default=30.0, help="validity of each certificate")
    p.add_argument("--audit-file", default="ca-serve-audit.jsonl", help="audit log (JSONL)")
    p.set_defaults(func=run_ca_serve, db=None)


def run_ca_serve(args: argparse.Namespace) -> int:
    from agent.cli.central import _config
    from agent.cli.service import run_service, setup_logging

    section: dict[str, Any] = {"trusted_header": "X-Madoguchi-Cli", "audit_file": args.audit_file}
    config = _config(args, "dashboard", section)
    if config is None:
        return 1
    setup_logging("INFO")
    from agent.central.audit import AuditLog
    from agent.central.signer import CsrSigner

    try:
        signer = CsrSigner(
            config.broker.host,
            config.broker.port,
            ca_cert=args.ca_cert,
            ca_key=args.ca_key,
            allow=args.allow,
            days=args.days,
            topic_prefix=config.broker.topic_prefix,
            tls_context=config.tls_context("dashboard"),
            username=config.dashboard.username,
            password=config.mqtt_password("dashboard"),
            audit=AuditLog(Path(args.audit_file)),
        )
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    return run_service(signer.run)
