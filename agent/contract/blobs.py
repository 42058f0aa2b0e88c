"""The wire half of the blob protocol (docs/CONTRACT.md, "Blobs"): shared by both sides.

A photo record names its blob by `sha256`; the bytes travel in chunks on
`blobs/{record_id}/{index}` after a `manifest`, and the registry asks for what
it lacks with `missing`. The station's sender (agent/station/blobs.py) and the
registry's assembler (agent/central/blobs.py) both take these constants and
shapes from here, so the two halves cannot disagree. Standard library only.
"""

from __future__ import annotations

import json
import re
from typing import Any

SCHEMA = "madoguchi.blob/1"
#: payload bytes per chunk message: below the common 256 KB packet cap with room for headers
CHUNK_BYTES = 200_000
#: the largest blob either side accepts (ID photos are at most 5 MB)
MAX_BLOB_BYTES = 16_000_000
PHOTO_KIND = "photo"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# fullmatch, not `^...$`: `$` matches before a trailing newline, and these name files
def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def is_record_id(value: object) -> bool:
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def chunk_count(size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, -(-size // chunk_bytes))


def manifest(
    record_id: str, data: dict[str, Any], chunk_bytes: int = CHUNK_BYTES
) -> dict[str, Any]:
    """The `blobs/{record_id}/manifest` message for a photo record's data."""
    size = int(data["bytes"])
    return {
        "schema": SCHEMA,
        "record_id": record_id,
        "sha256": data["sha256"],
        "bytes": size,
        "chunk_bytes": chunk_bytes,
        "chunks": chunk_count(size, chunk_bytes),
        "content_type": data.get("content_type", "application/octet-stream"),
    }


def missing_request(sha256: str | None, missing: list[int]) -> bytes:
    """The `blobs/{record_id}/missing` body: `{"sha256": ..., "missing": [i, ...]}`."""
    return json.dumps({"sha256": sha256, "missing": missing}).encode()
