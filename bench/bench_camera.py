"""Camera benchmark: decode cost per frame, sustainable frame rate, CPU share at the
profile's rate, and photo transfer through a real mosquitto.

    PYTHONPATH=. .venv/bin/python bench/bench_camera.py [--quick]

Everything runs pinned to ONE core (sched_setaffinity) so the figures are per core.
Frames are the generated images of the tests (zxing-cpp's own encoder, then
turned, blurred, noised). The same script runs unchanged on a Raspberry Pi 4:
that is the way to replace the estimate it prints with a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support

from agent.config import CameraDevice, load_config  # noqa: E402
from agent.config_schema import validate_device  # noqa: E402
from agent.drivers.camera import (  # noqa: E402
    CameraDriver,
    Decoder,
    gray_from_jpeg,
    gray_from_yuyv,
)
from agent.station.app import StationApp  # noqa: E402
from agent.station.sealing import Sealer  # noqa: E402
from agent.testing import Broker, FakeCamera, running_registry, write_config  # noqa: E402
from tests.support.camera import (  # noqa: E402
    TICKET,
    blur,
    centered,
    ean13,
    noise,
    perspective,
    photo_scene,
    qr,
    rotate,
    scene,
    vial,
)

FORMATS = ["QRCode", "DataMatrix", "EAN13"]
#: single-core speed of a Raspberry Pi 4 (Cortex-A72, 1.5 GHz) relative to one core of
#: a current x86 server, from public single-thread benchmark ratios (Geekbench 5:
#: Pi 4 about 250-300, recent Xeon/Core cores 1100-1700): a factor of 4 to 6.
PI4_SLOWDOWN = (4.0, 6.0)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn: Any, arg: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn(arg)
        out.append((time.perf_counter() - t) * 1000)
    return out


def decode_costs(n: int) -> dict[str, float]:
    decoder = Decoder(FORMATS)
    frames = {
        "empty scene (no code)": scene(1),
        "noisy empty scene (no code)": noise(scene(2), 12),
        "ticket QR": centered(qr(TICKET)),
        "ticket QR turned, sensor noise": noise(rotate(centered(qr(TICKET)), 25), 4),
        "ticket QR turned, heavy noise": noise(rotate(centered(qr(TICKET)), 25), 10),
        "ticket QR at an angle, soft": blur(perspective(centered(qr(TICKET)), 0.25), 1.0),
        "vial GS1 DataMatrix": centered(vial()),
        "EAN-13": centered(ean13()),
    }
    medians = {}
    print(f"decode time per 640x480 frame, formats {','.join(FORMATS)} (median / p95 of {n}):")
    for name, frame in frames.items():
        assert name.endswith("(no code)") or decoder.decode(frame), name
        ms = timed(decoder.decode, frame, n)
        med, p95 = statistics.median(ms), statistics.quantiles(ms, n=20)[18]
        medians[name] = med
        print(f"  {name:32} {med:6.2f} ms  {p95:6.2f} ms")
    variants = {
        "8 formats": Decoder(
            ["QRCode", "DataMatrix", "EAN13", "EAN8", "Code128", "ITF", "Codabar", "PDF417"]
        ),
        "try_rotate on": Decoder(FORMATS, try_rotate=True),
        "try_invert on": Decoder(FORMATS, try_invert=True),
    }
    for label, variant in variants.items():
        for fname in ("empty scene (no code)", "noisy empty scene (no code)"):
            ms = statistics.median(timed(variant.decode, frames[fname], n))
            print(f"  {fname.replace(' (no code)', '') + ', ' + label:32} {ms:6.2f} ms")

    yuyv = bytes(1280 * 480)
    ms = statistics.median(timed(lambda b: gray_from_yuyv(b, 640, 480).copy(), yuyv, n))
    print(f"  {'YUYV -> luma (V4L2 source)':32} {ms:6.2f} ms")
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(centered(qr(TICKET))).convert("RGB").save(buf, format="JPEG", quality=80)
    jpeg = buf.getvalue()
    ms = statistics.median(timed(lambda b: gray_from_jpeg(b, 640, 480), jpeg, n))
    print(f"  {'MJPG -> luma (V4L2 source)':32} {ms:6.2f} ms")
    return medians


def driver_config(fps: float) -> CameraDevice:
    cfg = validate_device(
        {
            "name": "bench-camera",
            "profile": "generic-uvc-webcam",
            "driver": "camera",
            "source": "v4l2",
            "formats": FORMATS,
        },
        CameraDevice,
    )
    return dataclasses.replace(cfg, fps=fps)  # past the config's 60 fps cap on purpose


async def run_driver(
    fps: float, camera_fps: float, seconds: float, frames: list[Any]
) -> dict[str, float]:
    """The real driver (capture thread, slot, decoder) for `seconds`; CPU of the process."""
    script = frames * int(seconds * camera_fps / len(frames) + 2)
    camera = FakeCamera(script, frame_dt=1.0 / camera_fps)
    driver = CameraDriver(driver_config(fps), source=camera)
    reads = 0
    async with driver:

        async def consume() -> None:
            nonlocal reads
            async for _ in driver.reads():
                reads += 1

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)  # warm up
        c0, t0, d0 = cpu_seconds(), time.perf_counter(), driver.frames_decoded
        drop0 = driver.frames_dropped
        await asyncio.sleep(seconds)
        c1, t1, d1 = cpu_seconds(), time.perf_counter(), driver.frames_decoded
        drop1 = driver.frames_dropped
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    wall = t1 - t0
    return {
        "decoded_fps": (d1 - d0) / wall,
        "cpu_share": (c1 - c0) / wall,
        "dropped": drop1 - drop0,
        "reads": reads,
    }


# -- photo transfer through mosquitto ---------------------------------------------------


async def photo_transfer(photos: int) -> tuple[float, int, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Broker(tmp, persistence=False, log=False, settings="max_packet_size 262144\n")
        broker.start()
        try:
            key = tmp / "key"
            Sealer.create_key_file(key)
            cfg_path = write_config(
                tmp,
                broker.port,
                devices='[[devices]]\nname = "id-camera"\nprofile = "generic-uvc-webcam"\n',
                site="bench",
                name="station-01",
                telemetry_interval_s=None,
                outbox=f'key_file = "{key}"',
                path=tmp / "agent.toml",
                data_dir=tmp / "data",
            )
            cfg = load_config(cfg_path)
            camera = FakeCamera([], frame_dt=0.1, still=photo_scene(2000, 1500), jpeg_quality=92)
            station = StationApp(cfg, driver_factory=lambda dev: CameraDriver(dev, source=camera))  # type: ignore[arg-type]
            async with running_registry(broker.port, tmp / "registry.db") as probe:
                registry = probe.registry
                stop = asyncio.Event()
                st_task = asyncio.create_task(station.run(stop))
                await asyncio.wait_for(station.ready.wait(), 10)
                while (
                    not (station.uplink and station.uplink.connected)
                    or not station.running_drivers()
                ):
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                total = 0
                elapsed = 0.0
                for _ in range(photos):
                    result = await station.capture_photo()
                    t0 = time.perf_counter()
                    final = registry.blobs.final_path("bench", "station-01", result["record_id"])
                    blob_dir = tmp / "data" / "blobs"
                    while not final.exists() or list(blob_dir.glob("*.sealed")):
                        await asyncio.sleep(0.002)
                    elapsed += time.perf_counter() - t0
                    assert hashlib.sha256(final.read_bytes()).hexdigest() == result["sha256"]
                    total += result["bytes"]
                stop.set()
                await st_task
        finally:
            broker.kill()
    return total / elapsed / 1e6, total // photos, elapsed / photos


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    n = 30 if args.quick else 100
    seconds = 4.0 if args.quick else 10.0
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, pinned to one; python {platform.python_version()}"
    )
    print(f"load average at start: {os.getloadavg()[0]:.2f}\n")

    medians = decode_costs(n)
    no_code = medians["empty scene (no code)"]
    with_code = medians["ticket QR turned, sensor noise"]

    frames_with = [noise(rotate(centered(qr(TICKET)), 25), 4), scene(3)]
    print("\nthe real driver (capture thread + slot + decoder), camera much faster than decoding:")
    fast = asyncio.run(run_driver(fps=1000, camera_fps=1000, seconds=seconds, frames=frames_with))
    print(
        f"  sustainable: {fast['decoded_fps']:.0f} decoded frames/s on one core "
        f"(frames dropped, not queued: {fast['dropped']:.0f})"
    )
    print("\nCPU share of one core at the profile's 5 fps (camera delivering 30 fps):")
    lo, hi = PI4_SLOWDOWN
    cases = (
        ("no code in view", [scene(4)]),
        ("noisy, no code", [noise(scene(4), 4)]),
        ("a code in view", frames_with[:1]),
    )
    shares = {}
    for label, frames in cases:
        r = asyncio.run(run_driver(fps=5, camera_fps=30, seconds=seconds, frames=frames))
        shares[label] = r["cpu_share"]
        print(
            f"  {label:16} {100 * r['cpu_share']:5.1f} % of one core "
            f"({r['decoded_fps']:.1f} fps decoded)"
        )
    print(f"\nRaspberry Pi 4 estimate: the shares above x {lo:.0f}..{hi:.0f} (single-core ratio):")
    for label, share in shares.items():
        print(f"  {label:16} {100 * share * lo:5.1f}..{100 * share * hi:5.1f} % of one core")
    print(
        f"  per frame: no code {no_code * lo:.0f}..{no_code * hi:.0f} ms, "
        f"code in view {with_code * lo:.0f}..{with_code * hi:.0f} ms"
    )
    photos = 2 if args.quick else 5
    mbps, size, per = asyncio.run(photo_transfer(photos))
    print(
        f"\nphoto transfer through mosquitto (loopback, QoS 1, 200 KB chunks, hash verified):"
        f"\n  {photos} photos of {size / 1e6:.2f} MB: {mbps:.1f} MB/s, "
        f"{per * 1000:.0f} ms per photo from commit to the registry's verified blob "
        "and the agent's deletion"
    )


if __name__ == "__main__":
    main()
