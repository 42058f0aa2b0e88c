"""Camera: real zxing-cpp images through the real decoder, capture thread and driver."""

from __future__ import annotations

import asyncio
import io
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zxingcpp
from PIL import Image

from agent.config import BarcodeFormatName, CameraDevice, load_config
from agent.config_schema import validate_device
from agent.contract.records import Read
from agent.drivers import create_driver
from agent.drivers.camera import (
    CameraDriver,
    Code,
    Decoder,
    Frame,
    InView,
    LatestFrame,
    gray_from_bytes,
    gray_from_yuyv,
)
from agent.errors import ConfigError, DeviceUnavailable, DriverMissing
from agent.testing import Broker, FakeCamera, RegistryProbe, write_config
from tests.support.camera import (
    EAN,
    FORM_ID,
    TICKET,
    VIAL_RAW,
    blur,
    camera_station,
    centered,
    ean13,
    low_contrast,
    noise,
    perspective,
    photo_scene,
    place,
    qr,
    rotate,
    scene,
    vial,
)

ROOT = Path(__file__).resolve().parents[2]


def camera_config(**overrides: Any) -> CameraDevice:
    base: dict[str, Any] = {
        "name": "counter-camera",
        "profile": "generic-uvc-webcam",
        "driver": "camera",
        "source": "v4l2",
        "formats": ["QRCode", "DataMatrix", "EAN13"],
    }
    return validate_device({**base, **overrides}, CameraDevice)


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return Decoder(["QRCode", "DataMatrix", "EAN13"])


HARD = {
    "ticket-qr plain": (lambda: centered(qr(TICKET)), TICKET, "]Q1"),
    "ticket-qr turned 33deg": (lambda: rotate(centered(qr(TICKET)), 33), TICKET, "]Q1"),
    "ticket-qr upside down": (lambda: rotate(centered(qr(TICKET)), 180), TICKET, "]Q1"),
    "ticket-qr at an angle": (lambda: perspective(centered(qr(TICKET)), 0.3), TICKET, "]Q1"),
    "ticket-qr out of focus": (lambda: blur(centered(qr(TICKET)), 1.5), TICKET, "]Q1"),
    "ticket-qr noisy": (lambda: noise(centered(qr(TICKET)), 40), TICKET, "]Q1"),
    "ticket-qr poor light": (lambda: low_contrast(centered(qr(TICKET)), 110, 150), TICKET, "]Q1"),
    "ticket-qr poor light and noise": (
        lambda: noise(low_contrast(centered(qr(TICKET)), 100, 160), 8),
        TICKET,
        "]Q1",
    ),
    "form-qr small, turned, soft": (
        lambda: blur(rotate(centered(qr(FORM_ID, 3)), -20), 1.0),
        FORM_ID,
        "]Q1",
    ),
    "vial gs1 datamatrix turned": (lambda: rotate(centered(vial()), 17), VIAL_RAW, "]d2"),
    "vial gs1 datamatrix at an angle": (
        lambda: perspective(centered(vial()), 0.25),
        VIAL_RAW,
        "]d2",
    ),
    "vial gs1 datamatrix soft and noisy": (
        lambda: noise(blur(centered(vial()), 1.0), 12),
        VIAL_RAW,
        "]d2",
    ),
    "ean-13 turned": (lambda: rotate(centered(ean13()), 12), EAN, "]E0"),
    "ean-13 out of focus": (lambda: blur(centered(ean13()), 1.2), EAN, "]E0"),
    "ean-13 poor light and noise": (lambda: noise(low_contrast(centered(ean13())), 10), EAN, "]E0"),
}


@pytest.mark.parametrize("case", list(HARD))
def test_decoder_reads_hard_images(decoder: Decoder, case: str) -> None:
    make, text, symbology = HARD[case]
    image = make()
    assert image.shape == (480, 640) and image.dtype == np.uint8
    assert decoder.decode(image) == [
        Code(text, symbology, str(zxingcpp.barcode_format_from_str(_fmt(symbology))))
    ]


def _fmt(symbology: str) -> str:
    return {"]Q1": "QRCode", "]d2": "DataMatrix", "]E0": "EAN13"}[symbology]


def test_gs1_text_is_what_a_scanner_sends(decoder: Decoder) -> None:
    """FNC1 after the variable-length lot arrives as GS, with ]d2 kept apart."""
    (found,) = decoder.decode(centered(vial()))
    assert found.symbology == "]d2"
    assert "\x1d21SN0001" in found.text and not found.text.startswith("]")


def test_two_codes_in_one_frame(decoder: Decoder) -> None:
    frame = place(place(scene(), qr(TICKET), 40, 100), vial(), 380, 120)
    found = {(c.text, c.symbology) for c in decoder.decode(noise(frame, 6))}
    assert found == {(TICKET, "]Q1"), (VIAL_RAW, "]d2")}


def test_nothing_read_from_an_empty_scene_or_a_hopeless_blur(decoder: Decoder) -> None:
    assert decoder.decode(scene(3)) == []
    assert decoder.decode(blur(centered(qr(TICKET)), 4.0)) == []


def test_only_the_profile_formats_are_read() -> None:
    qr_only = Decoder(["QRCode"])
    frame = place(place(scene(), qr(TICKET), 40, 100), ean13(), 300, 300)
    assert [c.text for c in qr_only.decode(frame)] == [TICKET]


def test_every_config_format_name_is_known_to_zxing() -> None:
    for name in typing.get_args(BarcodeFormatName):
        assert zxingcpp.barcode_formats_from_str(name), name


def test_gray_from_raw_luma_and_yuyv() -> None:
    image = centered(qr(TICKET))
    assert np.array_equal(gray_from_bytes(image.tobytes(), 640, 480), image)
    padded = np.zeros((480, 704), np.uint8)
    padded[:, :640] = image
    assert np.array_equal(gray_from_bytes(padded.tobytes(), 640, 480, stride=704), image)
    yuyv = np.full((480, 1280), 128, np.uint8)
    yuyv[:, 0::2] = image
    assert np.array_equal(gray_from_yuyv(yuyv.tobytes(), 640, 480), image)


def test_in_view_counts_a_code_once_until_it_has_been_gone() -> None:
    a, b = Code(TICKET, "]Q1", "QR Code"), Code(EAN, "]E0", "EAN-13")
    view = InView(gone_after_s=1.0)
    assert view.arrivals([a], 0.0) == [a]
    assert view.arrivals([a], 0.2) == []
    assert view.arrivals([a, b], 0.4) == [b]  # a second code joins: only it is new
    assert view.arrivals([], 0.9) == []
    assert view.arrivals([a], 1.3) == []  # a was gone 0.9 s < 1.0 s: same presence
    assert view.arrivals([], 2.0) == []
    assert view.arrivals([a, b], 2.4) == [a, b]  # both were gone long enough
    view2 = InView(gone_after_s=1.0)
    assert view2.arrivals([a, a], 0.0) == [a]  # the same code twice in a frame: once


async def test_latest_frame_slot_drops_instead_of_queueing() -> None:
    slot = LatestFrame()
    frames = [Frame(scene(i), float(i)) for i in range(3)]
    for f in frames:
        slot.put(f)
    got = await slot.get()
    assert got is frames[-1]
    assert slot.dropped == 2
    slot.put(frames[0])
    slot.fail(DeviceUnavailable("cam", "gone"))
    assert await slot.get() is frames[0]  # a frame already in the slot is still decoded
    with pytest.raises(DeviceUnavailable):
        await slot.get()


def test_profiles_load_and_unknown_keys_are_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nsite = "s"\nname = "a"\n[mqtt]\nhost = "127.0.0.1"\n'
        '[[devices]]\nname = "pi-cam"\nprofile = "raspberry-pi-camera-module-3"\n'
        '[[devices]]\nname = "webcam"\nprofile = "generic-uvc-webcam"\n'
        'device = "/dev/v4l/by-id/usb-cam-video-index0"\nfps = 8\n'
    )
    config = load_config(cfg)
    pi, web = config.devices
    assert isinstance(pi, CameraDevice) and isinstance(web, CameraDevice)
    assert (pi.source, pi.width, pi.height, pi.fps) == ("picamera2", 640, 480, 5.0)
    assert (pi.still_width, pi.still_height) == (2304, 1296)
    assert (web.source, web.device, web.fps) == ("v4l2", "/dev/v4l/by-id/usb-cam-video-index0", 8)
    assert isinstance(create_driver(web), CameraDriver)

    cfg.write_text(
        '[agent]\nsite = "s"\nname = "a"\n[mqtt]\nhost = "127.0.0.1"\n'
        '[[devices]]\nname = "webcam"\nprofile = "generic-uvc-webcam"\n'
        'formats = ["QRCode", "Kanji"]\nfps = 0\nzoom = 2\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    text = "\n".join(err.value.problems)
    assert 'devices["webcam"].formats[1]' in text
    assert 'devices["webcam"].fps' in text
    assert 'devices["webcam"].zoom: unknown key' in text


def test_every_camera_field_is_described() -> None:
    from agent.config_schema import CameraDevice as Schema

    for name, f in Schema.model_fields.items():
        assert f.description, name


async def collect_reads(driver: CameraDriver, camera: FakeCamera) -> list[Read]:
    reads: list[Read] = []
    async with driver:
        with pytest.raises(DeviceUnavailable, match="unplugged"):
            async for event in driver.reads():
                assert isinstance(event, Read)
                reads.append(event)
    assert camera.script_done.is_set()
    return reads


async def test_a_code_in_view_becomes_one_read_until_it_leaves() -> None:
    """Held in front of the camera for 1.5 s, away briefly, back, gone 2 s, back: 2 reads."""
    ticket = noise(perspective(centered(qr(TICKET)), 0.2), 10)
    empty = scene(5)
    script = (
        [empty] * 5
        + [ticket] * 30  # 1.5 s in view
        + [empty] * 6  # 0.3 s away: shorter than gone_after
        + [ticket] * 20
        + [empty] * 40  # 2 s away: gone
        + [ticket] * 20
        + [empty] * 5
    )
    camera = FakeCamera(script, frame_dt=0.05, end_with_unplug=True)
    driver = CameraDriver(camera_config(fps=20, gone_after_ms=1000), source=camera)
    reads = await collect_reads(driver, camera)
    assert [(r.kind, r.data) for r in reads] == [
        ("barcode", {"text": TICKET, "symbology": "]Q1"}),
        ("barcode", {"text": TICKET, "symbology": "]Q1"}),
    ]
    assert reads[0].device == "counter-camera"
    assert driver.frames_decoded > 0
    assert camera.thread_names == {"camera:counter-camera"}  # one thread touched the camera


async def test_two_codes_held_together_are_two_reads() -> None:
    both = noise(place(place(scene(), qr(FORM_ID, 3), 60, 120), vial(), 380, 140), 6)
    camera = FakeCamera([scene()] * 3 + [both] * 20, frame_dt=0.05, end_with_unplug=True)
    driver = CameraDriver(camera_config(fps=20), source=camera)
    reads = await collect_reads(driver, camera)
    assert sorted((r.data["text"], r.data["symbology"]) for r in reads) == sorted(
        [(FORM_ID, "]Q1"), (VIAL_RAW, "]d2")]
    )


async def test_frames_beyond_the_profile_rate_are_not_decoded() -> None:
    """A 20 fps camera decoded at 5 fps: at most every fourth frame reaches the decoder."""
    camera = FakeCamera([scene(i % 4) for i in range(40)], frame_dt=0.05, end_with_unplug=True)
    driver = CameraDriver(camera_config(fps=5), source=camera)
    await collect_reads(driver, camera)
    assert driver.frames_decoded <= 11  # 2 s of camera time at 5 fps, plus the first


async def test_capture_photo_runs_on_the_camera_thread() -> None:
    still = photo_scene(800, 600)
    camera = FakeCamera([], frame_dt=0.02, still=still)
    driver = CameraDriver(camera_config(), source=camera)
    async with driver:
        reader = asyncio.ensure_future(anext(aiter(driver.reads())))
        photo = await asyncio.wait_for(driver.capture_photo(), 10)
        reader.cancel()
    assert (photo.width, photo.height, photo.content_type) == (800, 600, "image/jpeg")
    assert photo.data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(photo.data)) as img:
        assert img.size == (800, 600)
    assert camera.stills_taken == 1
    assert camera.thread_names == {"camera:counter-camera"}
    with pytest.raises(DeviceUnavailable):
        await driver.capture_photo()  # closed


async def test_v4l2_source_on_a_missing_device_is_unavailable(tmp_path: Path) -> None:
    driver = create_driver(camera_config(device=str(tmp_path / "video9")))
    with pytest.raises(DeviceUnavailable, match="video9"):
        async with driver:
            pass


async def test_picamera2_missing_is_a_clear_driver_error() -> None:
    try:
        import picamera2  # noqa: F401

        pytest.skip("picamera2 is installed here")
    except ImportError:
        pass
    driver = create_driver(camera_config(source="picamera2"))
    with pytest.raises(DriverMissing, match="apt install python3-picamera2"):
        async with driver:
            pass


@pytest.mark.broker
async def test_codes_held_to_the_camera_reach_the_registry_once(
    broker: Broker, registry: RegistryProbe, tmp_path: Path
) -> None:
    """Through the station: interpretation, outbox, uplink, mosquitto, reference registry."""
    ticket = noise(rotate(centered(qr(TICKET)), 20), 8)
    jan = blur(centered(ean13()), 0.8)
    empty = scene(11)
    script = [empty] * 4 + [ticket] * 30 + [empty] * 4 + [jan] * 20 + [empty] * 4
    camera = FakeCamera(script, frame_dt=0.05)
    devices = '\n[[devices]]\nname = "id-camera"\nprofile = "generic-uvc-webcam"\nfps = 20\n'
    config = write_config(tmp_path, broker.port, devices=devices)
    async with camera_station(config, camera) as station:
        records = await registry.wait_for(2, timeout=30)
        await asyncio.to_thread(camera.script_done.wait, 30)
        served = camera.served
        while camera.served < served + 10:  # the decoder is past every scripted frame
            await asyncio.sleep(0.05)
        assert station.devices["id-camera"].reads == 2
        described = station.describe()["devices"]["id-camera"]
        assert described["codes_seen"] == 2 and described["frames_decoded"] > 0
        assert station.outbox is not None and (await station.outbox.stats()).last_seq == 2
    assert [(r["seq"], r["kind"], r["device"]) for r in records] == [
        (1, "barcode", "id-camera"),
        (2, "barcode", "id-camera"),
    ]
    assert [(r["data"]["text"], r["data"]["symbology"]) for r in records] == [
        (TICKET, "]Q1"),
        (EAN, "]E0"),
    ]
    assert all("interpretation" in r["data"] for r in records)


def test_try_rotate_is_only_needed_for_vertical_linear_codes() -> None:
    upright = rotate(centered(ean13()), 90)
    assert Decoder(["EAN13"]).decode(upright) == []
    assert [c.text for c in Decoder(["EAN13"], try_rotate=True).decode(upright)] == [EAN]
    turned_qr = rotate(centered(qr(TICKET)), 90)
    assert [c.text for c in Decoder(["QRCode"]).decode(turned_qr)] == [TICKET]
