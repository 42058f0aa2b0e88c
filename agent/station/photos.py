"""ID photos (顔写真): camera still -> sealed blob -> `photo` record.

Triggered by the MQTT command `cmd/capture_photo` (and by the kiosk's local
API). Order matters for "never lose": the blob is sealed and fsynced first,
then the record that names it is committed; only then does the caller hear
"ok". If the commit fails the blob is deleted again; if the agent dies in
between, the sweep in agent/station/blobs.py removes the orphan.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from agent.contract.blobs import PHOTO_KIND
from agent.contract.records import Read, utc_now
from agent.drivers.capabilities import PhotoCamera
from agent.errors import DeviceError, DeviceUnavailable, OutboxError
from agent.station.blobs import BlobStore

if TYPE_CHECKING:
    from agent.station.feedback import Outcome

log = logging.getLogger(__name__)


class PhotoStation(Protocol):
    """What taking a photo needs of the station."""

    blobs: BlobStore | None

    def photo_camera(self, device: str | None) -> PhotoCamera: ...

    async def accept(self, read: Read) -> Outcome: ...


async def take_photo(station: PhotoStation, device: str | None = None) -> dict[str, Any]:
    """Take, seal, commit. Returns what the command result and the kiosk show (no pixels)."""
    blobs = station.blobs
    if blobs is None:
        raise OutboxError("the station keeps no blobs (outbox not open)")
    camera = station.photo_camera(device)
    blobs.require_sealing()  # before the shutter: a photo that cannot be sealed is not taken
    captured_at = utc_now()
    still = await camera.capture_photo()
    sha = await asyncio.to_thread(blobs.put, still.data)
    try:
        read = Read(
            device=camera.name,
            kind=PHOTO_KIND,
            data={
                "sha256": sha,
                "bytes": len(still.data),
                "width": still.width,
                "height": still.height,
                "content_type": still.content_type,
            },
            captured_at=captured_at,
        )
        outcome = await station.accept(read)
        if outcome.record is None:
            await asyncio.to_thread(blobs.delete, sha)
            raise OutboxError(f"{camera.name}: photo not stored: {outcome.error}")
    finally:
        blobs.settled(sha)
    record = outcome.record
    log.info(
        "%s: photo stored as record seq %d (%d bytes)", camera.name, record.seq, len(still.data)
    )
    return {
        "device": camera.name,
        "record_id": record.id,
        "seq": record.seq,
        "sha256": sha,
        "bytes": len(still.data),
        "width": still.width,
        "height": still.height,
        "content_type": still.content_type,
    }


def find_camera(drivers: dict[str, Any], device: str | None) -> PhotoCamera:
    """The running driver that can take photos: the named one, or the only one."""
    able = {name: d for name, d in drivers.items() if hasattr(d, "capture_photo")}
    if device is not None:
        if device in able:
            return able[device]  # type: ignore[no-any-return]
        if device in drivers:
            raise DeviceError(device, "this device cannot take photos")
        raise DeviceUnavailable(device, "no such camera is running")
    if len(able) == 1:
        return next(iter(able.values()))  # type: ignore[no-any-return]
    if not able:
        raise DeviceUnavailable("camera", "no camera is running")
    raise DeviceError("camera", f"several cameras run ({', '.join(sorted(able))}): name one")
