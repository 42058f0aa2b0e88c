"""Blobs (ID photos): sealed files beside the outbox, sent to the registry in chunks.

A photo record carries only the blob's `sha256`, `bytes`, `width`, `height`
and `content_type`; the image itself is personal data and never goes into
the outbox, a log or a records message. It is kept here:

- `BlobStore`: one file per blob in `{data_dir}/blobs/`, named by its
  SHA-256, AES-GCM sealed with the outbox key (agent/sealing.py; the hash is
  the associated data, and the opened bytes are hashed again). Written and
  fsynced *before* the photo record is committed, so a committed record
  always has its blob; deleted once the registry confirms the record.
  Files that no unconfirmed record names (a crash between the two) are swept.
- `BlobSender`: the agent's half of the chunk protocol (docs/CONTRACT.md,
  "Blobs"). When a photo record is published, its manifest follows; the
  registry answers with the chunk numbers it lacks and the sender publishes
  exactly those (<= 200 KB each, under the 256 KB packet cap of brokers).
  The registry acks the record only when every chunk is in and the hash
  verifies, so an interrupted transfer resumes where it stopped whenever
  the record is sent again (after a reconnect, or after `resend_after_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent._aio import raise_if_cancelling
from agent.contract.blobs import (
    CHUNK_BYTES,
    MAX_BLOB_BYTES,
    PHOTO_KIND,
    chunk_count,
    is_sha256,
    manifest,
)
from agent.contract.messages import load_object
from agent.contract.topics import Topics
from agent.errors import OutboxError
from agent.station.sealing import Sealer

if TYPE_CHECKING:
    import aiomqtt

    from agent.contract.records import Record
    from agent.contract.topics import StationTopics

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Sealed, content-addressed blob files. Blocking: call from a worker thread."""

    def __init__(self, directory: Path, sealer: Sealer | None) -> None:
        self.directory = directory
        self._sealer = sealer
        self._lock = threading.Lock()
        self._uncommitted: set[str] = set()

    def _path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise OutboxError(f"{self.directory}: not a blob name: {sha256[:80]!r}")
        return self.directory / f"{sha256}.sealed"

    def require_sealing(self) -> Sealer:
        """Photos are personal data: refuse to take one that could not be stored encrypted."""
        if self._sealer is None:
            raise OutboxError(
                "photos are personal data: configure outbox.key_file so that they are "
                "stored encrypted"
            )
        return self._sealer

    def put(self, data: bytes) -> str:
        """Seal and store durably; returns the SHA-256. Held from the sweep until `settled()`."""
        sealer = self.require_sealing()
        if len(data) > MAX_BLOB_BYTES:
            raise OutboxError(f"blob of {len(data)} bytes is over the {MAX_BLOB_BYTES} limit")
        sha = hashlib.sha256(data).hexdigest()
        sealed = sealer.seal(data, aad=f"blob:{sha}".encode())
        path = self._path(sha)
        with self._lock:
            self._uncommitted.add(sha)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(sealed)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.directory)
        except OSError as e:
            self.settled(sha)
            raise OutboxError(f"{self.directory}: cannot store blob: {e.strerror}") from e
        return sha

    def settled(self, sha256: str) -> None:
        """The record naming this blob is committed (or was refused): the sweep may judge it."""
        with self._lock:
            self._uncommitted.discard(sha256)

    def get(self, sha256: str) -> bytes:
        """The plain bytes, checked against their hash."""
        if self._sealer is None:
            raise OutboxError("blobs are sealed but no outbox.key_file is configured")
        path = self._path(sha256)
        try:
            sealed = path.read_bytes()
        except OSError as e:
            raise OutboxError(f"{path}: cannot read blob: {e.strerror}") from e
        try:
            data = self._sealer.open(sealed, aad=f"blob:{sha256}".encode())
        except Exception:  # cryptography's InvalidTag: wrong key or a damaged file
            raise OutboxError(f"{path}: blob does not open with the outbox key") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise OutboxError(f"{path}: blob does not match its hash")
        return data

    def delete(self, sha256: str) -> bool:
        try:
            self._path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def names(self) -> set[str]:
        if not self.directory.is_dir():
            return set()
        return {p.stem for p in self.directory.glob("*.sealed")}

    def sweep(self, keep: Iterable[str]) -> int:
        """Delete blobs no unconfirmed record names (and none being committed right now)."""
        keep = set(keep)
        with self._lock:
            keep |= self._uncommitted
        n = 0
        for name in self.names() - keep:
            if self.delete(name):
                n += 1
        for tmp in self.directory.glob("*.tmp") if self.directory.is_dir() else ():
            with contextlib.suppress(OSError):
                tmp.unlink()
        return n


class UnconfirmedSource(Protocol):
    async def unconfirmed_data(self, kind: str) -> list[tuple[str, dict[str, Any]]]: ...


@dataclass(slots=True)
class _Job:
    record_id: str
    sha256: str
    data: dict[str, Any]
    chunks: list[int] | None = None  # None: send the manifest


class BlobSender:
    """The uplink's blob half: manifests after photo records, chunks when asked."""

    def __init__(
        self, store: BlobStore, topics: StationTopics, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self.store = store
        self.topics = topics
        self._grammar = Topics(topics.prefix)
        self.chunk_bytes = chunk_bytes
        self._jobs: dict[str, _Job] = {}
        self._photos: dict[str, str] = {}  # record id -> sha256, for deletion on confirmation
        self._data: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.manifests_sent = 0
        self.deleted = 0

    def describe(self) -> dict[str, Any]:
        """Counters for the uplink's telemetry (no file system access)."""
        return {
            "blob_manifests_sent": self.manifests_sent,
            "blob_chunks_sent": self.chunks_sent,
            "blob_bytes_sent": self.bytes_sent,
            "blobs_deleted": self.deleted,
        }

    # -- hooks the uplink calls ---------------------------------------------------------

    def records_sent(self, records: Iterable[Record]) -> None:
        """Photo records just published: their manifests follow."""
        for r in records:
            if r.kind != PHOTO_KIND or not is_sha256(r.data.get("sha256")):
                continue
            self._photos[r.id] = r.data["sha256"]
            self._data[r.id] = r.data
            if r.id not in self._jobs:  # chunks already asked for are worth more than a manifest
                self._jobs[r.id] = _Job(r.id, r.data["sha256"], r.data)
                self._wake.set()

    def handle(self, topic: str, payload: Any) -> None:
        """`blobs/{record_id}/missing` from the registry: which chunks to send."""
        t = self._grammar.parse(topic)
        mine = t is not None and (t.site, t.agent) == (self.topics.site, self.topics.agent)
        if t is None or not mine or t.kind != "blob_missing" or t.record_id is None:
            return
        rid = t.record_id
        try:
            body = load_object(payload)  # any bytes: depth, encoding, size
            missing = body["missing"]
            sha = body["sha256"]
            if not isinstance(missing, list) or not all(isinstance(i, int) for i in missing):
                raise ValueError("missing must be a list of chunk numbers")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignored a malformed blob request for %s: %s", rid, e)
            return
        data = self._data.get(rid)
        if data is None or data.get("sha256") != sha:
            log.debug("blob request for %s that this agent does not hold", rid)
            return
        total = chunk_count(int(data["bytes"]), self.chunk_bytes)
        wanted = sorted({i for i in missing if 0 <= i < total})
        if wanted:
            self._jobs[rid] = _Job(rid, sha, data, wanted)
            self._wake.set()

    async def confirmed(self, ids: Iterable[str]) -> None:
        """The registry confirmed these records: their blobs go now."""
        ids = list(ids)
        shas = [self._photos.pop(i) for i in ids if i in self._photos]
        for i in ids:
            self._data.pop(i, None)
            self._jobs.pop(i, None)
        for sha in shas:
            if await asyncio.to_thread(self.store.delete, sha):
                self.deleted += 1

    # -- the sending task (one per connection) -------------------------------------------

    async def run(self, client: aiomqtt.Client, outbox: UnconfirmedSource) -> None:
        """Sweep orphans, then publish manifests and requested chunks until cancelled."""
        self._jobs.clear()  # every unconfirmed record is sent again on this connection
        keep = {d["sha256"] for _, d in await outbox.unconfirmed_data(PHOTO_KIND) if "sha256" in d}
        swept = await asyncio.to_thread(self.store.sweep, keep)
        if swept:
            log.info("deleted %d blob(s) that no unconfirmed record names", swept)
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            rid = next(iter(self._jobs))
            job = self._jobs.pop(rid)
            if job.chunks is None:
                await self._send_manifest(client, job)
            else:
                await self._send_chunks(client, job)

    async def _send_manifest(self, client: aiomqtt.Client, job: _Job) -> None:
        body = manifest(job.record_id, job.data, self.chunk_bytes)
        topic = self.topics.blob_manifest(job.record_id)
        await client.publish(topic, json.dumps(body), qos=1)
        raise_if_cancelling()
        self.manifests_sent += 1

    async def _send_chunks(self, client: aiomqtt.Client, job: _Job) -> None:
        try:
            data = await asyncio.to_thread(self.store.get, job.sha256)
        except OutboxError as e:
            log.error("photo record %s cannot be delivered: %s", job.record_id, e)
            return
        for i in job.chunks or []:
            if job.record_id not in self._photos:
                return  # confirmed meanwhile
            piece = data[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
            await client.publish(self.topics.blob_chunk(job.record_id, i), piece, qos=1)
            raise_if_cancelling()
            self.chunks_sent += 1
            self.bytes_sent += len(piece)
