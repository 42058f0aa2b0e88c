"""`madoguchi` command line: one subcommand per job, each a thin shell over a module.

The commands live with their side: `station.py` (run, check-config, outbox, enroll),
`central.py` (registry, dashboard), `tools.py` (decode, hid-replay, card-info,
scan-image) and `demo.py`.
"""

from __future__ import annotations

import argparse
import sys

from agent import __version__
from agent.cli.station import add_station_parsers
from agent.errors import ConfigError, MadoguchiError
from agent.logsetup import error_line


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.cli.demo import run_demo

    return run_demo(loop=args.loop, scans=args.scans)


def _positive(text: str) -> int:
    """--scans: a whole number of 1 or more (0 used to mean one set, -2 ran none)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


#: the commands `agent/cli/station.py` parses: for these the central and tool modules
#: are not imported nor their parsers built (1.6 MB of a running agent, issue #18)
STATION_COMMANDS = frozenset({"run", "check-config", "outbox", "enroll"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser; only the station's when `command` is one of them."""
    parser = argparse.ArgumentParser(
        prog="madoguchi",
        description="Edge agent of municipal reception stations: scans -> durable outbox -> MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"madoguchi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_station_parsers(sub)
    if command in STATION_COMMANDS:
        return parser
    from agent.cli.central import add_central_parsers
    from agent.cli.tools import add_tool_parsers

    add_central_parsers(sub)
    _add_fleet_parsers(sub)
    p = sub.add_parser("demo", help="broker + registry + agent + simulated scanner, end to end")
    p.add_argument("--loop", action="store_true", help="keep scanning until Ctrl-C")
    p.add_argument(
        "--scans", type=_positive, default=0, help="how many scans, 1 or more (default: one set)"
    )
    p.set_defaults(func=cmd_demo)
    add_tool_parsers(sub)
    return parser


def _add_fleet_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`madoguchi fleet ...` (issue #22): each operation's parser lives in its own module
    (here, not in central.py: fleet_config.py uses central.py's connection flags)."""
    from agent.cli.fleet_config import add_ca_parser, add_config_parser

    fleet = sub.add_parser("fleet", help="fleet operations: remote configuration, certificates")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    add_config_parser(fsub)
    add_ca_parser(fsub)


#: Python module -> the extra that installs it, for "not installed" lines
MODULE_EXTRAS = {
    "uvicorn": "kiosk",
    "starlette": "kiosk",
    "psycopg": "central",
    "serial": "serial",
    "serial_asyncio_fast": "serial",
    "evdev": "hid",
    "pyudev": "hid",
    "smartcard": "card",
    "zxingcpp": "camera",
    "numpy": "camera",
    "PIL": "camera",
    "linuxpy": "camera",
    "biip": "interpret",
    "stdnum": "interpret",
}
#: the central commands get their web stack from the central extra
CENTRAL_COMMANDS = frozenset({"registry", "dashboard"})


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def user_error(exc: BaseException, command: str) -> list[str] | None:
    """The line(s) for an error the user can fix (config, missing extra, file, server),
    or None for a bug, which keeps its traceback."""
    if isinstance(exc, ConfigError):
        return exc.problems
    if isinstance(exc, MadoguchiError):
        return [str(exc)]
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        extra = MODULE_EXTRAS.get(top)
        if extra == "kiosk" and command in CENTRAL_COMMANDS:
            extra = "central"
        fix = f": pip install 'madoguchi[{extra}]'" if extra else ""
        return [f"madoguchi {command}: Python module '{top}' is not installed{fix}"]
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else command
        return [f"{where}: {exc.strerror}"]
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error a user can cause is one line per problem and exit 1."""
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv and not argv[0].startswith("-") else None
    args = build_parser(first).parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        leaves = _leaves(exc)
        lines = [user_error(leaf, args.command) for leaf in leaves]
        if any(line is None for line in lines) or not leaves:
            raise
        seen: dict[str, None] = {}
        for group in lines:
            for line in group or []:
                seen.setdefault(" ".join(line.split()), None)  # one line, even from a library
        for line in seen:
            print(error_line(line), file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
