"""Real barcode images for the camera tests, and a station whose camera is a fake.

Codes are made by zxing-cpp's encoder (not drawn by hand), placed on a
640x480 grey scene and then made hard the way a counter camera makes them
hard: turned, seen at an angle, out of focus, noisy, in poor light. The fake
camera (agent.testing.FakeCamera) only stands in for the hardware: it hands
those frames, one by one, to the real capture thread, decoder and driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import zxingcpp
from PIL import Image, ImageFilter

from agent.config import CameraDevice, load_config
from agent.drivers.camera import CameraDriver
from agent.station.app import StationApp
from agent.testing import FakeCamera, counter_top

W, H = 640, 480
BASE = "madoguchi/v1/toda-city-hall-1f/station-03"

TICKET = "111122410000012345"  # 券種 1, 回数 1, 戸田市 112241, 券番号 0000012345
FORM_ID = "12345678901234567890123"  # 23-digit application form id
EAN = "4901234567894"


def gtin_check(body13: str) -> str:
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body13)))
    return body13 + str((10 - total % 10) % 10)


VIAL_GTIN = gtin_check("0498712345678")
#: a vial's GS1 element string in HRI: GTIN, expiry, lot, serial
VIAL_HRI = f"(01){VIAL_GTIN}(17)271231(10)LOT42A(21)SN0001"
#: the same as a scanner transmits it (FNC1 as GS after the variable-length lot)
VIAL_RAW = f"01{VIAL_GTIN}17271231" + "10LOT42A\x1d21SN0001"


def code(text: str, fmt: str, scale: int = 4, *, gs1: bool = False) -> np.ndarray:
    """The symbol as zxing-cpp encodes it, black on white with its quiet zone."""
    kwargs: dict[str, Any] = {"gs1": True} if gs1 else {}
    barcode = zxingcpp.create_barcode(text, zxingcpp.barcode_format_from_str(fmt), **kwargs)
    return np.asarray(barcode.to_image(scale=scale)).copy()


def qr(text: str, scale: int = 4) -> np.ndarray:
    return code(text, "QRCode", scale)


def vial(scale: int = 5) -> np.ndarray:
    return code(VIAL_HRI, "DataMatrix", scale, gs1=True)


def ean13(text: str = EAN, scale: int = 3) -> np.ndarray:
    return code(text, "EAN13", scale)


def scene(seed: int = 0) -> np.ndarray:
    """A 640x480 counter top: mid grey with soft shading and a little texture."""
    return counter_top(seed, W, H)


def place(background: np.ndarray, symbol: np.ndarray, x: int, y: int) -> np.ndarray:
    out = background.copy()
    h, w = symbol.shape
    out[y : y + h, x : x + w] = symbol
    return out


def centered(symbol: np.ndarray, seed: int = 0) -> np.ndarray:
    h, w = symbol.shape
    return place(scene(seed), symbol, (W - w) // 2, (H - h) // 2)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Turn the whole frame (the code with it) about its centre; corners filled grey."""
    img = Image.fromarray(image).rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=150)
    return np.asarray(img).copy()


def _perspective_coeffs(
    dst: Sequence[tuple[float, float]], src: Sequence[tuple[float, float]]
) -> list[float]:
    """Pillow's PERSPECTIVE takes the map from output to input pixels."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.array(rows, dtype=float)
    b = np.array([c for pt in src for c in pt], dtype=float)
    return list(np.linalg.solve(a, b))


def perspective(image: np.ndarray, squeeze: float = 0.25) -> np.ndarray:
    """Seen at an angle: the top edge shrinks by `squeeze` of the width (a tilted card)."""
    inset = squeeze * W / 2
    corners = [(0, 0), (W, 0), (W, H), (0, H)]
    seen = [(inset, 20), (W - inset, 0), (W, H), (0, H - 20)]
    coeffs = _perspective_coeffs(seen, corners)
    img = Image.fromarray(image).transform(
        (W, H), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC, fillcolor=150
    )
    return np.asarray(img).copy()


def blur(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius))).copy()


def noise(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def low_contrast(image: np.ndarray, lo: int = 100, hi: int = 160) -> np.ndarray:
    """Poor light: the full 0..255 range squeezed into lo..hi."""
    return (lo + image.astype(np.float32) * ((hi - lo) / 255.0)).astype(np.uint8)


def photo_scene(width: int = 1600, height: int = 1200, seed: int = 7) -> np.ndarray:
    """An RGB still that does not compress well (noise), so a JPEG of it is megabytes."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- a station whose cameras are FakeCameras (everything else real) ------------------


@contextlib.asynccontextmanager
async def camera_station(config_path: Path, camera: FakeCamera) -> AsyncIterator[StationApp]:
    cfg = load_config(config_path)

    def factory(dev: Any) -> CameraDriver:
        assert isinstance(dev, CameraDevice)
        return CameraDriver(dev, source=camera)

    station = StationApp(cfg, driver_factory=factory)
    connected = asyncio.Event()
    station.subscribe(
        lambda kind, body: (
            connected.set() if kind == "device_state" and body["state"] == "connected" else None
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop), name="camera-station")
    await asyncio.wait_for(station.ready.wait(), 10)
    await asyncio.wait_for(connected.wait(), 10)
    await online(cfg.mqtt.port)
    try:
        yield station
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def online(port: int, timeout: float = 20) -> None:
    """The agent's retained birth: published once it has subscribed to its commands."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{BASE}/status", qos=1)

        async def birth() -> None:
            async for m in client.messages:
                if json.loads(m.payload).get("state") == "online":  # type: ignore[arg-type]
                    return

        await asyncio.wait_for(birth(), timeout)


async def command(
    port: int, name: str, body: dict[str, Any], timeout: float = 30
) -> dict[str, Any]:
    """Publish `cmd/{name}` as the dashboard does and wait for its result."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{BASE}/cmd/{name}/result", qos=1)
        await client.publish(f"{BASE}/cmd/{name}", json.dumps(body), qos=1)

        async def first() -> dict[str, Any]:
            async for m in client.messages:
                result: dict[str, Any] = json.loads(m.payload)  # type: ignore[arg-type]
                if result.get("request_id") == body.get("request_id"):
                    return result
            raise AssertionError("no result")

        return await asyncio.wait_for(first(), timeout)
