"""`madoguchi card-info`: a technician's look at the card in a reader.

Without a PIN: type, ATR, UID and the user-auth certificate fields. With
`--with-pin`: the 4 attributes from the 券面事項入力補助AP, under the same PIN
rules as the agent (counter first, refuse below 2 tries, VERIFY once). The PIN
is read without echo from the terminal (or one line from stdin when stdin is
not a terminal, for scripts and tests) and is never logged or kept.
Works while the agent runs: pcscd shares the reader, and each read is one
PC/SC transaction.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from agent.errors import ConfigError, MadoguchiError, PinRefused


def add_card_info_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("card-info", help="show the IC card in a PC/SC reader")
    p.add_argument(
        "--reader",
        default=None,
        help="reader name or glob (default: the --device's pattern, else the first reader)",
    )
    p.add_argument("--config", default=None, help="agent.toml, to use a device's settings")
    p.add_argument("--device", default=None, help="pcsc device in --config")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument(
        "--with-pin",
        action="store_true",
        help="ask for the card's 4-digit PIN (no echo) and show the 4 attributes",
    )
    p.set_defaults(func=run_card_info)


def _settings(args: argparse.Namespace) -> tuple[str, bool]:
    """(reader glob, read_my_number) from the flags and, if given, the configured device."""
    reader, read_my_number = "*", False
    if args.config:
        from agent.config import PcscDevice, load_config

        config = load_config(args.config)
        devices = [d for d in config.devices if isinstance(d, PcscDevice)]
        if args.device:
            devices = [d for d in devices if d.name == args.device]
        if not devices:
            raise ConfigError([f"{args.config}: devices: no pcsc device {args.device or ''}"])
        reader, read_my_number = devices[0].reader, devices[0].read_my_number
    if args.reader:
        reader = args.reader
    return reader, read_my_number


def _read_pin() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("PIN (4 digits, not shown): ")
    return sys.stdin.readline().strip()


def run_card_info(args: argparse.Namespace) -> int:
    from agent.drivers.pcsc import read_card_info, read_card_now

    try:
        reader, read_my_number = _settings(args)
        card = read_card_now(reader)
        out: dict[str, Any] = {"card": card}
        if args.with_pin:
            info = read_card_info(card["reader"], _read_pin(), read_my_number=read_my_number)
            out["card_info"] = info.personal()
    except PinRefused as e:
        left = "" if e.tries_left is None else f" (tries left: {e.tries_left})"
        print(f"PIN refused: {e.reason}{left}", file=sys.stderr)
        return 3
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 1
    except MadoguchiError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        print(_human(out))
    return 0


def _human(out: dict[str, Any]) -> str:
    card = out["card"]
    lines = [
        f"reader:     {card['reader']}",
        f"card type:  {card['card_type']}",
        f"ATR:        {card['atr']}",
        f"UID:        {card['uid'] or '(not given)'}",
    ]
    cert = card.get("auth_cert")
    if cert:
        lines += [
            f"auth cert serial: {cert['serial']}",
            f"  issuer:         {cert['issuer']}",
            f"  valid:          {cert['not_before']} .. {cert['not_after']}",
        ]
    for p in card.get("problems", []):
        lines.append(f"PROBLEM:    {p}")
    info = out.get("card_info")
    if info:
        lines += [
            f"name:       {info['name']}",
            f"address:    {info['address']}",
            f"birth date: {info['birth_date']}",
            f"sex:        {info['sex']}",
        ]
        if "my_number" in info:
            lines.append(f"My Number:  {info['my_number']}")
    return "\n".join(lines)
