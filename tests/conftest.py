"""Real parts for the tests: a mosquitto on a free loopback port, ptys as serial ports,
the agent in-process or as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.central.registry import Registry, Stored
from agent.config import Config, load_config
from agent.station.app import StationApp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    for c in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if c and os.access(c, os.X_OK):
            return c
    pytest.fail("mosquitto is not installed: run `make setup`")


def start_mosquitto(conf: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """mosquitto -c conf, returned once it listens on the loopback port; else the test fails
    with what mosquitto said."""
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                text = log.read_text() if log.exists() else ""
                pytest.fail(f"mosquitto exited {proc.returncode}: {err}{text}")
            time.sleep(0.02)
    proc.kill()
    pytest.fail("mosquitto did not listen")


class Broker:
    """A real mosquitto. `stop()`/`kill()` and `start()` again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {workdir}/\n"
            f"log_dest file {workdir / 'mosquitto.log'}\nlog_type all\nset_tcp_nodelay true\n"
            "max_queued_messages 1000000\n"  # as provisioning/broker/madoguchi.conf
        )

    def start(self) -> None:
        self.proc = start_mosquitto(self.conf, self.port, self.workdir / "mosquitto.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.kill()


class Pty:
    """A pseudo-terminal as a scanner's serial port; the test holds the scanner side."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(os.ttyname(self.slave))

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def scan(self, text: str, terminator: bytes = b"\r") -> None:
        self.write(text.encode() + terminator)

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """Read exactly n bytes written back by the agent (ACK / NAK)."""
        out = b""
        deadline = time.monotonic() + timeout
        os.set_blocking(self.master, False)
        while len(out) < n and time.monotonic() < deadline:
            try:
                out += os.read(self.master, n - len(out))
            except BlockingIOError:
                time.sleep(0.005)
        return out

    async def aread(self, n: int, timeout: float = 10.0) -> bytes:
        return await asyncio.to_thread(self.read, n, timeout)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()


@pytest.fixture
def pty_port(tmp_path: Path) -> Iterator[Pty]:
    p = Pty(tmp_path / "ttyScanner")
    yield p
    p.close()


def write_config(
    tmp_path: Path,
    port: int,
    *,
    devices: str | None = None,
    scanner: Path | None = None,
    outbox: str = "resend_after_s = 30",
    extra_agent: str = "",
    name: str = "station-03",
) -> Path:
    if devices is None:
        devices = f"""
[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
port = "{scanner}"
host_ack = "\\u0006"
host_nak = "\\u0015"
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[agent]
site = "toda-city-hall-1f"
name = "{name}"
data_dir = "{tmp_path / ("data-" + name)}"
telemetry_interval_s = 1
{extra_agent}

[mqtt]
host = "127.0.0.1"
port = {port}
backoff_max_s = 1

[outbox]
{outbox}
{devices}
""")
    return path


class RegistryProbe:
    """The reference registry in-process, with what it stored."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.stored: list[Stored] = []
        self.changed = asyncio.Event()

    def on_stored(self, s: Stored) -> None:
        self.stored.append(s)
        self.changed.set()

    @property
    def new(self) -> list[dict[str, Any]]:
        return [s.record for s in self.stored if s.new]

    async def wait_for(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        async def until() -> None:
            while len(self.new) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)
        return self.new


@pytest.fixture
async def registry(broker: Broker, tmp_path: Path) -> AsyncIterator[RegistryProbe]:
    probe: RegistryProbe
    reg = Registry(
        "127.0.0.1", broker.port, tmp_path / "registry.db", on_stored=lambda s: probe.on_stored(s)
    )
    probe = RegistryProbe(reg)
    async with reg:
        task = asyncio.create_task(reg.run(), name="test-registry")
        await asyncio.wait_for(reg.connected.wait(), 10)
        yield probe
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class RunningStation:
    def __init__(self, station: StationApp, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.station = station
        self.stop = stop
        self.task = task

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)


@contextlib.asynccontextmanager
async def running_station(config: Config | Path) -> AsyncIterator[RunningStation]:
    cfg = load_config(config) if isinstance(config, Path) else config
    station = StationApp(cfg)
    connected = asyncio.Event()
    station.subscribe(
        lambda kind, body: (
            connected.set() if kind == "device_state" and body["state"] == "connected" else None
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop), name="test-station")
    await asyncio.wait_for(station.ready.wait(), 10)
    if cfg.devices:
        await asyncio.wait_for(connected.wait(), 10)
    running = RunningStation(station, stop, task)
    try:
        yield running
    finally:
        if not task.done():
            await running.shutdown()


class AgentProcess:
    """`python -m agent run --config ...` as a real process (for kill -9 and signals)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def wait_log(self, needle: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log.read_text(errors="replace"):
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"agent exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.05)
        pytest.fail(f"agent never logged {needle!r}:\n{self.log.read_text()}")

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


async def mqtt_collect(port: int, topic: str, seconds: float) -> list[aiomqtt.Message]:
    """Subscribe and collect what arrives (including retained messages) for a while."""
    out: list[aiomqtt.Message] = []
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for m in client.messages:
                out.append(m)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collect(), seconds)
    return out


def payload(m: aiomqtt.Message) -> Any:
    return json.loads(m.payload)  # type: ignore[arg-type]


# -- headless Chromium (Debian's package, driven by Playwright) ----------------------------

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # screenshots
# Without the background-networking flags Chromium keeps dialling Google's hosts,
# which this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A real headless Chromium; missing is a failure (make setup installs it), not a skip."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (Debian package chromium)")
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()
