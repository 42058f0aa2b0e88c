"""The kiosk's ID photo through the real camera driver and the real photo path.

`POST /v1/photos` on a running station (real outbox, real mosquitto, the real
`Station.capture_photo`: a sealed blob and a `photo` record) whose
`CameraDriver` takes its still from a frame source at the library boundary
(agent.testing.FakeCamera, as in tests/drivers/test_camera_sources.py): no
stand-in between the HTTP request and the driver. The other routes go through
real drivers elsewhere: the pty scanner (tests/station/test_api.py, events,
manual, status) and vpcd's card (tests/drivers/test_pcsc_kiosk.py).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from agent.station.sealing import Sealer
from agent.testing import Broker, FakeCamera, free_port, write_config
from tests.support.camera import camera_station, photo_scene

pytestmark = [pytest.mark.broker]


def config(tmp_path: Path, broker: Broker, port: int) -> Path:
    key = tmp_path / "outbox.key"
    Sealer.create_key_file(key)
    devices = f"""
[[devices]]
name = "id-camera"
profile = "generic-uvc-webcam"
device = "/dev/null-camera"
label = "顔写真カメラ"

[api]
port = {port}
role = "mynumber"
"""
    return write_config(
        tmp_path, broker.port, devices=devices, outbox=f'resend_after_s = 2\nkey_file = "{key}"'
    )


async def test_a_photo_through_the_real_camera_driver(broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    camera = FakeCamera([], frame_dt=0.05, still=photo_scene(640, 480), jpeg_quality=90)
    async with camera_station(config(tmp_path, broker, port), camera) as st:
        assert st.api is not None
        await st.api.ready.wait()
        auth = {"Authorization": f"Bearer {st.api.token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
            status = (await c.get("/v1/status", headers=auth)).json()
            assert status["cameras"] == ["id-camera"]
            assert status["labels"] == {"id-camera": "顔写真カメラ"}
            assert (status["role"], status["waiting"]) == ("mynumber", 0)
            r = await c.post("/v1/photos", headers=auth, json={"camera": "id-camera"})
            assert r.status_code == 201, r.text
            body = r.json()
            assert (body["device"], body["width"], body["height"]) == ("id-camera", 640, 480)
            assert body["content_type"] == "image/jpeg" and body["bytes"] > 1000
            status = (await c.get("/v1/status", headers=auth)).json()
            assert status["outbox"]["last_seq"] == 1
            assert status["waiting"] == 1  # no registry: waiting until one confirms it
            blobs = list((tmp_path / "data-station-03" / "blobs").glob("*.sealed"))
            assert len(blobs) == 1
    assert camera.stills_taken == 1
