"""The wire half of signed releases (docs/CONTRACT.md, "Releases", docs/fleet.md): pure.

A release is a bundle (the `make bundle` tarball, provisioning/bundle.py) plus a
manifest the release key signs with Ed25519, in the same form as a dataset manifest
(agent/contract/datasets.py): the manifest without `signature`, canonical JSON, is what
the signature covers, so it covers the sha256 of every file in the bundle.

    {"schema": "madoguchi.release/1", "version": "1.4.0",
     "bundle_sha256": "...", "bundle_bytes": 123,
     "files": {"madoguchi-bundle-1.4.0/install.sh": "<sha256>", ...},
     "min_config_schema": 1, "outbox_schema": 1,
     "issued_at": "2026-12-02T14:00:00+00:00", "signature": "<base64, 64 bytes>"}

`cmd/update` carries this manifest. Verifying the signature happens where
`cryptography` is imported (agent/station/releases.py); everything else is here, so the
signer (`madoguchi fleet release sign`) and the station cannot disagree. Every parser
raises only `MessageError` with a reason that is safe to log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from agent.contract.blobs import CHUNK_BYTES, chunk_count
from agent.contract.datasets import canonical
from agent.contract.messages import MessageError

SCHEMA = "madoguchi.release/1"
#: the config schema this code reads; a release needing a newer one is refused
CONFIG_SCHEMA = 1
#: the outbox schema this code writes
OUTBOX_SCHEMA = 1
#: outbox schemas this code can run on *and go back from*: a release whose outbox
#: schema is not here would strand the outbox on rollback, so it is refused
REVERSIBLE_OUTBOX_SCHEMAS = frozenset({1})
MAX_MANIFEST_BYTES = 4_000_000
MAX_FILES = 20_000
#: the rollout states a station reports (telemetry `release.state`, dashboard)
STATES = ("offered", "downloading", "installed", "switched", "healthy", "rolled_back", "refused")

_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def valid_version(v: object) -> bool:
    """A release version: one path component (it names `releases/{version}`) and one
    topic level (no `+`: it names `release/{version}/...`)."""
    return isinstance(v, str) and _VERSION.fullmatch(v) is not None and ".." not in v


def signed_bytes(manifest: dict[str, Any]) -> bytes:
    """What the Ed25519 signature covers: the manifest without `signature`, canonical."""
    return canonical({k: v for k, v in manifest.items() if k != "signature"})


def sha256_stream(f: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def bundle_files(bundle: Path) -> Iterator[tuple[str, str]]:
    """(member name, sha256) of every regular file in a bundle tarball, in name order."""
    import tarfile  # a running station needs it only for a release: not at start (issue #18)

    with tarfile.open(bundle) as t:
        members = sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            f = t.extractfile(m)
            assert f is not None  # a regular file always has a stream
            yield m.name, sha256_stream(f)[0]


def build_manifest(
    version: str,
    bundle: Path,
    *,
    min_config_schema: int = CONFIG_SCHEMA,
    outbox_schema: int = OUTBOX_SCHEMA,
    issued_at: datetime | None = None,
) -> dict[str, Any]:
    """The manifest of `bundle`, not yet signed (the signer adds `signature`)."""
    if not valid_version(version):
        raise MessageError(f"release: version {version!r} is not one path component")
    with bundle.open("rb") as f:
        digest, size = sha256_stream(f)
    return {
        "schema": SCHEMA,
        "version": version,
        "bundle_sha256": digest,
        "bundle_bytes": size,
        "files": dict(bundle_files(bundle)),
        "min_config_schema": min_config_schema,
        "outbox_schema": outbox_schema,
        "issued_at": (issued_at or datetime.now(UTC)).isoformat(),
    }


@dataclass(frozen=True)
class ReleaseManifest:
    """A parsed manifest: the shape is right; the signature is not checked yet."""

    raw: dict[str, Any]
    version: str
    bundle_sha256: str
    bundle_bytes: int
    files: dict[str, str]
    min_config_schema: int
    outbox_schema: int
    signature: bytes

    @property
    def signed(self) -> bytes:
        return signed_bytes(self.raw)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40


def _member_ok(name: object) -> bool:
    if not isinstance(name, str) or not name or len(name) > 400 or not name.isprintable():
        return False
    parts = name.split("/")
    return not name.startswith("/") and ".." not in parts


def parse_manifest(payload: object) -> ReleaseManifest:
    """A release manifest from JSON bytes/str or an already-decoded object."""
    if isinstance(payload, (bytes, str)):
        if len(payload) > MAX_MANIFEST_BYTES:
            raise MessageError(f"release manifest: larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            m = json.loads(payload)
        except (ValueError, RecursionError):
            raise MessageError("release manifest: not JSON") from None
    else:
        m = payload
    if not isinstance(m, dict):
        raise MessageError("release manifest: not an object")
    if m.get("schema") != SCHEMA:
        raise MessageError(f"release manifest: schema is not {SCHEMA!r}")
    version = m.get("version")
    if not valid_version(version):
        raise MessageError("release manifest: version: not one path component")
    sha = m.get("bundle_sha256")
    if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
        raise MessageError("release manifest: bundle_sha256: not a sha256")
    for key in ("bundle_bytes", "min_config_schema", "outbox_schema"):
        if not _int(m.get(key)):
            raise MessageError(f"release manifest: {key}: not a whole number")
    files = m.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise MessageError("release manifest: files: not a non-empty object")
    for name, digest in files.items():
        if not _member_ok(name):
            raise MessageError("release manifest: files: a name is not a relative path")
        if not isinstance(digest, str) or _SHA256.fullmatch(digest) is None:
            raise MessageError("release manifest: files: a digest is not a sha256")
    sig = m.get("signature")
    if not isinstance(sig, str):
        raise MessageError("release manifest: signature: missing")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("release manifest: signature: not base64") from None
    if len(signature) != 64:
        raise MessageError("release manifest: signature: not 64 bytes (Ed25519)")
    assert isinstance(version, str)
    return ReleaseManifest(
        raw=m,
        version=version,
        bundle_sha256=sha,
        bundle_bytes=m["bundle_bytes"],
        files=dict(files),
        min_config_schema=m["min_config_schema"],
        outbox_schema=m["outbox_schema"],
        signature=signature,
    )


def refusal(
    m: ReleaseManifest,
    *,
    config_schema: int = CONFIG_SCHEMA,
    reversible: frozenset[int] = REVERSIBLE_OUTBOX_SCHEMAS,
) -> str | None:
    """Why the running code must refuse this release (None: it may install it)."""
    if m.min_config_schema > config_schema:
        return (
            f"release {m.version} needs config schema {m.min_config_schema}; "
            f"this station's is {config_schema}"
        )
    if m.outbox_schema not in reversible:
        return (
            f"release {m.version} uses outbox schema {m.outbox_schema}, which the running "
            f"code cannot go back from (it can: {sorted(reversible)})"
        )
    return None


def check_bundle(m: ReleaseManifest, data: IO[bytes]) -> list[str]:
    """Every mismatch between a bundle tarball and its manifest (empty: it matches).
    Names members, never contents."""
    import tarfile

    digest, size = sha256_stream(data)
    if digest != m.bundle_sha256 or size != m.bundle_bytes:
        return [f"bundle: sha256/size differ from the manifest ({size} bytes)"]
    data.seek(0)
    problems: list[str] = []
    seen: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=data) as t:
            for member in t.getmembers():
                if not member.isfile() and not member.isdir():
                    problems.append(f"bundle: {member.name[:200]!r}: not a file or directory")
                    continue
                if member.isfile():
                    f = t.extractfile(member)
                    assert f is not None
                    seen[member.name] = sha256_stream(f)[0]
    except (tarfile.TarError, OSError) as e:
        return [f"bundle: not a readable tarball ({e})"[:200]]
    for name, want in m.files.items():
        got = seen.get(name)
        if got is None:
            problems.append(f"bundle: {name[:200]!r}: missing")
        elif got != want:
            problems.append(f"bundle: {name[:200]!r}: sha256 differs")
    problems += [f"bundle: {n[:200]!r}: not in the manifest" for n in seen if n not in m.files]
    return problems


# -- the bundle over MQTT: the photo blob protocol's chunks and `missing`, reversed -------
#
#   {station}/release/{version}/{index}    central -> station, raw bytes, QoS 1
#   {station}/release/{version}/missing    station -> central, `blobs.missing_request`
#
# Chunk `i` is bytes [i*CHUNK_BYTES, min((i+1)*CHUNK_BYTES, bundle_bytes)) of the tarball
# (agent/contract/blobs.py: the same chunk size and `missing` body as photos). The station
# asks for what it lacks; `"missing": []` says it has every chunk. The whole tarball is
# then checked against the signed manifest.


def chunk_topic(station_base: str, version: str, index: int) -> str:
    return f"{station_base}/release/{version}/{index}"


def missing_topic(station_base: str, version: str) -> str:
    return f"{station_base}/release/{version}/missing"


def chunk_size(m: ReleaseManifest, index: int) -> int:
    """The exact length chunk `index` of this bundle has (0: no such chunk)."""
    if not 0 <= index < chunk_count(m.bundle_bytes):
        return 0
    return min(CHUNK_BYTES, m.bundle_bytes - index * CHUNK_BYTES)


def encode_signature(signature: bytes) -> str:
    return base64.b64encode(signature).decode("ascii")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The file form of a signed manifest (`BUNDLE.release.json`)."""
    return json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"


def open_bytes(data: bytes) -> IO[bytes]:
    return io.BytesIO(data)
