"""The two real frame sources against stand-ins for their libraries.

picamera2 needs a Raspberry Pi and linuxpy needs a /dev/video device; neither
exists here. These stand-ins take the place of the library (the boundary),
speak the calls the sources make, and hand over real data: a YUV420 array
whose luma plane is a generated code, YUYV and MJPG buffers of the same. What
is tested is our side: stream set-up, luma extraction with strides, still
mode switches and JPEG handling, and error translation.
"""

from __future__ import annotations

import io
import os
import sys
import types
from collections import namedtuple
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from agent.config import CameraDevice
from agent.config_schema import validate_device
from agent.contract.records import Read
from agent.drivers import create_driver
from agent.drivers.camera import CameraDriver, Picamera2Source, V4L2Source
from agent.errors import DeviceError, DeviceUnavailable
from agent.testing import FakeCamera
from tests.support.camera import TICKET, centered, photo_scene, qr


def config(source: str, **kw: Any) -> CameraDevice:
    return validate_device(
        {"name": "cam", "profile": "p", "driver": "camera", "source": source, **kw}, CameraDevice
    )


def jpeg_of(image: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


async def first_read(driver: CameraDriver) -> Read:
    async with driver:
        async for event in driver.reads():
            assert isinstance(event, Read)
            return event
    raise AssertionError("no read")


# -- picamera2 ------------------------------------------------------------------------


class StandInPicamera2:
    """Answers the calls Picamera2Source makes, with a real YUV420 frame and real JPEG."""

    instances: ClassVar[list[StandInPicamera2]] = []
    luma = centered(qr(TICKET))
    still = photo_scene(640, 360)

    def __init__(self, index: int) -> None:
        if index > 0:
            raise IndexError("list index out of range")
        self.options: dict[str, Any] = {}
        self.camera_controls = {"AfMode": (0, 2, 0)}
        self.controls: dict[str, Any] = {}
        self.configured: dict[str, Any] | None = None
        self.started = self.closed = False
        self.stills = 0
        StandInPicamera2.instances.append(self)

    def create_video_configuration(self, **kw: Any) -> dict[str, Any]:
        return {"use": "video", **kw}

    def create_still_configuration(self, **kw: Any) -> dict[str, Any]:
        return {"use": "still", **kw}

    def configure(self, cfg: dict[str, Any]) -> None:
        self.configured = cfg

    def set_controls(self, controls: dict[str, Any]) -> None:
        self.controls.update(controls)

    def start(self) -> None:
        self.started = True

    def capture_array(self, name: str = "main", wait: Any = None) -> str:
        assert name == "main" and wait is False
        return "job"

    def wait(self, job: str, timeout: float | None = None) -> np.ndarray:
        assert job == "job" and timeout
        assert self.configured is not None
        w, h = self.configured["main"]["size"]
        yuv = np.full((h * 3 // 2, w), 128, np.uint8)  # YUV420: luma, then the chroma planes
        yuv[:h, :w] = self.luma
        return yuv

    def switch_mode_and_capture_file(self, cfg: dict[str, Any], out: Any, format: str) -> None:
        assert cfg["use"] == "still" and format == "jpeg"
        self.stills += 1
        out.write(jpeg_of(self.still, self.options["quality"]))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def picamera2(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[StandInPicamera2]]:
    module = types.ModuleType("picamera2")
    module.Picamera2 = StandInPicamera2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", module)
    StandInPicamera2.instances = []
    yield StandInPicamera2


async def test_picamera2_source_decodes_the_luma_plane_and_takes_stills(
    picamera2: type[StandInPicamera2],
) -> None:
    cfg = config("picamera2", fps=10, still_width=640, still_height=360, jpeg_quality=80)
    driver = create_driver(cfg)
    assert isinstance(driver, CameraDriver)
    read = await first_read(driver)
    assert read.data == {"text": TICKET, "symbology": "]Q1"}
    (cam,) = picamera2.instances
    assert cam.configured is not None
    assert cam.configured["main"] == {"size": (640, 480), "format": "YUV420"}
    assert cam.configured["controls"] == {"FrameRate": 10}
    assert cam.controls == {"AfMode": 2} and cam.options["quality"] == 80
    assert cam.closed

    source = Picamera2Source(cfg)
    source.open()
    try:
        still = source.capture_still()
    finally:
        source.close()
    assert (still.width, still.height, still.data[:2]) == (640, 360, b"\xff\xd8")


async def test_picamera2_missing_camera_is_unavailable(
    picamera2: type[StandInPicamera2],
) -> None:
    with pytest.raises(DeviceUnavailable, match="camera 1"):
        async with create_driver(config("picamera2", camera_index=1)):
            pass


# -- V4L2 (linuxpy) -----------------------------------------------------------------------


class PixelFormat:
    def __init__(self, fourcc: str) -> None:
        self.fourcc = fourcc

    def human_str(self) -> str:
        return self.fourcc


Format = namedtuple("Format", "width height pixel_format size bytes_per_line")


class StandInDevice:
    """A V4L2 device: a pipe stands in for the fd so that select() works for real."""

    offers: ClassVar[dict[str, list[tuple[int, int]]]] = {
        "YUYV": [(640, 480)],
        "MJPG": [(640, 480), (1280, 720)],
    }

    def __init__(self, path: str) -> None:
        if not path.startswith("/dev/video"):
            raise FileNotFoundError(2, "No such file or directory", path)
        self.path = path
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # always readable: a frame is always ready
        self.closed = False

    def open(self) -> None:
        pass

    def fileno(self) -> int:
        return self._r

    def close(self) -> None:
        self.closed = True
        os.close(self._r)
        os.close(self._w)


class StandInBuffer:
    def __init__(self, cap: StandInCapture) -> None:
        self.cap = cap

    def raw_read(self) -> Any:
        fmt = self.cap.format
        scene = centered(qr(TICKET))
        if fmt.pixel_format.fourcc == "YUYV":
            # rows padded to bytes_per_line, as some drivers do
            rows = np.full((480, fmt.bytes_per_line), 128, np.uint8)
            rows[:, 0 : 2 * 640 : 2] = scene
            data = rows.tobytes()
        else:
            big = Image.fromarray(scene).resize((fmt.width, fmt.height))
            data = jpeg_of(np.asarray(big))
        self.cap.reads += 1
        return types.SimpleNamespace(data=data)


class StandInCapture:
    log: ClassVar[list[tuple[str, Any]]] = []

    def __init__(self, device: StandInDevice, size: int = 2) -> None:
        self.device = device
        self.format = Format(0, 0, PixelFormat("YUYV"), 0, 0)
        self.buffer = StandInBuffer(self)
        self.reads = 0

    def set_format(self, width: int, height: int, pixel_format: str) -> None:
        fourcc = pixel_format if (width, height) in StandInDevice.offers[pixel_format] else "MJPG"
        bpl = width * 2 + 64 if fourcc == "YUYV" else 0
        self.format = Format(width, height, PixelFormat(fourcc), 0, bpl)
        self.log.append(("format", (width, height, fourcc)))

    def set_fps(self, fps: float) -> None:
        self.log.append(("fps", fps))

    def get_format(self) -> Format:
        return self.format

    def open(self) -> None:
        self.log.append(("stream_on", None))

    def close(self) -> None:
        self.log.append(("stream_off", None))


@pytest.fixture
def linuxpy(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[StandInCapture]]:
    device_module = types.ModuleType("linuxpy.video.device")
    device_module.Device = StandInDevice  # type: ignore[attr-defined]
    device_module.VideoCapture = StandInCapture  # type: ignore[attr-defined]
    for name in ("linuxpy", "linuxpy.video"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "linuxpy.video.device", device_module)
    StandInCapture.log = []
    yield StandInCapture


async def test_v4l2_yuyv_stream_with_padded_rows_is_decoded(
    linuxpy: type[StandInCapture],
) -> None:
    read = await first_read(create_driver(config("v4l2", device="/dev/video0", fps=8)))
    assert read.data == {"text": TICKET, "symbology": "]Q1"}
    assert linuxpy.log[:3] == [("format", (640, 480, "YUYV")), ("fps", 8), ("stream_on", None)]


async def test_v4l2_mjpg_stream_is_decoded(linuxpy: type[StandInCapture]) -> None:
    cfg = config("v4l2", device="/dev/video0", pixel_format="MJPG")
    read = await first_read(create_driver(cfg))
    assert read.data["text"] == TICKET


def test_v4l2_still_switches_mode_and_back(linuxpy: type[StandInCapture]) -> None:
    cfg = config("v4l2", device="/dev/video0", still_width=1280, still_height=720)
    source = V4L2Source(cfg)
    source.open()
    try:
        still = source.capture_still()
        frame = source.next_frame(1.0)  # streaming the decoding format again
    finally:
        source.close()
    assert (still.width, still.height, still.content_type) == (1280, 720, "image/jpeg")
    with Image.open(io.BytesIO(still.data)) as img:
        assert img.format == "JPEG" and img.size == (1280, 720)
    assert frame is not None and frame.image.shape == (480, 640)
    formats = [arg for what, arg in linuxpy.log if what == "format"]
    assert formats == [(640, 480, "YUYV"), (1280, 720, "MJPG"), (640, 480, "YUYV")]


def test_v4l2_format_not_offered_is_a_device_error(linuxpy: type[StandInCapture]) -> None:
    source = V4L2Source(config("v4l2", device="/dev/video0", width=320, height=240))
    with pytest.raises(DeviceError, match="does not offer YUYV"):
        source.open()


async def test_v4l2_missing_device_is_unavailable(linuxpy: type[StandInCapture]) -> None:
    with pytest.raises(DeviceUnavailable, match="cannot open /dev/v4l/by-id/gone"):
        async with create_driver(config("v4l2", device="/dev/v4l/by-id/gone")):
            pass


async def test_a_camera_that_stops_delivering_frames_is_unavailable() -> None:
    class Stalled(FakeCamera):
        def next_frame(self, timeout: float) -> Any:
            return None  # the library's own timeout expired

    driver = CameraDriver(config("v4l2", frame_timeout_s=0.2), source=Stalled([]))
    with pytest.raises(DeviceUnavailable, match=r"no frame for 0\.2 s"):
        async with driver:
            async for _ in driver.reads():
                pass
