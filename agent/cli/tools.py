"""The technician's tools: decode, hid-replay, card-info, scan-image (hid-watch: hidwatch.py).

Each reads what a device gave (a string, an evtest capture, a card, image files) and
prints what the station would make of it; none needs a configuration or a broker.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import CaptureError, DriverMissing
from agent.interpret import interpret, split_aim
from agent.keymap import (
    EV_KEY,
    Decoder,
    Fault,
    KeyEvent,
    Scan,
    parse_evtest,
)
from agent.keymap import (
    decode as decode_keys,
)

if TYPE_CHECKING:
    pass
import getpass

from agent.errors import ConfigError, MadoguchiError, PinRefused

# -- madoguchi decode ----------------------------------------------------------------
# `madoguchi decode`: what the agent makes of a string, for a technician checking a scanner.
#
# The scanned text is the technician's own input and goes to stdout only, never to logs.
# GS (0x1D) is hard to type, so the literal four characters `\x1d` in TEXT stand for it.


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


# -- madoguchi hid-replay ------------------------------------------------------------
# Decode an evtest capture of a keyboard-mode scanner (`madoguchi hid-replay`).


def add_hid_replay_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "hid-replay",
        help="decode an evtest capture of a keyboard-mode scanner, one scan per line",
        description="Reads the text `evtest` prints (header, Event: lines, SYN lines) and "
        "writes each decoded scan on its own line; faults go to stderr. Exit 0 when every "
        "scan decoded, 1 when any faulted or the file holds no key events (not an evtest "
        "capture: random bytes, /dev/null), 2 when the file is unreadable.",
    )
    p.add_argument("file", metavar="FILE", help="evtest output ('-' for stdin)")
    p.add_argument(
        "--layout", required=True, choices=["us", "jp106"], help="the layout the scanner is set to"
    )
    p.add_argument(
        "--terminator",
        action="append",
        metavar="KEY",
        help="key that ends a scan; repeat for more (default: KEY_ENTER and KEY_KPENTER)",
    )
    p.add_argument(
        "--gs-key",
        action="append",
        metavar="COMBO",
        help="combination meaning GS, e.g. 'ctrl+]' (default), 'KEY_F8'; repeatable",
    )
    p.add_argument("--idle-timeout-ms", type=int, default=500, help="default 500")
    p.add_argument("--min-key-rate", type=float, default=None, help="keys/s; off by default")
    p.add_argument(
        "--show-control",
        action="store_true",
        help="print control characters visibly (<GS>, <RS>, <EOT>, <TAB>)",
    )
    p.set_defaults(func=run_hid_replay)


_VISIBLE = {"\x1d": "<GS>", "\x1e": "<RS>", "\x04": "<EOT>", "\t": "<TAB>"}


def run_hid_replay(args: argparse.Namespace) -> int:
    try:
        decoder = Decoder(
            args.layout,
            terminators=args.terminator or ("KEY_ENTER", "KEY_KPENTER"),
            gs_keys=args.gs_key or ("ctrl+]",),
            idle_timeout_ms=args.idle_timeout_ms,
            min_key_rate=args.min_key_rate,
        )
    except ValueError as e:
        print(f"hid-replay: {e}", file=sys.stderr)
        return 2
    try:
        if args.file == "-":
            lines: Iterable[str] = sys.stdin.read().splitlines()
        else:
            lines = Path(args.file).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        print(f"hid-replay: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    faults = 0
    keys = [0]  # key events seen: none at all means this was not an evtest capture

    def counted(events: Iterable[KeyEvent]) -> Iterator[KeyEvent]:
        for ev in events:
            if ev.type == EV_KEY:
                keys[0] += 1
            yield ev

    try:
        for result in decode_keys(counted(parse_evtest(lines)), decoder):
            if isinstance(result, Scan):
                text = result.text
                if args.show_control:
                    text = "".join(_VISIBLE.get(c, c) for c in text)
                print(text, flush=True)
            else:
                faults += 1
                print(f"hid-replay: {args.file}: {_when(result)}{result.reason}", file=sys.stderr)
    except CaptureError as e:
        print(f"hid-replay: {args.file}: {e} (is this an evtest capture?)", file=sys.stderr)
        return 1
    if not keys[0]:
        print(
            f"hid-replay: {args.file}: no key events (not an evtest capture of a scanner?)",
            file=sys.stderr,
        )
        return 1
    return 1 if faults else 0


def _when(f: Fault) -> str:
    return f"at {f.started:.6f}: " if f.started is not None else ""


# -- madoguchi card-info -------------------------------------------------------------
# `madoguchi card-info`: a technician's look at the card in a reader.
#
# Without a PIN: type, ATR, UID and the user-auth certificate fields. With
# `--with-pin`: the 4 attributes from the 券面事項入力補助AP, under the same PIN
# rules as the agent (counter first, refuse below 2 tries, VERIFY once). The PIN
# is read without echo from the terminal (or one line from stdin when stdin is
# not a terminal, for scripts and tests) and is never logged or kept.
# Works while the agent runs: pcscd shares the reader, and each read is one
# PC/SC transaction.


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
    p.add_argument(
        "--wait",
        action="store_true",
        help="like pcsc_scan: print every reader and card change until Ctrl-C (no PIN)",
    )
    p.add_argument(
        "--prove",
        action="store_true",
        help="ask for the 4-digit auth PIN (no echo) and run the possession proof",
    )
    p.add_argument(
        "--anchor",
        action="append",
        default=None,
        help="SHA-256 fingerprint of a trusted JPKI auth CA (repeatable; default: the "
        "--device's jpki_anchors, else the J-LIS CAs)",
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


def _anchors(args: argparse.Namespace) -> frozenset[str]:
    """--anchor, else the configured device's `jpki_anchors`, else the J-LIS defaults."""
    from agent.config import DEFAULT_JPKI_ANCHORS, PcscDevice, load_config

    if args.anchor:
        return frozenset(a.strip().lower().replace(":", "") for a in args.anchor)
    if args.config:
        for d in load_config(args.config).devices:
            if isinstance(d, PcscDevice) and (not args.device or d.name == args.device):
                return frozenset(d.jpki_anchors)
    return frozenset(DEFAULT_JPKI_ANCHORS)


def run_card_info(args: argparse.Namespace) -> int:
    from agent.drivers.scard import prove_possession_now, read_card_info, read_card_now

    if args.wait:
        return _watch_cards(args)
    try:
        reader, read_my_number = _settings(args)
        anchors = _anchors(args)
        card = read_card_now(reader, anchors=anchors)
        out: dict[str, Any] = {"card": card}
        if args.prove:
            out["card_auth"] = prove_possession_now(card["reader"], _read_pin(), anchors)
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
        print(_card_human(out))
    return 0


def _watch_cards(args: argparse.Namespace) -> int:
    """`card-info --wait`: one line per change (JSON lines with --json) until Ctrl-C."""
    from agent.drivers.scard import watch_cards

    if args.with_pin:
        print(
            "card-info: --wait shows cards coming and going; --with-pin reads one", file=sys.stderr
        )
        return 1
    try:
        reader, _ = _settings(args)
        if not args.json:
            print(f"waiting for cards in readers matching {reader!r} (Ctrl-C ends)", flush=True)
        for change in watch_cards(reader):
            change["time"] = datetime.now().astimezone().isoformat(timespec="seconds")
            if args.json:
                print(json.dumps(change, ensure_ascii=False), flush=True)
            else:
                print(_change_human(change), flush=True)
    except KeyboardInterrupt:
        return 0
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 1
    except MadoguchiError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


def _change_human(change: dict[str, Any]) -> str:
    head = f"{change['time']}  {change['reader']}: "
    event: str = change["event"]
    if event != "inserted":
        said = {
            "reader_added": "reader present",
            "reader_removed": "reader gone",
            "removed": "card removed",
        }
        return head + said.get(event, event)
    card = change["card"]
    line = f"card inserted: {card['card_type']}, ATR {card['atr']}, UID {card['uid'] or '-'}"
    cert = card.get("auth_cert")
    if cert:
        line += f", auth cert serial {cert['serial']}"
    for p in card.get("problems", []):
        line += f", PROBLEM {p}"
    return head + line


def _card_human(out: dict[str, Any]) -> str:
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
    auth = out.get("card_auth") or card.get("card_auth")
    if auth:
        lines += [
            f"verdict:    {auth['verdict']}",
            f"  chain:      {auth['chain']}" + (f" ({auth['reason']})" if "reason" in auth else ""),
            f"  generation: {auth['generation']}",
            f"  revocation: {auth['revocation']}",
        ]
        if "possession" in auth:
            lines.append(f"  possession: {auth['possession']}")
    elif card["card_type"] == "unknown":
        lines.append("generation: unsupported card generation (no known application answers)")
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


# -- madoguchi scan-image ------------------------------------------------------------
# `madoguchi scan-image FILE... [--json]`: what the camera would read in these pictures.
#
# A technician's tool (and the tests'): the same zxing-cpp decoder and the
# same interpretation as the camera driver and the supervisor, on image files,
# without a configuration, a camera or a broker. Exit status: 0 when every
# file held at least one code, 1 when some file held none, 2 when a file could
# not be read as an image.


#: formats tried when --formats is not given: what stations read
DEFAULT_FORMATS = "QRCode,DataMatrix,EAN13,EAN8,Code128,ITF,Codabar,DataBar,DataBarExp,PDF417"


def add_scan_image_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "scan-image",
        help="decode barcodes / QR codes in image files and interpret them",
        description="Decode every code in each image (PNG, JPEG, ...) with zxing-cpp and "
        "print it with its interpretation, as the camera driver would store it.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="image files")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--formats",
        default=DEFAULT_FORMATS,
        help=f"comma-separated zxing-cpp formats (default: {DEFAULT_FORMATS})",
    )
    p.set_defaults(func=run_scan_image)


def scan_file(path: str, decoder: Any) -> dict[str, Any]:
    """Codes in one file: `{"file", "codes": [...]}` or `{"file", "error"}`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            gray = img.convert("L")
            width, height = gray.size
    except (OSError, UnidentifiedImageError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return {"file": path, "error": f"cannot read image: {reason}"}
    codes = []
    for code in decoder.decode(gray):
        codes.append(
            {
                "text": code.text,
                "symbology": code.symbology,
                "format": code.format,
                "interpretation": interpret(code.text, symbology=code.symbology),
            }
        )
    return {"file": path, "width": width, "height": height, "codes": codes}


def run_scan_image(args: argparse.Namespace) -> int:
    from agent.drivers.camera import Decoder

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        decoder = Decoder(formats, try_rotate=True, try_invert=True, device="scan-image")
    except DriverMissing as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:  # zxing-cpp: unknown format name
        print(f"--formats: {e}", file=sys.stderr)
        return 2
    results = [scan_file(path, decoder) for path in args.files]
    if args.json:
        print(json.dumps({"files": results}, ensure_ascii=False, indent=1))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}: {r['error']}")
                continue
            if not r["codes"]:
                print(f"{r['file']}: no code found ({r['width']}x{r['height']})")
            for c in r["codes"]:
                interp = c["interpretation"]
                verdict = "valid" if interp.get("valid") else "INVALID"
                problems = ",".join(interp.get("problems", []))
                shown = c["text"].replace("\x1d", "<GS>")
                print(
                    f"{r['file']}: {c['symbology']} {c['format']}: {shown!r} -> "
                    f"{interp.get('type')} {verdict}{' ' + problems if problems else ''}"
                )
    if any("error" in r for r in results):
        return 2
    return 0 if all(r["codes"] for r in results) else 1


def add_tool_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    add_decode_parser(sub)
    add_hid_replay_parser(sub)
    add_card_info_parser(sub)
    add_scan_image_parser(sub)
    from agent.cli.hidwatch import add_hid_watch_parser

    add_hid_watch_parser(sub)
