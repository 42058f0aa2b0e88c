"""The blob protocol's wire half, as both the station's sender and the registry use it."""

from __future__ import annotations

import json

from agent.contract.blobs import (
    CHUNK_BYTES,
    SCHEMA,
    chunk_count,
    is_record_id,
    is_sha256,
    manifest,
    missing_request,
)

SHA = "5c2f81" + "0" * 58
RID = "0190c8e4-7d3a-7b61-9c2e-5f0a4b3c2d1e"


def test_a_manifest_says_how_the_blob_is_cut() -> None:
    body = manifest(
        RID, {"sha256": SHA, "bytes": 2 * CHUNK_BYTES + 1, "content_type": "image/jpeg"}
    )
    assert body == {
        "schema": SCHEMA,
        "record_id": RID,
        "sha256": SHA,
        "bytes": 2 * CHUNK_BYTES + 1,
        "chunk_bytes": CHUNK_BYTES,
        "chunks": 3,
        "content_type": "image/jpeg",
    }
    assert manifest(RID, {"sha256": SHA, "bytes": 10})["content_type"] == (
        "application/octet-stream"
    )


def test_chunk_count_rounds_up_and_is_never_zero() -> None:
    assert [chunk_count(n, 10) for n in (0, 1, 10, 11, 20, 21)] == [1, 1, 1, 2, 2, 3]


def test_the_missing_request_keeps_its_wire_bytes() -> None:
    body = missing_request(SHA, [0, 2])
    assert body == json.dumps({"sha256": SHA, "missing": [0, 2]}).encode()
    assert body.startswith(b'{"sha256": "5c2f81')


def test_names_are_lowercase_hex_and_uuids() -> None:
    assert is_sha256(SHA) and not is_sha256(SHA.upper()) and not is_sha256(SHA[:-1])
    assert not is_sha256(SHA + "\n")  # `$` alone would accept it: these name files
    assert is_record_id(RID) and not is_record_id(RID.upper()) and not is_record_id(RID + "\n")
    assert not is_sha256(None) and not is_record_id(7)
