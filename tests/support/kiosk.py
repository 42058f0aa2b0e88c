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
from agent.contract.records import Read
from agent.drivers import Driver, create_driver
from agent.errors import OutboxError
from agent.station.app import StationApp
from agent.testing import (
    FAKE_CARD,
    FAKE_CARD_PIN,
    FakeCardReader,
    FakePhotoCamera,
    free_port,
    write_config,
)

CARD_PIN = FAKE_CARD_PIN
#: what the kiosk answers for the fake reader's card
CARD_INFO = FAKE_CARD.attributes()


class PhotoStation(StationApp):
    """The station with the camera branch's `capture_photo(device)` contract, reduced to
    what the API relies on: find the running camera, store a `photo` record, answer
    after the commit. (The real one also seals the JPEG as a blob: agent/station/photos.py.)"""

    async def capture_photo(self, device: str | None = None) -> dict[str, Any]:
        camera = self.running_drivers()[device or "camera"]
        assert isinstance(camera, FakePhotoCamera)
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
            return FakePhotoCamera(dev)
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
