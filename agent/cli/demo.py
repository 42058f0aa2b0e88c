"""`madoguchi demo`: the whole data path on one machine, with nothing to set up.

Starts mosquitto on a free loopback port, the reference registry, and an
agent whose serial scanner is a simulated one on a pseudo-terminal. The
simulated scanner types realistic scans and listens for the ACK byte; every
record is printed as the registry stores it, and again when the agent sees
the registry's ack. Ends by itself after one set of scans (or loops with
`--loop`); Ctrl-C stops everything cleanly at any point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import tty
from pathlib import Path

from agent.central.registry import Registry, Stored, describe_record
from agent.config import load_config

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("mosquitto not found: run `make setup` (apt install mosquitto) first")


async def start_mosquitto(workdir: Path, port: int) -> asyncio.subprocess.Process:
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n"
        "set_tcp_nodelay true\n"
    )
    proc = await asyncio.create_subprocess_exec(
        find_mosquitto(),
        "-c",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the demo, which stops the broker last
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.returncode is not None:
                raise SystemExit(f"mosquitto exited with {proc.returncode}") from None
            await asyncio.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start listening")


def write_config(workdir: Path, port: int, scanner: Path) -> Path:
    path = workdir / "agent.toml"
    path.write_text(f"""
[agent]
site = "demo-city-hall-1f"
name = "station-01"
data_dir = "{workdir / "data"}"
telemetry_interval_s = 5

[mqtt]
host = "127.0.0.1"
port = {port}

[outbox]
resend_after_s = 5

[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
port = "{scanner}"
host_ack = "\\u0006"
host_nak = "\\u0015"
""")
    return path


class SimulatedScanner:
    """The scanner's side of a pty: types scans, hears ACK/NAK bytes."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def stop(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 64)
        except OSError:
            return
        for b in data:
            self.replies.put_nowait(bytes([b]))

    async def scan(self, text: str) -> bytes | None:
        os.write(self.master, text.encode() + b"\r")
        try:
            return await asyncio.wait_for(self.replies.get(), timeout=5)
        except TimeoutError:
            return None


def show(text: str) -> str:
    return text.encode("unicode_escape").decode()


async def demo(stop: asyncio.Event, loop_forever: bool, count: int) -> int:
    from agent.station.app import StationApp

    with tempfile.TemporaryDirectory(prefix="madoguchi-demo-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        broker = await start_mosquitto(workdir, port)
        master, slave = os.openpty()
        tty.setraw(slave)
        link = workdir / "ttyScanner"
        link.symlink_to(os.ttyname(slave))
        config = load_config(write_config(workdir, port, link))
        print(f"broker    mosquitto on 127.0.0.1:{port}")
        print(f"scanner   simulated serial scanner on {os.ttyname(slave)}")
        print(f"outbox    {config.outbox_path}\n")
        confirmed: asyncio.Queue[Stored] = asyncio.Queue()
        station = StationApp(config)
        scanner_ready = asyncio.Event()
        station.subscribe(
            lambda kind, body: (
                scanner_ready.set()
                if kind == "device_state" and body["state"] == "connected"
                else None
            )
        )
        scanner = SimulatedScanner(master)
        try:
            async with (
                Registry(
                    "127.0.0.1", port, workdir / "registry.db", on_stored=confirmed.put_nowait
                ) as registry,
                asyncio.TaskGroup() as tg,
            ):
                reg_task = tg.create_task(registry.run(), name="registry")
                agent_stop = asyncio.Event()
                agent_task = tg.create_task(station.run(agent_stop), name="agent")
                await registry.connected.wait()
                await station.ready.wait()
                await scanner_ready.wait()
                scanner.start()
                total = await _feed(scanner, confirmed, stop, loop_forever, count or len(SCANS))
                unconfirmed = await _wait_confirmed(station, stop)
                print(
                    f"\n{total} scans, every one stored by the registry once "
                    f"(outbox unconfirmed: {unconfirmed})."
                )
                agent_stop.set()
                await agent_task
                reg_task.cancel()
        finally:
            scanner_cleanup(scanner)
            os.close(master)
            os.close(slave)
            with contextlib.suppress(ProcessLookupError):
                broker.terminate()
            await broker.wait()
    return 0


def scanner_cleanup(scanner: SimulatedScanner) -> None:
    with contextlib.suppress(Exception):
        scanner.stop()


async def _feed(
    scanner: SimulatedScanner,
    confirmed: asyncio.Queue[Stored],
    stop: asyncio.Event,
    loop_forever: bool,
    count: int,
) -> int:
    n = 0
    while not stop.is_set() and (loop_forever or n < count):
        text = SCANS[n % len(SCANS)]
        n += 1
        reply = await scanner.scan(text)
        beep = {ACK: "ACK (beep)", NAK: "NAK (error beep)"}.get(reply or b"", "no answer")
        print(f"scan      {show(text):48} -> scanner got {beep}")
        try:
            stored = await asyncio.wait_for(confirmed.get(), timeout=10)
            print(f"registry  {describe_record(stored.record)}")
        except TimeoutError:
            print("registry  (not yet: the record waits safely in the outbox)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.4)
    return n


async def _wait_confirmed(station: object, stop: asyncio.Event) -> int:
    from agent.station.app import StationApp

    assert isinstance(station, StationApp) and station.outbox is not None
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

    return asyncio.run(main())
