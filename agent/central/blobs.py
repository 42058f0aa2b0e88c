"""The reference registry's half of the blob protocol (docs/CONTRACT.md, "Blobs").

Chunks are kept as files until every one is in; then the blob is put
together, its SHA-256 checked against the manifest, and written (fsynced)
to `{root}/{site}/{agent}/{record_id}.blob` with its manifest beside it.
A hash that does not verify throws the parts away and asks for the whole
blob again. Nothing here depends on the registry's database, so it serves
the SQLite and any other backend alike. Blocking: call from a worker thread.

The photos a registry keeps are personal data: this reference keeps them in
plain files for inspection; a production registry stores them where its
resident records are, encrypted, and logs none of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract.blobs import MAX_BLOB_BYTES, SCHEMA, chunk_count, is_record_id, is_sha256
from agent.errors import BlobError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9_-]+$")
MAX_CHUNK_BYTES = 250_000


@dataclass(frozen=True, slots=True)
class BlobState:
    """After a message: is the blob complete, and which chunks should the agent (re)send."""

    record_id: str
    complete: bool
    missing: list[int] | None = None  # None: nothing to ask for
    sha256: str | None = None


def _prefixes(rel: Path) -> list[Path]:
    """`a`, `a/b`, `a/b/c` for `a/b/c`."""
    parts = rel.parts
    return [Path(*parts[: i + 1]) for i in range(len(parts))]


class BlobAssembler:
    """Partial chunks and finished blobs under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.completed = 0
        self.hash_failures = 0

    def _dirs(self, site: str, agent: str, record_id: str) -> tuple[Path, Path]:
        if not (_NAME.match(site) and _NAME.match(agent) and is_record_id(record_id)):
            raise BlobError(f"bad blob address {site}/{agent}/{record_id[:40]!r}")
        return self.root / "partial" / site / agent / record_id, self.root / site / agent

    def _private_dir(self, path: Path) -> None:
        """`path` and every directory from the root down to it, 0700 whatever the umask:
        the photos are personal data."""
        levels = [self.root, *(self.root / p for p in _prefixes(path.relative_to(self.root)))]
        for d in levels:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o777 != 0o700:
                os.chmod(d, 0o700)

    def final_path(self, site: str, agent: str, record_id: str) -> Path:
        return self._dirs(site, agent, record_id)[1] / f"{record_id}.blob"

    def is_complete(self, site: str, agent: str, record_id: str, sha256: str) -> bool:
        meta = self.final_path(site, agent, record_id).with_suffix(".json")
        try:
            return bool(json.loads(meta.read_text())["sha256"] == sha256)
        except (OSError, ValueError, KeyError):
            return False

    def manifest(self, site: str, agent: str, record_id: str, body: Any) -> BlobState:
        """A manifest: remember it, and answer with the chunks still missing."""
        if not isinstance(body, dict) or body.get("schema") != SCHEMA:
            raise BlobError("not a blob manifest")
        if body.get("record_id") != record_id:
            raise BlobError("manifest record_id differs from the topic")
        sha, size = body.get("sha256"), body.get("bytes")
        chunk_bytes, chunks = body.get("chunk_bytes"), body.get("chunks")
        if not is_sha256(sha):
            raise BlobError("manifest sha256 is not a hex SHA-256")
        if not isinstance(size, int) or not 0 < size <= MAX_BLOB_BYTES:
            raise BlobError(f"manifest bytes must be 1..{MAX_BLOB_BYTES}")
        if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise BlobError(f"manifest chunk_bytes must be 1..{MAX_CHUNK_BYTES}")
        if chunks != chunk_count(size, chunk_bytes):
            raise BlobError("manifest chunks does not match bytes / chunk_bytes")
        assert isinstance(sha, str)
        if self.is_complete(site, agent, record_id, sha):
            return BlobState(record_id, True, None, sha)
        partial, _ = self._dirs(site, agent, record_id)
        old = self._manifest(partial)
        if old is not None and old != body:
            shutil.rmtree(partial, ignore_errors=True)  # a different blob under this id: restart
        self._private_dir(partial)
        (partial / "manifest.json").write_text(json.dumps(body))
        missing = self._missing(partial, body)
        if not missing:  # every part arrived but we stopped before finishing
            return self._finish(partial, self._dirs(site, agent, record_id)[1], record_id, body)
        return BlobState(record_id, False, missing, sha)

    def chunk(self, site: str, agent: str, record_id: str, index: int, data: bytes) -> BlobState:
        """One chunk: store it; when it was the last one, verify and finish the blob."""
        partial, final_dir = self._dirs(site, agent, record_id)
        body = self._manifest(partial)
        if body is None:
            return BlobState(record_id, False)  # no manifest (yet): the agent sends it again
        size, chunk_bytes, chunks = body["bytes"], body["chunk_bytes"], body["chunks"]
        if not 0 <= index < chunks:
            raise BlobError(f"chunk {index} of a {chunks}-chunk blob")
        expected = min(chunk_bytes, size - index * chunk_bytes)
        if len(data) != expected:
            raise BlobError(f"chunk {index} has {len(data)} bytes, expected {expected}")
        tmp = partial / f"{index}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, partial / f"{index}.part")
        if self._missing(partial, body):
            return BlobState(record_id, False, None, body["sha256"])
        return self._finish(partial, final_dir, record_id, body)

    def _finish(
        self, partial: Path, final_dir: Path, record_id: str, body: dict[str, Any]
    ) -> BlobState:
        digest = hashlib.sha256()
        pieces = [partial / f"{i}.part" for i in range(body["chunks"])]
        for piece in pieces:
            digest.update(piece.read_bytes())
        if digest.hexdigest() != body["sha256"]:
            self.hash_failures += 1
            log.warning("blob for record %s failed its hash: asking for all of it again", record_id)
            for piece in pieces:
                piece.unlink(missing_ok=True)
            return BlobState(record_id, False, list(range(body["chunks"])), body["sha256"])
        self._private_dir(final_dir)
        target = final_dir / f"{record_id}.blob"
        tmp = target.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for piece in pieces:
                out.write(piece.read_bytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        meta = target.with_suffix(".json")
        meta.write_text(json.dumps(body))
        with open(meta, "rb") as f:
            os.fsync(f.fileno())
        fd = os.open(final_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.rmtree(partial, ignore_errors=True)
        self.completed += 1
        return BlobState(record_id, True, None, body["sha256"])

    @staticmethod
    def _manifest(partial: Path) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = json.loads((partial / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return body

    @staticmethod
    def _missing(partial: Path, body: dict[str, Any]) -> list[int]:
        have = {p.stem for p in partial.glob("*.part")}
        return [i for i in range(body["chunks"]) if str(i) not in have]
