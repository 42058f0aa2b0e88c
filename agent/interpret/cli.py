"""`madoguchi decode`: what the agent makes of a string, for a technician checking a scanner.

The scanned text is the technician's own input and goes to stdout only, never to logs.
GS (0x1D) is hard to type, so the literal four characters `\\x1d` in TEXT stand for it.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from typing import Any

from agent.interpret import interpret, split_aim

GS_ESCAPE = "\\x1d"


def unescape(text: str) -> str:
    """The literal `\\x1d` (any case) -> GS; nothing else is touched."""
    if "\\" not in text:
        return text
    return text.replace(GS_ESCAPE, "\x1d").replace("\\x1D", "\x1d")


def visible(text: str) -> str:
    """Control characters as `\\xNN` so GS, CR and friends show up on a terminal."""
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 else c for c in text
    )


def decode(
    text: str, aim: str | None, gs_substitute: str | None, today: date | None
) -> dict[str, Any]:
    """The same steps as the station: split the AIM identifier unless given, interpret."""
    text = unescape(text)
    body = text
    if aim is None:
        aim, body = split_aim(text)
    interpretation = interpret(body, symbology=aim, gs_substitute=gs_substitute, today=today)
    return {"text": text, "symbology": aim, "interpretation": interpretation}


def _human(decoded: dict[str, Any]) -> str:
    interp = decoded["interpretation"]
    lines = [
        f"text:       {visible(decoded['text'])}",
        f"symbology:  {decoded['symbology'] or '-'}",
        f"type:       {interp['type']}",
        f"valid:      {'yes' if interp['valid'] else 'NO'}",
        f"problems:   {', '.join(interp['problems']) or '-'}",
    ]
    fields = interp["fields"]
    if fields:
        lines.append("fields:")
        for key, value in fields.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    lines.append(f"  {key}({sub}): {visible(str(v))}")
            else:
                lines.append(f"  {key}: {visible(str(value))}")
    return "\n".join(lines)


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _char(value: str) -> str:
    value = unescape(value)
    if len(value) != 1:
        raise argparse.ArgumentTypeError("the GS substitute is exactly one character")
    return value


def run_decode(args: argparse.Namespace) -> int:
    """Print the interpretation; exit 0 when the read is valid, 1 when it is not."""
    decoded = decode(args.text, args.aim, args.gs_substitute, args.today)
    if args.json:
        print(json.dumps(decoded, ensure_ascii=False))
    else:
        print(_human(decoded))
    return 0 if decoded["interpretation"]["valid"] else 1


def add_decode_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`madoguchi decode TEXT [--aim ID] [--gs-substitute CHAR] [--today DATE] [--json]`."""
    p = sub.add_parser(
        "decode",
        help="interpret a scanned string as the station would",
        description=(
            "Interpret TEXT exactly as the station interprets a scan. A leading AIM "
            "identifier (]d2, ]C1, ]E0 ...) is split off unless --aim is given. Type the "
            "GS1 separator (GS, 0x1D) as the four characters \\x1d. Exit status 0 when "
            "the read is valid, 1 when it is not."
        ),
    )
    p.add_argument("text", metavar="TEXT", help="the scanned string (\\x1d = GS)")
    p.add_argument("--aim", metavar="ID", help="AIM symbology identifier, e.g. ]d2")
    p.add_argument(
        "--gs-substitute",
        metavar="CHAR",
        type=_char,
        help="character the scanner sends in place of GS (as gs_substitute in the profile)",
    )
    p.add_argument(
        "--today",
        metavar="YYYY-MM-DD",
        type=_date,
        help="judge expiry against this date (YYYY-MM-DD)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=run_decode)
