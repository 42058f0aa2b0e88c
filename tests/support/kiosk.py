"""Fixtures for the kiosk API and page: a station with its local API on a free
loopback port, an SSE reader over real HTTP, and a fake card reader that keeps
the PIN rules of FORMATS.md (the PC/SC driver is built elsewhere; this fake
stands at the driver boundary, where `read_card_info` is the whole contract)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.config import Config, DeviceConfig, load_config
from agent.contract.records import Read, ReadFault
from agent.drivers import Driver, create_driver
from agent.errors import CardError, OutboxError, PinRefused
from agent.station.app import StationApp
from agent.testing import free_port, write_config

CARD_PIN = "4821"
CARD_INFO = {
    "name": "窓口 花子",
    "address": "埼玉県戸田市上戸田1-18-1",
    "birth_date": "19800401",
    "sex": "2",
}


class FakeCardReader(Driver):
    """A reader with a My Number card in it: 3 PIN tries, the counter really counts.

    The rules of the real driver: read the counter without spending a try,
    refuse without VERIFY when fewer than 2 are left, VERIFY once, never retry.
    """

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self.tries_left = 3
        self.verify_calls = 0
        self.card_present = True
        self._gone = asyncio.Event()

    async def open(self) -> None:
        self._gone.clear()

    async def close(self) -> None:
        self._gone.set()

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        await self._gone.wait()
        return
        yield  # an async generator that yields nothing until closed

    async def read_card_info(self, reader: str, pin: str) -> dict[str, Any]:
        if not self.card_present:
            raise CardError(reader, "no card in the reader")
        if self.tries_left == 0:
            raise PinRefused(reader, "the card is locked", 0)
        if self.tries_left < 2:
            raise PinRefused(reader, "too few tries left: not tried", self.tries_left)
        self.verify_calls += 1
        await asyncio.sleep(0)  # the card answers later, as a real one does
        if pin != CARD_PIN:
            self.tries_left -= 1
            raise PinRefused(reader, "wrong PIN", self.tries_left)
        self.tries_left = 3
        return dict(CARD_INFO)


@dataclass(frozen=True)
class Still:
    """What the camera driver's `capture_photo` returns (agent/drivers/camera.py)."""

    data: bytes
    width: int
    height: int
    content_type: str = "image/jpeg"


class FakeCamera(Driver):
    """A camera that takes a still on demand (picamera2 cannot exist here)."""

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self.captures = 0
        self._gone = asyncio.Event()

    async def open(self) -> None:
        self._gone.clear()

    async def close(self) -> None:
        self._gone.set()

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        await self._gone.wait()
        return
        yield

    async def capture_photo(self) -> Still:
        self.captures += 1
        return Still(b"\xff\xd8\xff\xe0" + bytes(self.captures) + b"\xff\xd9", 1280, 960)


class PhotoStation(StationApp):
    """The station with the camera branch's `capture_photo(device)` contract, reduced to
    what the API relies on: find the running camera, store a `photo` record, answer
    after the commit. (The real one also seals the JPEG as a blob: agent/photos.py.)"""

    async def capture_photo(self, device: str | None = None) -> dict[str, Any]:
        camera = self.running_drivers()[device or "camera"]
        assert isinstance(camera, FakeCamera)
        still = await camera.capture_photo()
        sha = hashlib.sha256(still.data).hexdigest()
        meta = {
            "sha256": sha,
            "bytes": len(still.data),
            "width": still.width,
            "height": still.height,
            "content_type": still.content_type,
        }
        outcome = await self.accept(Read(device=camera.name, kind="photo", data=meta))
        if outcome.record is None:
            raise OutboxError(f"{camera.name}: photo not stored")
        return {
            "device": camera.name,
            "record_id": outcome.record.id,
            "seq": outcome.record.seq,
            **meta,
        }


def kiosk_config(
    tmp_path: Path,
    broker_port: int,
    scanner: Path,
    *,
    api: str = "",
    card_reader: bool = True,
    camera: bool = False,
    scanner_extra: str = "",
    extra_devices: str = "",
) -> tuple[Path, int]:
    """A station with a pty scanner, optionally a card reader, and an [api] section."""
    port = free_port()
    devices = f"""
[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
port = "{scanner}"
host_ack = "\\u0006"
host_nak = "\\u0015"
{scanner_extra}
"""
    if card_reader:
        devices += """
[[devices]]
name = "card-reader"
profile = "generic-serial-scanner"
port = "/nonexistent/fake-card-reader"
"""
    if camera:
        devices += """
[[devices]]
name = "camera"
profile = "generic-serial-scanner"
port = "/nonexistent/fake-camera"
"""
    devices += extra_devices
    devices += f"""
[api]
port = {port}
{api}
"""
    return write_config(tmp_path, broker_port, devices=devices), port


@dataclass
class Kiosk:
    station: StationApp
    port: int
    token: str
    readers: dict[str, FakeCardReader]
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.base

    def auth(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=20, **kw)


@contextlib.asynccontextmanager
async def running_kiosk(
    config: Config | Path, station_cls: type[StationApp] = StationApp
) -> AsyncIterator[Kiosk]:
    """A station (devices, uplink, API) in this loop; waits until the API listens."""
    cfg = load_config(config) if isinstance(config, Path) else config
    readers: dict[str, FakeCardReader] = {}

    def factory(dev: DeviceConfig) -> Driver:
        if dev.name == "camera":
            return FakeCamera(dev)
        if dev.name == "card-reader":
            reader = readers.get(dev.name) or FakeCardReader(dev)
            readers[dev.name] = reader
            return reader
        return create_driver(dev)

    station = station_cls(cfg, driver_factory=factory)
    connected: set[str] = set()
    all_up = asyncio.Event()

    def on_event(kind: str, body: dict[str, Any]) -> None:
        if kind == "device_state" and body["state"] == "connected":
            connected.add(body["device"])
            if connected >= {d.name for d in cfg.devices}:
                all_up.set()

    station.subscribe(on_event)
    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop), name="test-kiosk-station")
    try:
        await asyncio.wait_for(station.ready.wait(), 10)
        if cfg.devices:
            await asyncio.wait_for(all_up.wait(), 10)
        for _ in range(200):
            if station.api is not None:
                break
            await asyncio.sleep(0.01)
        assert station.api is not None, "the API task did not start"
        await asyncio.wait_for(station.api.ready.wait(), 10)
        assert cfg.api is not None
        yield Kiosk(station, cfg.api.port, station.api.token, readers, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


class SseStream:
    """Reads Server-Sent Events over a real HTTP connection, one frame at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event: {"id", "event", "data"}; comments and retry lines skipped."""

        async def one() -> dict[str, Any]:
            frame: dict[str, Any] = {"id": None, "event": "message", "data": None}
            data: list[str] = []
            async for line in self._lines:
                if line == "":
                    if data:
                        frame["data"] = json.loads("\n".join(data))
                        return frame
                    continue
                if line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "data":
                    data.append(value)
                elif field in ("id", "event"):
                    frame[field] = value
            raise EOFError("the event stream ended")

        return await asyncio.wait_for(one(), timeout)

    async def until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        while True:
            ev = await self.next(timeout)
            if pred(ev):
                return ev


@contextlib.asynccontextmanager
async def sse(client: httpx.AsyncClient, headers: dict[str, str]) -> AsyncIterator[SseStream]:
    async with client.stream("GET", "/v1/events", headers=headers) as r:
        assert r.status_code == 200, r.status_code
        assert r.headers["content-type"].startswith("text/event-stream")
        yield SseStream(r)
