"""`madoguchi` command line: one subcommand per job, each a thin shell over a module.

The commands live with their side: `station.py` (run, check-config, outbox, enroll),
`central.py` (registry, dashboard), `tools.py` (decode, hid-replay, card-info,
scan-image) and `demo.py`.
"""

from __future__ import annotations

import argparse
import sys

from agent import __version__
from agent.cli.central import add_central_parsers
from agent.cli.station import add_station_parsers
from agent.cli.tools import add_tool_parsers


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.cli.demo import run_demo

    return run_demo(loop=args.loop, scans=args.scans)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="madoguchi",
        description="Edge agent of municipal reception stations: scans -> durable outbox -> MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"madoguchi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_station_parsers(sub)
    add_central_parsers(sub)
    p = sub.add_parser("demo", help="broker + registry + agent + simulated scanner, end to end")
    p.add_argument("--loop", action="store_true", help="keep scanning until Ctrl-C")
    p.add_argument("--scans", type=int, default=0, help="how many scans (default: one set)")
    p.set_defaults(func=cmd_demo)
    add_tool_parsers(sub)
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
