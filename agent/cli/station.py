"""The station's commands: run, check-config, outbox stats, enroll."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from agent.cli.checks import check_config_file
from agent.cli.service import run_service, setup_logging
from agent.config import Config, config_warnings, load_config
from agent.errors import ConfigError, EnrollError, MadoguchiError
from agent.logsetup import error_line
from agent.station.enroll import DEFAULT_DIR, install_cert, make_key_and_csr
from agent.station.lock import PRIVATE_UMASK


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as e:
        for p in e.problems:
            print(error_line(p), file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from agent.station.remote_config import load_or_roll_back

    # the same checks as check-config, before anything starts: a missing TLS file or
    # extra is one line and exit 1, not a traceback from inside the task group; a remote
    # configuration on trial that does not start is rolled back here (remote_config.py)
    config, problems = load_or_roll_back(Path(args.config))
    for p in problems:
        print(error_line(p), file=sys.stderr)
    if config is None:
        return 1
    setup_logging(config.agent.log_level, config.agent.log_format)
    # every file the agent creates is its own alone, whatever umask the shell had
    os.umask(PRIVATE_UMASK)
    for w in config_warnings(config):
        logging.getLogger("agent").warning("%s", w)
    from agent.station.app import run_station

    return run_service(lambda stop: run_station(config, stop))


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.cli.central import check_central_config, looks_central

    if looks_central(args.path):
        return check_central_config(args.path)
    # the same function as the station's cmd/config (agent/station/checks.py)
    config, problems, notes = check_config_file(args.path, args.user, config_only=args.config_only)
    if config is None:
        for p in problems:
            print(error_line(p), file=sys.stderr)
        return 1
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(
        f"{args.path}: ok: site {config.agent.site}, agent {config.agent.name}, "
        f"{len(config.devices)} device(s)"
    )
    for dev in config.devices:
        print(f"  {dev.name}: driver {dev.driver}, profile {dev.profile}")
    for line in [*config_warnings(config), *notes]:
        print(line)
    return 0


def cmd_outbox_stats(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from agent.station.outbox import read_stats

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


def run_enroll(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        if args.install is not None:
            dest, cn = install_cert(Path(args.install), out)
            print(f"installed {dest} for {cn}")
            return 0
        if not args.site or not args.name:
            print("madoguchi enroll: --site and --name are required (or --install CERT)")
            return 2
        key_path, csr_path, new = make_key_and_csr(args.site, args.name, out)
    except EnrollError as e:
        print(f"madoguchi enroll: {e}", file=sys.stderr)
        return 1
    print(f"{'created' if new else 'kept existing'} private key {key_path} (never copy it off)")
    print(f"certificate request {csr_path} for CN {args.site}/{args.name}:")
    print(f"  send it to the fleet CA, then: madoguchi enroll --install <certificate> --out {out}")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    import asyncio

    from agent.station.supervisor import supervise

    setup_logging("INFO", "text")
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    return asyncio.run(supervise(args.releases, rest or ["run"]))


def _add_enroll_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "enroll",
        help="make this station's TLS key and CSR (CN site/name), or install its certificate",
    )
    p.add_argument("--site", help="site id, e.g. toda-city-hall-1f")
    p.add_argument("--name", help="station name within the site, e.g. station-03")
    p.add_argument("--install", metavar="CERT", help="install the CA-signed certificate")
    p.add_argument(
        "--out", default=str(DEFAULT_DIR), help=f"credentials directory (default {DEFAULT_DIR})"
    )
    p.set_defaults(func=run_enroll)


def add_station_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run the agent in the foreground (logs to stderr)")
    p.add_argument("--config", required=True, help="agent.toml")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a configuration without opening devices")
    p.add_argument("path", help="agent.toml")
    p.add_argument(
        "--user",
        default=None,
        help="also check that this user (the service's, e.g. madoguchi) can read every "
        "file the configuration names",
    )
    p.add_argument(
        "--config-only",
        action="store_true",
        help="check the configuration alone, not the files it names nor the installed "
        "extras (install.sh, before anything is installed)",
    )
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("outbox", help="inspect the local outbox")
    osub = p.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    s = osub.add_parser("stats", help="counts, oldest unconfirmed record, size")
    s.add_argument("--config", required=True, help="agent.toml")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_outbox_stats)

    _add_enroll_parser(sub)

    p = sub.add_parser(
        "supervise",
        help="start the agent from RELEASES/current, restart it, undo unconfirmed release switches",
    )
    p.add_argument(
        "--releases", required=True, help="the releases directory ([agent] releases_dir)"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the agent's arguments, after --")
    p.set_defaults(func=cmd_supervise)
