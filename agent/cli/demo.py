"""`madoguchi demo`: the whole data path on one machine, with nothing to set up.

Starts mosquitto on a free loopback port, the reference registry, and an
agent whose serial scanner is a simulated one on a pseudo-terminal. The
simulated scanner types realistic scans and listens for the ACK byte; every
record is printed as the registry stores it, and again when the agent sees
the registry's ack. The ACK byte means "stored", not "valid": an INVALID
ticket is stored too (and flagged), so validity is shown on its own. Ends by
itself after one set of scans (or loops with `--loop`); Ctrl-C stops
everything cleanly at any point.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

from agent.central.registry import Stored, describe_record
from agent.config import load_config
from agent.errors import ConfigError, HarnessError, MadoguchiError
from agent.interpret import interpret, split_aim
from agent.station.app import StationApp
from agent.testing import Broker, Pty, running_registry, running_station, write_config

ACK, NAK = b"\x06", b"\x15"

#: what a vaccination site's ticket scanner sees in a morning
SCANS = [
    "111122410000012345",  # vaccination ticket, 戸田市 (112241)
    "111122076000004321",  # vaccination ticket, 松戸市
    "A0000012345B",  # NW-7 ticket number with Codabar start/stop
    "]d201049123451234591725123110ABC123\x1d21SN0001",  # GS1 DataMatrix vial
    "4901234567894",  # JAN
    "111122400000012345",  # ticket with a bad municipality check digit
    "12345678901234567890123",  # My Number card application form id
    "https://www.city.toda.saitama.jp/",  # a URL
]


def show(text: str) -> str:
    return text.encode("unicode_escape").decode()


async def demo(stop: asyncio.Event, loop_forever: bool, count: int) -> int:
    with tempfile.TemporaryDirectory(prefix="madoguchi-demo-") as tmp:
        workdir = Path(tmp)
        # its own session: Ctrl-C reaches the demo, which stops the broker last
        broker = Broker(workdir, persistence=False, log=False, settings="", own_session=True)
        try:
            broker.start()
        except HarnessError as e:
            raise SystemExit(str(e)) from None
        # everything after the broker started is inside the try: no error path leaves it running
        try:
            scanner = Pty(workdir / "ttyScanner")
            try:
                ok = await _run(workdir, broker, scanner, stop, loop_forever, count)
            finally:
                scanner.close()
        finally:
            broker.stop()
    return 0 if ok else 1


async def _run(
    workdir: Path,
    broker: Broker,
    scanner: Pty,
    stop: asyncio.Event,
    loop_forever: bool,
    count: int,
) -> bool:
    """One demo run; False when a scan was not ACKed or the registry did not store each
    ACKed scan once (the summary line says which)."""
    path = write_config(
        workdir,
        broker.port,
        scanner=scanner.link,
        site="demo-city-hall-1f",
        name="station-01",
        telemetry_interval_s=5,
        mqtt="",
        outbox="resend_after_s = 5",
        path=workdir / "agent.toml",
        data_dir=workdir / "data",
    )
    config = load_config(path)
    print(f"broker    mosquitto on 127.0.0.1:{broker.port}")
    print(f"scanner   simulated serial scanner on {scanner.device}")
    print(f"outbox    {config.outbox_path}")
    print("          (ACK = stored in the outbox; validity is shown separately)\n")
    confirmed: asyncio.Queue[Stored] = asyncio.Queue()
    every: list[Stored] = []

    def on_stored(s: Stored) -> None:
        every.append(s)
        confirmed.put_nowait(s)

    async with (
        running_registry(broker.port, workdir / "registry.db", on_stored=on_stored),
        running_station(config) as agent,
    ):
        total, acked = await _feed(scanner, confirmed, stop, loop_forever, count or len(SCANS))
        unconfirmed = await _wait_confirmed(agent.station, stop)
        # the registry's own word, not an assumption: each record id stored new, once
        ids = [s.record["id"] for s in every if s.new]
        once = len(set(ids)) if len(ids) == len(set(ids)) else -1
        ok = acked == total and once == acked and unconfirmed == 0
        if ok:
            print(
                f"\n{total} scans, every one stored by the registry once "
                f"(outbox unconfirmed: {unconfirmed})."
            )
        else:
            stored = "a record stored twice" if once < 0 else f"{once} stored by the registry"
            print(
                f"\n{total} scans: {acked} ACKed (stored in the outbox), {stored}, "
                f"outbox unconfirmed: {unconfirmed}"
                + (" (stopped before the registry had them all)." if stop.is_set() else ".")
            )
        await agent.shutdown()
    return ok or (stop.is_set() and acked == total)  # Ctrl-C: what was ACKed is stored


def validity(text: str) -> str:
    """`valid` or `INVALID problem,...` as the station judges the read (stored either way)."""
    aim, body = split_aim(text)
    interp = interpret(body, symbology=aim)
    if interp["valid"]:
        return f"valid {interp['type']}"
    return f"INVALID {interp['type']} {','.join(interp['problems'])}".rstrip()


async def _feed(
    scanner: Pty,
    confirmed: asyncio.Queue[Stored],
    stop: asyncio.Event,
    loop_forever: bool,
    count: int,
) -> tuple[int, int]:
    """Scan until `count` (or stopped); returns (scans, ACKs)."""
    n = acked = 0
    while not stop.is_set() and (loop_forever or n < count):
        text = SCANS[n % len(SCANS)]
        n += 1
        scanner.scan(text)
        reply = await scanner.aread(1, timeout=5) or None
        acked += reply == ACK
        beep = {ACK: "ACK = stored (beep)", NAK: "NAK = not stored (error beep)"}.get(
            reply or b"", "no answer"
        )
        print(f"scan      {show(text):48} -> {beep}; read {validity(text)}")
        try:
            stored = await asyncio.wait_for(confirmed.get(), timeout=10)
            print(f"registry  {describe_record(stored.record)}")
        except TimeoutError:
            print("registry  (not yet: the record waits safely in the outbox)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.4)
    return n, acked


async def _wait_confirmed(station: StationApp, stop: asyncio.Event) -> int:
    assert station.outbox is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not stop.is_set():
        stats = await station.outbox.stats()
        if stats.unconfirmed == 0:
            return 0
        await asyncio.sleep(0.1)
    return (await station.outbox.stats()).unconfirmed


def run_demo(loop: bool = False, scans: int = 0) -> int:
    import logging

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )

    async def main() -> int:
        stop = asyncio.Event()
        ev_loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            ev_loop.add_signal_handler(sig, stop.set)
        return await demo(stop, loop, scans)

    try:
        return asyncio.run(main())
    except* ConfigError as bad:
        for e in bad.exceptions:
            assert isinstance(e, ConfigError)
            for p in e.problems:
                print(f"demo: {p}", file=sys.stderr)
    except* MadoguchiError as failed:
        for err in failed.exceptions:
            print(f"demo: {err}", file=sys.stderr)
    return 1
