"""Camera driver: barcodes and QR codes from video, and ID photos (顔写真).

Three rooms, so each can be tested with real data:

- a *frame source* (`FrameSource`): picamera2 on a Raspberry Pi, or a USB/UVC
  webcam through V4L2 (linuxpy). Its blocking calls run in ONE dedicated
  thread per camera; frames cross to the event loop with
  `loop.call_soon_threadsafe` into a one-frame slot (`LatestFrame`). A frame
  the decoder has not taken yet is replaced by the next one: when decoding
  falls behind, frames are dropped, never queued.
- the *decoder* (`Decoder`): zxing-cpp on the grayscale frame, with the
  profile's formats. It runs in its own worker so the event loop never waits
  on C++ (zxing-cpp releases the GIL while it decodes).
- the *in-view rule* (`InView`): a code that stays in front of the camera
  counts once; it counts again only after it has been out of view for
  `gone_after_ms`.

A decoded code becomes `Read(kind="barcode", data={"text", "symbology"})` with
zxing-cpp's symbology identifier (`]Q1`, `]d2`, `]E0` ...): from there the
supervisor interprets and stores it exactly like a scanner's read.

`capture_photo()` takes a still at the profile's resolution through the same
capture thread (picamera2 must only ever be used from one thread) and
returns JPEG bytes; what becomes of them (sealed blob, photo record, chunked
transfer) is agent/station/photos.py's and agent/station/blobs.py's business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import queue
import select
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from agent.contract.records import Read, ReadFault, utc_now
from agent.drivers.base import Driver
from agent.drivers.capabilities import DriverStats, PhotoCamera
from agent.errors import DeviceError, DeviceUnavailable, DriverMissing, MadoguchiError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from agent.config import CameraDevice

    Gray = NDArray[np.uint8]
else:
    Gray = Any

log = logging.getLogger(__name__)

#: frames a webcam gets to settle exposure after a mode switch, before the still is kept
_STILL_SETTLE_FRAMES = 3


# -- the frame-source seam ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One grayscale frame (H x W, uint8) and when the camera took it (monotonic seconds)."""

    image: Gray
    timestamp: float
    captured_at: datetime = field(default_factory=utc_now)


@dataclass(frozen=True, slots=True)
class Still:
    """An ID photo: encoded image bytes and their size in pixels."""

    data: bytes
    width: int
    height: int
    content_type: str = "image/jpeg"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class FrameSource(Protocol):
    """What the capture thread needs of a camera. All calls come from that one thread."""

    def open(self) -> None:
        """Start streaming; raise `DeviceUnavailable` / `DriverMissing`."""

    def close(self) -> None:
        """Stop and release the camera. Must not raise."""

    def next_frame(self, timeout: float) -> Frame | None:
        """Block until the next frame of the decoding stream; None after `timeout` s."""

    def capture_still(self) -> Still:
        """Take one still at the profile's still resolution, encoded (JPEG)."""


def gray_from_bytes(data: bytes, width: int, height: int, stride: int | None = None) -> Gray:
    """A grayscale frame from raw 8-bit luma bytes (the Y plane) with an optional row stride."""
    import numpy as np

    stride = width if stride is None else stride
    rows = np.frombuffer(data, dtype=np.uint8, count=stride * height).reshape(height, stride)
    return rows[:, :width]


def gray_from_yuyv(data: bytes, width: int, height: int, stride: int | None = None) -> Gray:
    """Y of packed YUYV 4:2:2 is every other byte: luma without any conversion."""
    import numpy as np

    stride = 2 * width if stride is None else stride
    rows = np.frombuffer(data, dtype=np.uint8, count=stride * height).reshape(height, stride)
    return rows[:, 0 : 2 * width : 2]


def gray_from_jpeg(data: bytes, width: int, height: int) -> Gray:
    """Decode an MJPG frame straight to luma at (about) the wanted size (libjpeg's draft mode)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (width, height))
        return np.asarray(img.convert("L"))


def encode_jpeg(image: Any, quality: int) -> Still:
    """A Pillow image or numpy array to a JPEG still (no EXIF, nothing but pixels)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return Still(buf.getvalue(), image.width, image.height)


class Picamera2Source:
    """Raspberry Pi cameras through picamera2 (libcamera), from Raspberry Pi OS's apt.

    The decoding stream is the main stream as YUV420 at the low resolution: its
    first `height` rows are the luma plane, i.e. grayscale for free. Stills
    switch mode to a still configuration and back (picamera2 does both).
    """

    def __init__(self, config: CameraDevice) -> None:
        self.config = config
        self._cam: Any = None
        self._still_config: Any = None

    def open(self) -> None:
        cfg = self.config
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise DriverMissing(
                cfg.name,
                "picamera2 is not importable: on Raspberry Pi OS run "
                "`apt install python3-picamera2` and create the venv with "
                "--system-site-packages (docs/camera.md)",
            ) from None
        try:
            cam = Picamera2(cfg.camera_index)
        except (IndexError, RuntimeError, OSError) as e:
            raise DeviceUnavailable(cfg.name, f"camera {cfg.camera_index}: {e}") from None
        try:
            video = cam.create_video_configuration(
                main={"size": (cfg.width, cfg.height), "format": "YUV420"},
                controls={"FrameRate": max(cfg.fps, 1.0)},
                buffer_count=2,
            )
            cam.configure(video)
            self._still_config = cam.create_still_configuration(
                main={"size": (cfg.still_width, cfg.still_height)}
            )
            cam.options["quality"] = cfg.jpeg_quality
            if "AfMode" in cam.camera_controls:  # Camera Module 3: continuous autofocus
                cam.set_controls({"AfMode": 2})
            cam.start()
        except Exception as e:
            with contextlib.suppress(Exception):
                cam.close()
            raise DeviceUnavailable(cfg.name, f"camera {cfg.camera_index}: {e}") from None
        self._cam = cam

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.close()
            except Exception as e:
                log.debug("%s: close: %s", self.config.name, e)

    def next_frame(self, timeout: float) -> Frame | None:
        cam = self._cam
        if cam is None:
            raise DeviceUnavailable(self.config.name, "not open")
        try:
            job = cam.capture_array("main", wait=False)
            yuv = cam.wait(job, timeout=timeout)
        except TimeoutError:
            return None
        except Exception as e:
            raise DeviceUnavailable(self.config.name, f"capture failed: {e}") from None
        now = time.monotonic()
        return Frame(yuv[: self.config.height, : self.config.width], now)

    def capture_still(self) -> Still:
        cam = self._cam
        if cam is None:
            raise DeviceUnavailable(self.config.name, "not open")
        buf = io.BytesIO()
        try:
            cam.switch_mode_and_capture_file(self._still_config, buf, format="jpeg")
        except Exception as e:
            raise DeviceError(self.config.name, f"still capture failed: {e}") from None
        from PIL import Image

        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        return Still(data, width, height)


class V4L2Source:
    """USB/UVC webcams through V4L2 with linuxpy (pure Python, ioctl + mmap).

    YUYV frames become grayscale by taking every other byte; MJPG frames are
    decoded by libjpeg (Pillow) in draft mode straight to luma. A still stops
    the stream, switches to the still format, lets exposure settle for a few
    frames, keeps one, and switches back.
    """

    def __init__(self, config: CameraDevice) -> None:
        self.config = config
        self._dev: Any = None
        self._cap: Any = None
        self._fmt: Any = None

    def open(self) -> None:
        cfg = self.config
        if "linuxpy.video.device" not in sys.modules and not os.path.exists(cfg.device):
            # linuxpy costs 1.7 MB: not for a camera that is not plugged in (issue #18)
            if importlib.util.find_spec("linuxpy") is None:
                raise DriverMissing(
                    cfg.name, "linuxpy is not installed (pip install 'madoguchi[camera]')"
                )
            raise DeviceUnavailable(cfg.name, f"cannot open {cfg.device}: no such device")
        try:
            from linuxpy.video.device import Device
        except ImportError:
            raise DriverMissing(
                cfg.name, "linuxpy is not installed (pip install 'madoguchi[camera]')"
            ) from None
        try:
            self._dev = Device(cfg.device)
            self._dev.open()
            self._start(cfg.width, cfg.height, cfg.pixel_format)
        except DeviceError:
            self.close()
            raise
        except Exception as e:  # OSError, linuxpy's V4L2Error
            self.close()
            raise DeviceUnavailable(cfg.name, f"cannot open {cfg.device}: {e}") from None

    def _start(self, width: int, height: int, pixel_format: str) -> None:
        from linuxpy.video.device import VideoCapture

        cap = VideoCapture(self._dev, size=2)
        cap.set_format(width, height, pixel_format)
        try:
            cap.set_fps(max(self.config.fps, 1.0))
        except Exception as e:  # not every UVC camera takes a frame interval
            log.debug("%s: set_fps: %s", self.config.name, e)
        cap.open()
        fmt = cap.get_format()
        if fmt.pixel_format.human_str() != pixel_format:
            cap.close()
            raise DeviceError(
                self.config.name,
                f"{self.config.device} does not offer {pixel_format} "
                f"(got {fmt.pixel_format.human_str()})",
            )
        self._cap, self._fmt = cap, fmt

    def _stop(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            with contextlib.suppress(Exception):
                cap.close()

    def close(self) -> None:
        self._stop()
        dev, self._dev = self._dev, None
        if dev is not None:
            with contextlib.suppress(Exception):
                dev.close()

    def _grab(self, timeout: float) -> Any:
        try:
            ready, _, _ = select.select([self._dev], [], [], timeout)
            if not ready:
                return None
            return self._cap.buffer.raw_read()
        except Exception as e:
            raise DeviceUnavailable(self.config.name, f"{self.config.device}: {e}") from None

    def next_frame(self, timeout: float) -> Frame | None:
        if self._cap is None:
            raise DeviceUnavailable(self.config.name, "not open")
        raw = self._grab(timeout)
        if raw is None:
            return None
        now = time.monotonic()
        fmt = self._fmt
        if self.config.pixel_format == "YUYV":
            image = gray_from_yuyv(bytes(raw.data), fmt.width, fmt.height, fmt.bytes_per_line)
        else:
            image = gray_from_jpeg(bytes(raw.data), fmt.width, fmt.height)
        return Frame(image, now)

    def capture_still(self) -> Still:
        cfg = self.config
        self._stop()
        try:
            self._start(cfg.still_width, cfg.still_height, cfg.still_pixel_format)
            raw = None
            for _ in range(_STILL_SETTLE_FRAMES + 1):
                raw = self._grab(cfg.frame_timeout_s)
                if raw is None:
                    raise DeviceUnavailable(cfg.name, "no frame in still mode")
            assert raw is not None
            fmt = self._fmt
            data = bytes(raw.data)
        except DeviceError:
            raise
        except Exception as e:
            raise DeviceError(cfg.name, f"still capture failed: {e}") from None
        finally:
            self._stop()
            with contextlib.suppress(Exception):
                self._start(cfg.width, cfg.height, cfg.pixel_format)
        if cfg.still_pixel_format == "MJPG":
            # Re-encoded: UVC MJPG frames may lack Huffman tables and carry camera metadata.
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                return encode_jpeg(img.convert("RGB"), cfg.jpeg_quality)
        from PIL import Image

        yuyv = gray_from_yuyv(data, fmt.width, fmt.height, fmt.bytes_per_line)
        return encode_jpeg(Image.fromarray(yuyv), cfg.jpeg_quality)


def open_source(config: CameraDevice) -> FrameSource:
    """The frame source the profile names."""
    if config.source == "picamera2":
        return Picamera2Source(config)
    return V4L2Source(config)


# -- decoding ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Code:
    """One decoded code: its text as a scanner would send it, and zxing's symbology id."""

    text: str
    symbology: str
    format: str


class Decoder:
    """zxing-cpp with the profile's formats. Text in zxing's Plain mode: GS1 separators
    stay GS (0x1D), as scanners send them, and the AIM identifier is kept apart."""

    def __init__(
        self,
        formats: Sequence[str],
        *,
        try_rotate: bool = False,
        try_invert: bool = False,
        try_downscale: bool = True,
        device: str = "camera",
    ) -> None:
        try:
            import zxingcpp
        except ImportError:
            raise DriverMissing(
                device, "zxing-cpp is not installed (pip install 'madoguchi[camera]')"
            ) from None
        self._zx = zxingcpp
        self._formats = zxingcpp.barcode_formats_from_str(",".join(formats))
        self._opts = {
            "try_rotate": try_rotate,
            "try_invert": try_invert,
            "try_downscale": try_downscale,
        }

    @classmethod
    def for_device(cls, config: CameraDevice) -> Decoder:
        return cls(
            config.formats,
            try_rotate=config.try_rotate,
            try_invert=config.try_invert,
            try_downscale=config.try_downscale,
            device=config.name,
        )

    def decode(self, image: Any) -> list[Code]:
        """Every code in a grayscale array (or a Pillow image), in zxing's order."""
        zx = self._zx
        found = zx.read_barcodes(
            image, formats=self._formats, text_mode=zx.TextMode.Plain, **self._opts
        )
        return [Code(b.text, b.symbology_identifier, str(b.format)) for b in found if b.valid]


class InView:
    """A code in view counts once, and again only after `gone_after_s` out of view."""

    def __init__(self, gone_after_s: float) -> None:
        self.gone_after_s = gone_after_s
        self._last_seen: dict[tuple[str, str], float] = {}

    def arrivals(self, codes: Sequence[Code], at: float) -> list[Code]:
        """The codes of a frame taken at `at` that just came into view."""
        new: list[Code] = []
        for code in codes:
            key = (code.symbology, code.text)
            last = self._last_seen.get(key)
            if (last is None or at - last > self.gone_after_s) and code not in new:
                new.append(code)
            self._last_seen[key] = at if last is None else max(last, at)
        for key, seen in list(self._last_seen.items()):
            if at - seen > self.gone_after_s:
                del self._last_seen[key]
        return new


# -- the bridge between the capture thread and the event loop -----------------------


class LatestFrame:
    """A one-frame slot on the event loop's side: a new frame replaces one not yet taken."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.delivered = 0
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        if self._frame is not None:
            self.dropped += 1
        self._frame = frame
        self.delivered += 1
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        """The capture thread ended: `get()` raises this once the last frame is taken."""
        self._error = error
        self._ready.set()

    async def get(self) -> Frame:
        while self._frame is None:
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        frame, self._frame = self._frame, None
        return frame


class _CaptureThread:
    """The one thread that touches the camera: frames at the profile's rate, and stills."""

    def __init__(
        self,
        name: str,
        source: FrameSource,
        fps: float,
        frame_timeout_s: float,
        loop: asyncio.AbstractEventLoop,
        slot: LatestFrame,
    ) -> None:
        self.name = name
        self.source = source
        self.period = 1.0 / fps
        self.frame_timeout_s = frame_timeout_s
        self.loop = loop
        self.slot = slot
        self.stop = threading.Event()
        self.stills: queue.SimpleQueue[concurrent.futures.Future[Still]] = queue.SimpleQueue()
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=f"camera:{name}")

    def start(self) -> None:
        self.thread.start()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            self.source.open()
        except BaseException as e:
            with self._lock:
                self._closed = True
            self.opened.set_exception(e)
            return
        self.opened.set_result(None)
        try:
            self._loop()
        except MadoguchiError as e:
            self._post(self.slot.fail, e)
        except Exception as e:  # a library error we did not expect: the device is in trouble
            log.exception("%s: capture thread failed", self.name)
            self._post(self.slot.fail, DeviceError(self.name, f"capture failed: {e}"))
        finally:
            self.source.close()
            with self._lock:
                self._closed = True
            self._fail_stills(DeviceUnavailable(self.name, "camera closed"))

    def submit_still(self) -> concurrent.futures.Future[Still]:
        """Ask the thread for a still; it takes it between two frames."""
        fut: concurrent.futures.Future[Still] = concurrent.futures.Future()
        with self._lock:
            if self._closed or not self.opened.done():
                fut.set_exception(DeviceUnavailable(self.name, "camera is not streaming"))
            else:
                self.stills.put(fut)
        return fut

    def _loop(self) -> None:
        due = 0.0
        while not self.stop.is_set():
            self._serve_stills()
            frame = self.source.next_frame(self.frame_timeout_s)
            if frame is None:
                raise DeviceUnavailable(self.name, f"no frame for {self.frame_timeout_s:g} s")
            if frame.timestamp + 1e-3 < due:
                continue  # faster than the profile's rate: not even offered to the decoder
            late = frame.timestamp - due >= self.period
            due = frame.timestamp + self.period if late else due + self.period
            self._post(self.slot.put, frame)

    def _serve_stills(self) -> None:
        while True:
            try:
                fut = self.stills.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self.source.capture_still())
            except BaseException as e:
                fut.set_exception(e)
                if isinstance(e, DeviceUnavailable):
                    raise

    def _fail_stills(self, error: BaseException) -> None:
        while True:
            try:
                fut = self.stills.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)

    def join(self) -> None:
        self.stop.set()
        self.thread.join()


# -- the driver ---------------------------------------------------------------------


class CameraDriver(Driver):
    """A camera that reads codes at the profile's frame rate and takes ID photos."""

    config: CameraDevice

    def __init__(self, config: CameraDevice, *, source: FrameSource | None = None) -> None:
        super().__init__(config)
        self._source = source
        self._decoder: Decoder | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._capture: _CaptureThread | None = None
        self._slot: LatestFrame | None = None
        self.frames_decoded = 0
        self.codes_seen = 0

    @property
    def frames_dropped(self) -> int:
        return 0 if self._slot is None else self._slot.dropped

    def stats(self) -> dict[str, int]:
        """For telemetry: how many frames were decoded, and dropped because decoding lagged."""
        return {
            "frames_decoded": self.frames_decoded,
            "frames_dropped": self.frames_dropped,
            "codes_seen": self.codes_seen,
        }

    async def open(self) -> None:
        cfg = self.config
        # zxing-cpp (and the C++ runtime it maps) loads once a camera is there: a station
        # waiting for its camera to be plugged in should not pay for it; a missing
        # library is still reported at once, before any camera appears
        if importlib.util.find_spec("zxingcpp") is None:
            raise DriverMissing(
                cfg.name, "zxing-cpp is not installed (pip install 'madoguchi[camera]')"
            )
        source = self._source if self._source is not None else open_source(cfg)
        loop = asyncio.get_running_loop()
        self._slot = LatestFrame()
        capture = _CaptureThread(cfg.name, source, cfg.fps, cfg.frame_timeout_s, loop, self._slot)
        capture.start()
        try:
            await asyncio.wrap_future(capture.opened)
            self._decoder = Decoder.for_device(cfg)
        except BaseException:
            await asyncio.to_thread(capture.join)
            raise
        self._capture = capture
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode:{cfg.name}")
        log.info(
            "%s: %s camera streaming %dx%d, decoding %s at %g fps",
            cfg.name,
            cfg.source,
            cfg.width,
            cfg.height,
            ",".join(cfg.formats),
            cfg.fps,
        )

    async def close(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            await asyncio.shield(asyncio.to_thread(capture.join))
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        slot, pool, decoder = self._slot, self._pool, self._decoder
        if slot is None or pool is None or decoder is None:
            raise DeviceUnavailable(self.name, "not open")
        loop = asyncio.get_running_loop()
        in_view = InView(self.config.gone_after_ms / 1000)
        while True:
            frame = await slot.get()
            try:
                codes = await loop.run_in_executor(pool, decoder.decode, frame.image)
            except Exception as e:  # zxing-cpp refusing a frame: a driver fault, not a crash
                raise DeviceError(self.name, f"decoder failed: {type(e).__name__}: {e}") from e
            self.frames_decoded += 1
            for code in in_view.arrivals(codes, frame.timestamp):
                self.codes_seen += 1
                yield Read(
                    device=self.name,
                    kind="barcode",
                    data={"text": code.text, "symbology": code.symbology},
                    captured_at=frame.captured_at,
                )

    async def capture_photo(self) -> Still:
        """A still at the profile's resolution, taken by the capture thread."""
        capture = self._capture
        if capture is None:
            raise DeviceUnavailable(self.name, "camera is not streaming")
        return await asyncio.wrap_future(capture.submit_still())


#: mypy --strict fails here when the driver and the capabilities it offers drift apart
_offers_photos: type[PhotoCamera] = CameraDriver
_offers_stats: type[DriverStats] = CameraDriver
