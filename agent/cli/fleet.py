"""`madoguchi fleet ...`: release keys, signed release manifests, rollouts (docs/fleet.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from pathlib import Path
from typing import Any

from agent.contract.releases import CONFIG_SCHEMA, OUTBOX_SCHEMA


def cmd_release_keygen(args: argparse.Namespace) -> int:
    from agent.central.datasets import generate_key

    try:
        pub = generate_key(args.private, args.public)
    except OSError as e:
        print(f"{e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    print(f'release key: private {args.private}; stations pin [agent] release_public_key = "{pub}"')
    return 0


def cmd_release_sign(args: argparse.Namespace) -> int:
    from agent.central.datasets import load_key
    from agent.central.fleet import sign_release, write_manifest
    from agent.contract.messages import MessageError
    from agent.errors import MadoguchiError

    out = args.out or args.bundle.with_name(args.bundle.name + ".release.json")
    try:
        key = load_key(args.key)
        manifest = sign_release(
            key,
            args.bundle,
            args.version,
            min_config_schema=args.min_config_schema,
            outbox_schema=args.outbox_schema,
        )
        write_manifest(manifest, out)
    except (MadoguchiError, MessageError) as e:
        print(str(e), file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{e.filename or args.bundle}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"release {args.version}: {len(manifest['files'])} file(s) signed -> {out}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from agent.central.fleet import canary, offer, parse_share, site_stations
    from agent.cli.central import aiomqtt_error
    from agent.contract.messages import MessageError
    from agent.contract.releases import parse_manifest

    manifest_path = args.manifest or Path(str(args.bundle) + ".release.json")
    try:
        manifest: dict[str, Any] = json.loads(Path(manifest_path).read_bytes())
        m = parse_manifest(manifest)
        share = None if args.canary is None else parse_share(args.canary)
    except OSError as e:
        print(f"{manifest_path}: {e.strerror}", file=sys.stderr)
        return 1
    except (MessageError, ValueError) as e:
        print(f"{manifest_path}: {e}", file=sys.stderr)
        return 1
    if m.version != args.to:
        print(f"{manifest_path}: is release {m.version}, not --to {args.to}", file=sys.stderr)
        return 1
    from agent.errors import ConfigError

    try:
        broker = _fleet_broker(args)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except ssl.SSLError as e:
        print(f"TLS files: {e}", file=sys.stderr)
        return 1

    async def go() -> dict[str, dict[str, Any]]:
        agents = [args.agent] if args.agent else await site_stations(broker, args.site)
        if share is not None:
            agents = canary(agents, share)
        if not agents:
            return {}
        print(f"offering {m.version} to {args.site}: {', '.join(agents)}")
        results = await offer(
            broker,
            args.site,
            agents,
            manifest,
            args.staged,
            bundle=Path(args.bundle),
            deadline_s=args.deadline,
            answer_s=args.wait,
        )
        for a in agents:
            r = results.get(a)
            if r is None:
                line = "no answer"
            elif r.get("ok") and args.staged is None and not r.get("downloaded"):
                line = "download not finished (offer again to resume)"
            elif r.get("ok"):
                line = "downloaded, switching" if r.get("downloaded") else str(r.get("state"))
            else:
                line = f"refused: {r.get('error')}"
            print(f"{args.site}/{a}: {line}")
        return {a: results.get(a, {}) for a in agents}

    try:
        results = asyncio.run(go())
    except aiomqtt_error() as e:
        print(f"broker {broker.host}:{broker.port}: {e}", file=sys.stderr)
        return 1
    if not results:
        print(f"site {args.site}: no station with a retained status", file=sys.stderr)
        return 1
    if args.staged is None:
        return 0 if all(r.get("ok") and r.get("downloaded") for r in results.values()) else 1
    return 0 if all(r.get("ok") for r in results.values()) else 1


def _fleet_broker(args: argparse.Namespace) -> Any:
    """The broker and the dashboard's identity (it may write cmd/+): from central.toml's
    [broker] and [dashboard], or from the connection flags."""
    from agent.central.fleet import Broker

    if args.config is not None:
        from agent.central.config import load_central_config

        config = load_central_config(args.config)
        return Broker(
            config.broker.host,
            config.broker.port,
            config.broker.topic_prefix,
            **config.mqtt_login("dashboard"),
        )
    context = None
    if args.tls_ca is not None:
        context = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert is not None:
            context.load_cert_chain(args.tls_cert, args.tls_key)
    password = None
    if args.password_file is not None:
        password = Path(args.password_file).read_text().splitlines()[0].strip()
    return Broker(
        args.host or "127.0.0.1",
        args.port or 1883,
        args.topic_prefix,
        tls_context=context,
        username=args.username,
        password=password,
    )


def add_fleet_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.cli.central import _add_connection_flags
    from agent.cli.fleet_config import add_ca_parser, add_config_parser

    fleet = sub.add_parser(
        "fleet",
        help="fleet operations: signed releases and rollouts, remote configuration, "
        "certificate renewal (each with automatic rollback where it applies)",
    )
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")
    add_config_parser(fsub)  # fleet config push (agent/cli/fleet_config.py)
    add_ca_parser(fsub)  # fleet ca-serve

    k = fsub.add_parser("release-keygen", help="new Ed25519 key pair for signing releases")
    k.add_argument("--private", type=Path, required=True, help="private key (central, 0600)")
    k.add_argument("--public", type=Path, required=True, help="public key hex (stations pin it)")
    k.set_defaults(func=cmd_release_keygen)

    r = fsub.add_parser("release", help="release manifests")
    rsub = r.add_subparsers(dest="release_command", required=True, metavar="RELEASE_COMMAND")
    s = rsub.add_parser("sign", help="write BUNDLE.release.json: version, sha256 of every file")
    s.add_argument("bundle", type=Path, help="the bundle tarball (make bundle)")
    s.add_argument("--key", type=Path, required=True, help="the release private key (PEM)")
    s.add_argument("--version", required=True, help="the release version (a directory name)")
    s.add_argument("--out", type=Path, default=None, help="manifest file (BUNDLE.release.json)")
    s.add_argument("--min-config-schema", type=int, default=CONFIG_SCHEMA)
    s.add_argument(
        "--outbox-schema", type=int, default=OUTBOX_SCHEMA, help="the release's outbox schema"
    )
    s.set_defaults(func=cmd_release_sign)

    u = fsub.add_parser("update", help="offer a signed release (cmd/update) to stations")
    u.add_argument("--to", required=True, help="the release version")
    u.add_argument(
        "--bundle", required=True, help="the bundle tarball; served to the stations over MQTT"
    )
    u.add_argument(
        "--staged",
        default=None,
        help="instead: the path where the bundle is already staged on every station",
    )
    u.add_argument("--manifest", type=Path, default=None, help="(default BUNDLE.release.json)")
    u.add_argument("--site", required=True, help="the site")
    u.add_argument("--agent", default=None, help="one station of the site (default: all)")
    u.add_argument("--canary", default=None, help="a share of the site's stations, e.g. 10%%")
    u.add_argument("--deadline", type=float, default=None, help="health-check seconds")
    u.add_argument(
        "--wait", type=float, default=600.0, help="seconds to wait for answers and downloads"
    )
    _add_connection_flags(u)
    u.set_defaults(func=cmd_update)
