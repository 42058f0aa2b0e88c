"""`madoguchi hid-watch DEVICE`: a live keyboard-mode scanner, decoded, like evtest.

A technician checking a scanner at the counter runs evtest; this is the same
look (read-only, not grabbed: the keys also reach whatever has focus) with the
station's decoder on top, so each scan shows as the text the agent would store,
or as the fault it would report (wrong layout, no terminator, typed by hand).
`--events` also prints every key event, evtest style. Ctrl-C ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from collections.abc import AsyncIterator
from typing import IO, TYPE_CHECKING, Any

from agent.keymap import EV_KEY, KEY_NAMES, Decoder, Fault, KeyEvent, Scan

if TYPE_CHECKING:  # the driver module loads only when the command runs
    from agent.drivers.hid import Backend, InputDeviceLike

_GONE = {errno.ENODEV, errno.ENXIO, errno.ENOENT, errno.EBADF}
_VALUES = {0: "up", 1: "down", 2: "repeat"}


def add_hid_watch_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "hid-watch",
        help="decode a live keyboard-mode scanner like evtest (read-only, not grabbed)",
        description="Opens DEVICE (e.g. /dev/input/by-id/usb-...-event-kbd) read-only, "
        "without grabbing it, and prints each scan as the station would decode it. "
        "Exit 0 on Ctrl-C, 1 when the device cannot be opened or goes away.",
    )
    p.add_argument("device", metavar="DEVICE", help="input device path (/dev/input/event*)")
    p.add_argument(
        "--layout", default="us", choices=["us", "jp106"], help="the layout the scanner is set to"
    )
    p.add_argument(
        "--terminator",
        action="append",
        metavar="KEY",
        help="key that ends a scan; repeatable (default: KEY_ENTER and KEY_KPENTER)",
    )
    p.add_argument("--gs-key", action="append", metavar="COMBO", help="default 'ctrl+]'")
    p.add_argument("--idle-timeout-ms", type=int, default=500, help="default 500")
    p.add_argument("--events", action="store_true", help="also print every key event")
    p.set_defaults(func=run_hid_watch)


def run_hid_watch(args: argparse.Namespace) -> int:
    try:
        decoder = Decoder(
            args.layout,
            terminators=args.terminator or ("KEY_ENTER", "KEY_KPENTER"),
            gs_keys=args.gs_key or ("ctrl+]",),
            idle_timeout_ms=args.idle_timeout_ms,
        )
    except ValueError as e:
        print(f"hid-watch: {e}", file=sys.stderr)
        return 1
    from agent.drivers.hid import EvdevBackend

    try:
        backend: Backend = EvdevBackend()
    except ImportError:
        print(
            "hid-watch: python-evdev is not installed (pip install 'madoguchi[hid]')",
            file=sys.stderr,
        )
        return 1
    try:
        return asyncio.run(watch(args.device, decoder, backend, sys.stdout, events=args.events))
    except KeyboardInterrupt:
        return 0


def _visible(text: str) -> str:
    return "".join(f"<{ord(c):02x}>" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)


async def watch(
    path: str, decoder: Decoder, backend: Backend, out: IO[str], *, events: bool = False
) -> int:
    """Print what the scanner at `path` sends until it goes away (1) or Ctrl-C."""
    try:
        dev = backend.open(path)
    except OSError as e:
        print(f"hid-watch: {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        if EV_KEY not in dev.capabilities():
            print(f"hid-watch: {path}: {dev.name!r} sends no key events", file=sys.stderr)
            return 1
        info = dev.info
        print(
            f"{path}: {dev.name} (usb {info.vendor:04x}:{info.product:04x}), not grabbed "
            f"(keys also reach the desktop); layout {decoder.layout}. Scan now, Ctrl-C ends.",
            file=out,
            flush=True,
        )
        return await _read(dev, decoder, out, events)
    finally:
        dev.close()


async def _read(dev: InputDeviceLike, decoder: Decoder, out: IO[str], events: bool) -> int:
    stream: AsyncIterator[Any] = dev.async_read_loop()
    loop = asyncio.get_running_loop()
    idle = decoder.idle_timeout_s
    last_key = loop.time()
    nxt: asyncio.Future[Any] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(anext(stream))
            if not nxt.done():
                timeout = max(0.0, last_key + idle - loop.time()) if decoder.pending else None
                await asyncio.wait({nxt}, timeout=timeout)
            if not nxt.done():  # stopped mid-scan: the decoder says what it was
                fault = decoder.expire()
                if fault is not None:
                    _show(fault, out)
                continue
            fut, nxt = nxt, None
            try:
                ev = fut.result()
            except StopAsyncIteration:
                ev = None
            except OSError as e:
                if e.errno not in _GONE:
                    print(f"hid-watch: {dev.path}: {e.strerror or e}", file=sys.stderr)
                    return 1
                ev = None
            if ev is None:
                tail = decoder.finish()
                if tail is not None:
                    _show(tail, out)
                print(f"hid-watch: {dev.path}: device went away (unplugged)", file=sys.stderr)
                return 1
            key = KeyEvent(ev.timestamp(), ev.type, ev.code, ev.value)
            if events and key.type == EV_KEY:
                name = KEY_NAMES.get(key.code, f"code {key.code}")
                print(
                    f"  {key.time:.6f} {name} {_VALUES.get(key.value, key.value)}",
                    file=out,
                    flush=True,
                )
            for result in decoder.feed(key):
                _show(result, out)
            if key.type == EV_KEY:
                last_key = loop.time()
    finally:
        if nxt is not None:
            nxt.cancel()


def _show(result: Scan | Fault, out: IO[str]) -> None:
    if isinstance(result, Scan):
        took = max(0.0, result.ended - result.started)
        print(
            f"scan   {_visible(result.text)}   ({len(result.text)} chars in {took * 1000:.0f} ms)",
            file=out,
            flush=True,
        )
    else:
        print(f"FAULT  {result.reason}", file=out, flush=True)
