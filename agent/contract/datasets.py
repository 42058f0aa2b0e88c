"""The wire half of reference datasets (docs/CONTRACT.md, "Datasets"): shared by both sides.

A dataset is reference data the central side publishes and every station keeps:
a kind (`used_tickets`, `recalled_lots`, `jpki_anchors`, `reservations`, `staff`), a
scope (`fleet`; `site` with its site, or `station` with its site and agent, named in the
signed manifest), a version that
only grows, an issue time, an optional expiry, and rows.
It travels like a photo blob, but retained so that a station that connects later
gets it at once:

    {prefix}/_datasets/{scope}/{kind}/manifest            retained, signed
    {prefix}/_datasets/{scope}/{kind}/{version}/{index}   retained, the body in chunks
    {prefix}/_datasets/{scope}/{kind}/delta/{version}      retained, signed (a delta)
    ({scope} is `fleet`, `site/{site}` or `station/{site}/{agent}`)

A delta is a version whose signed manifest names the version it applies to (`base`):
its rows are added to that version (`used_tickets` grows all day: one delta per
registry commit, compacted into a new full version now and then). Its chunks use the
same chunk topics; a full version clears the deltas it absorbed.

The body is `canonical_body(rows)` (JSON Lines of compact, sorted JSON); the manifest carries its
sha256 and size, and an Ed25519 signature over `signed_bytes(manifest)` (the
manifest without its signature, canonical). The signature therefore covers every
row. This module is pure and standard library only: the signing (central) and the
verifying (station) happen where `cryptography` is imported. Every parser here
raises only `MessageError`, with a reason that is safe to log (no row content).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from agent.contract.messages import MessageError

SCHEMA = "madoguchi.dataset/1"
#: the site level of dataset topics: never a station's name
DATASETS_SITE = "_datasets"
SCOPES = frozenset({"fleet", "site", "station"})
#: body bytes per chunk: well under the station's default 1 MiB inbound cap
CHUNK_BYTES = 256_000
#: the largest body either side accepts
MAX_BODY_BYTES = 256_000_000
MAX_MANIFEST_BYTES = 16_384

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGITS = {n: re.compile(f"[0-9]{{{n}}}") for n in (1, 6, 10, 14)}
_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_KIND = re.compile(r"[a-z0-9_]{1,64}")


def _digits(n: int) -> Any:
    return lambda v: isinstance(v, str) and _DIGITS[n].fullmatch(v) is not None


def _text(most: int) -> Any:
    return lambda v: isinstance(v, str) and 0 < len(v) <= most and v.isprintable()


def _name(v: object) -> bool:
    return isinstance(v, str) and _NAME.fullmatch(v) is not None


def valid_site(v: object) -> bool:
    """A site name a site-scoped dataset may carry (one topic level, `[a-z0-9_-]`)."""
    return _name(v)


def _instant(v: object) -> bool:
    if not isinstance(v, str) or len(v) > 40:
        return False
    try:
        datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


def _day(v: object) -> bool:
    if not isinstance(v, str) or len(v) != 10:
        return False
    try:
        date.fromisoformat(v)
    except ValueError:
        return False
    return True


def _sha(v: object) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


_UID = re.compile(r"[0-9a-fA-F]{2,40}")
ID_TYPES = frozenset({"ticket_number", "qr", "form_id", "cert_serial"})


def _uid(v: object) -> bool:
    return isinstance(v, str) and _UID.fullmatch(v) is not None


def _id_type(v: object) -> bool:
    return v in ID_TYPES


#: kind -> field -> (required, check): a new kind is a schema here and a rule in
#: agent/station/datasets.py, not a new transport
SCHEMAS: dict[str, dict[str, tuple[bool, Any]]] = {
    "used_tickets": {
        "municipality_code": (True, _digits(6)),
        "ticket_number": (True, _digits(10)),
        "dose": (True, _digits(1)),
        "site": (True, _name),
        "agent": (True, _name),
        "at": (True, _instant),
    },
    "recalled_lots": {
        "gtin": (True, _digits(14)),
        "lot": (True, _text(20)),
        "reason": (True, _text(200)),
        "expiry_from": (False, _day),
        "expiry_to": (False, _day),
    },
    "jpki_anchors": {
        "sha256": (True, _sha),
        "name": (True, _text(200)),
    },
    # what the station can scan or read (ticket number, reservation QR payload, form ID,
    # auth-cert serial) -> a time slot and a purpose; published per site
    "reservations": {
        "id": (True, _text(200)),
        "id_type": (False, _id_type),
        "slot_start": (True, _instant),
        "slot_end": (True, _instant),
        "purpose": (True, _text(200)),
    },
    # staff badge UIDs (hex) -> operator ids; the hand-edited `operators` map is the fallback
    "staff": {
        "uid": (True, _uid),
        "operator": (True, _name),
    },
}
KINDS = frozenset(SCHEMAS)


def field_problems(kind: str, row: dict[str, Any]) -> list[tuple[str, str]]:
    """Every problem of one row of `kind` as (field, reason), in schema order after the
    unknown fields. Names fields, never values."""
    schema = SCHEMAS[kind]
    problems = [(str(k)[:64], "unknown field") for k in row if k not in schema]
    for key, (required, check) in schema.items():
        if key not in row:
            if required:
                problems.append((key, "missing"))
        elif not check(row[key]):
            problems.append((key, "not a valid value"))
    return problems


def check_row(kind: str, row: object, where: str = "row") -> list[str]:
    """Every problem of one row of `kind` (empty: the row is good). Names fields, never values."""
    if not isinstance(row, dict):
        return [f"{where}: not an object"]
    out = []
    for key, reason in field_problems(kind, row):
        out.append(
            f"{where}: unknown field {key!r}"[:120]
            if reason == "unknown field"
            else f"{where}: {key}: {reason}"
        )
    return out


def parse_scope(text: str) -> tuple[str, str | None, str | None]:
    """`fleet`, `site:S` or `station:S/A` (the CLI's --scope) -> (scope, site, agent);
    ValueError with a one-line reason."""
    if text == "fleet":
        return "fleet", None, None
    head, sep, rest = text.partition(":")
    if sep and head == "site" and _name(rest):
        return "site", rest, None
    if sep and head == "station":
        site, slash, agent = rest.partition("/")
        if slash and _name(site) and _name(agent):
            return "station", site, agent
    raise ValueError(
        f"{text[:80]!r} is not fleet, site:SITE or station:SITE/AGENT (names [a-z0-9_-], 1-64)"
    )


def scope_label(scope: str, site: str | None = None, agent: str | None = None) -> str:
    """The --scope text of a scope (the inverse of `parse_scope`)."""
    if scope == "site":
        return f"site:{site}"
    if scope == "station":
        return f"station:{site}/{agent}"
    return "fleet"


def check_rows(kind: str, rows: object) -> list[str]:
    """Every problem of a dataset's rows, all at once (the CLI reports them together)."""
    if kind not in SCHEMAS:
        return [f"unknown dataset kind {kind[:64]!r}"]
    if not isinstance(rows, list):
        return ["rows: not a list"]
    problems: list[str] = []
    for i, row in enumerate(rows):
        problems += check_row(kind, row, f"row {i + 1}")
    return problems


def canonical(obj: Any) -> bytes:
    """The one byte form that is hashed and signed: compact, sorted keys, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_body(rows: list[dict[str, Any]]) -> bytes:
    """JSON Lines: one canonical row per line, `\\n` between them (none after the last),
    so that a station can check and store a million rows one line at a time."""
    return b"\n".join(canonical(r) for r in rows)


def chunk_count(size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, -(-size // chunk_bytes))


def signed_bytes(manifest: dict[str, Any]) -> bytes:
    """What the Ed25519 signature covers: the manifest without `signature`, canonical."""
    return canonical({k: v for k, v in manifest.items() if k != "signature"})


def build_manifest(
    kind: str,
    version: int,
    body: bytes,
    rows: int,
    *,
    issued_at: str,
    expires_at: str | None = None,
    scope: str = "fleet",
    site: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    agent: str | None = None,
    base: int | None = None,
) -> dict[str, Any]:
    """The manifest of a body, not yet signed (the central side adds `signature`).
    A `site` scope names its site (a `station` scope its site and agent) in the signed
    manifest, so a station can refuse a version meant for another whatever topic it
    came on."""
    if (scope in ("site", "station")) != (site is not None) or (scope == "station") != (
        agent is not None
    ):
        raise ValueError("a site scope needs a site, a station scope a site and an agent")
    extra: dict[str, Any] = {} if site is None else {"site": site}
    if agent is not None:
        extra["agent"] = agent
    if base is not None:
        if not 0 < base < version:
            raise ValueError("a delta's base is an older version")
        extra["base"] = base
    return {
        **extra,
        "schema": SCHEMA,
        "kind": kind,
        "scope": scope,
        "version": version,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "sha256": hashlib.sha256(body).hexdigest(),
        "bytes": len(body),
        "chunk_bytes": chunk_bytes,
        "chunks": chunk_count(len(body), chunk_bytes),
        "rows": rows,
    }


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest: the shape is right; the signature is not checked yet."""

    kind: str
    scope: str
    version: int
    issued_at: str
    expires_at: str | None
    sha256: str
    size: int
    chunk_bytes: int
    chunks: int
    rows: int
    signature: bytes
    raw: dict[str, Any]
    site: str | None = None
    agent: str | None = None
    #: a delta: the version whose rows these are added to (None: a full version)
    base: int | None = None

    @property
    def signed(self) -> bytes:
        return signed_bytes(self.raw)


def _load(payload: object, limit: int) -> Any:
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if not isinstance(payload, bytes | bytearray):
        raise MessageError(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > limit:
        raise MessageError(f"payload of {len(payload)} bytes is over the {limit}-byte cap")
    try:
        return json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise MessageError("JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise MessageError(f"not JSON ({type(e).__name__})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: one decoder for every row line: `json.loads` would build one per call
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _load_line(line: bytes) -> Any:
    """One row of a body (the hot path of a million-row load)."""
    if len(line) > MAX_MANIFEST_BYTES:
        raise MessageError("a row longer than its cap")
    try:
        return _DECODER.decode(line.decode("utf-8"))
    except RecursionError:
        raise MessageError("JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise MessageError(f"not JSON ({type(e).__name__})") from None


def _int(v: object, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def parse_manifest(payload: object) -> Manifest:
    """A manifest from the wire; `MessageError` (reason safe to log) for anything else."""
    m = _load(payload, MAX_MANIFEST_BYTES)
    if not isinstance(m, dict):
        raise MessageError("manifest: not a JSON object")
    if m.get("schema") != SCHEMA:
        raise MessageError("manifest: schema is not " + SCHEMA)
    kind = m.get("kind")
    if not isinstance(kind, str) or _KIND.fullmatch(kind) is None:
        raise MessageError("manifest: kind: not a kind name")
    scope = m.get("scope")
    if not isinstance(scope, str) or scope not in SCOPES:
        raise MessageError("manifest: scope: not a known scope")
    site = m.get("site")
    if (scope in ("site", "station")) != (site is not None) or (
        site is not None and not _name(site)
    ):
        raise MessageError(
            "manifest: site: a site or station scope names one site, no other scope does"
        )
    agent = m.get("agent")
    if (scope == "station") != (agent is not None) or (agent is not None and not _name(agent)):
        raise MessageError("manifest: agent: a station scope names one agent, no other does")
    if not _int(m.get("version"), 1, 2**53):
        raise MessageError("manifest: version: not a positive integer")
    if not _instant(m.get("issued_at")):
        raise MessageError("manifest: issued_at: not an ISO 8601 time")
    if m.get("expires_at") is not None and not _instant(m.get("expires_at")):
        raise MessageError("manifest: expires_at: not an ISO 8601 time")
    if not _sha(m.get("sha256")):
        raise MessageError("manifest: sha256: not 64 hex digits")
    if not _int(m.get("bytes"), 0, MAX_BODY_BYTES):
        raise MessageError(f"manifest: bytes: not 0..{MAX_BODY_BYTES}")
    if not _int(m.get("chunk_bytes"), 1, 4 * CHUNK_BYTES):
        raise MessageError("manifest: chunk_bytes: out of range")
    if m.get("chunks") != chunk_count(m["bytes"], m["chunk_bytes"]):
        raise MessageError("manifest: chunks: does not match bytes / chunk_bytes")
    if not _int(m.get("rows"), 0, 2**53):
        raise MessageError("manifest: rows: not a count")
    base = m.get("base")
    if base is not None and not (_int(base, 1, 2**53) and base < m["version"]):
        raise MessageError("manifest: base: not a version older than this one")
    sig = m.get("signature")
    if not isinstance(sig, str) or len(sig) > 200:
        raise MessageError("manifest: signature: missing")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("manifest: signature: not base64") from None
    if len(signature) != 64:
        raise MessageError("manifest: signature: not 64 bytes (Ed25519)")
    return Manifest(
        kind=kind,
        scope=m["scope"],
        version=m["version"],
        issued_at=m["issued_at"],
        expires_at=m.get("expires_at"),
        sha256=m["sha256"],
        size=m["bytes"],
        chunk_bytes=m["chunk_bytes"],
        chunks=m["chunks"],
        rows=m["rows"],
        signature=signature,
        raw=m,
        site=site,
        agent=agent,
        base=base,
    )


def parse_body(manifest: Manifest, body: bytes) -> list[dict[str, Any]]:
    """The rows of a body that its manifest announced; `MessageError` when the bytes do not
    hash to the manifest's sha256, are not JSON rows, or a row breaks the kind's schema."""
    if len(body) != manifest.size or hashlib.sha256(body).hexdigest() != manifest.sha256:
        raise MessageError(f"{manifest.kind} v{manifest.version}: body does not match its sha256")
    return list(iter_rows(manifest, [body]))


def iter_rows(manifest: Manifest, pieces: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The rows of a body given in pieces (its chunks, in order), one line at a time:
    memory is one piece and one line, whatever the size. `MessageError` as `parse_body`
    (the caller has checked the sha256: this checks lines, schema and count)."""
    where = f"{manifest.kind} v{manifest.version}"
    if manifest.kind not in SCHEMAS:
        raise MessageError(f"{manifest.kind}: not a dataset kind this station knows")
    if manifest.size == 0:
        if manifest.rows != 0:
            raise MessageError(f"{where}: row count is not the manifest's")
        return
    n = 0
    for line in _lines(pieces):
        n += 1
        if n > manifest.rows:
            raise MessageError(f"{where}: row count is not the manifest's")
        row = _load_line(line)
        problems = check_row(manifest.kind, row, f"row {n}")
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise MessageError(f"{where}: {problems[0]}{more}")
        yield row
    if n != manifest.rows:
        raise MessageError(f"{where}: row count is not the manifest's")


def _lines(pieces: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for piece in pieces:
        rest += piece
        *lines, rest = rest.split(b"\n")
        yield from lines
        if len(rest) > MAX_MANIFEST_BYTES:
            raise MessageError("a row longer than its cap")
    yield rest


def _scope_levels(scope: str, site: str | None, agent: str | None = None) -> str:
    if scope == "site":
        return f"site/{site}"
    if scope == "station":
        return f"station/{site}/{agent}"
    return scope


def manifest_topic(
    prefix: str,
    kind: str,
    scope: str = "fleet",
    site: str | None = None,
    agent: str | None = None,
) -> str:
    return f"{prefix}/{DATASETS_SITE}/{_scope_levels(scope, site, agent)}/{kind}/manifest"


def chunk_topic(
    prefix: str,
    kind: str,
    version: int,
    index: int,
    scope: str = "fleet",
    site: str | None = None,
    agent: str | None = None,
) -> str:
    levels = _scope_levels(scope, site, agent)
    return f"{prefix}/{DATASETS_SITE}/{levels}/{kind}/{version}/{index}"


def delta_topic(
    prefix: str,
    kind: str,
    version: int,
    scope: str = "fleet",
    site: str | None = None,
    agent: str | None = None,
) -> str:
    """Where a delta's manifest is retained (one topic per delta, cleared at compaction)."""
    return f"{prefix}/{DATASETS_SITE}/{_scope_levels(scope, site, agent)}/{kind}/delta/{version}"


def subscription(
    prefix: str, scope: str = "fleet", site: str | None = None, agent: str | None = None
) -> str:
    """What a station subscribes to for every dataset of a scope (a site or station
    scope: its own)."""
    return f"{prefix}/{DATASETS_SITE}/{_scope_levels(scope, site, agent)}/#"


@dataclass(frozen=True, slots=True)
class DatasetTopic:
    kind: str
    scope: str
    version: int | None  # None: the manifest
    index: int | None
    site: str | None = None
    agent: str | None = None
    #: a delta's manifest (`version` is the delta's, `index` None)
    delta: bool = False


_CHUNK = re.compile(r"0|[1-9][0-9]{0,8}")
#: a version: 1..2**53 (the central side uses the publish time in ms)
_VERSION = re.compile(r"[1-9][0-9]{0,15}")


def parse_topic(prefix: str, topic: str) -> DatasetTopic | None:
    """What a dataset topic is, or None (never raises)."""
    head = f"{prefix}/{DATASETS_SITE}/"
    if not isinstance(topic, str) or not topic.startswith(head):
        return None
    levels = topic[len(head) :].split("/")
    site = agent = None
    if levels[0] in ("site", "station"):
        if len(levels) < 2 or not _name(levels[1]):
            return None
        site = levels.pop(1)
    if levels[0] == "station":
        if len(levels) < 2 or not _name(levels[1]):
            return None
        agent = levels.pop(1)
    if len(levels) < 3 or levels[0] not in SCOPES or _KIND.fullmatch(levels[1]) is None:
        return None
    match levels[2:]:
        case ["manifest"]:
            return DatasetTopic(levels[1], levels[0], None, None, site, agent)
        case ["delta", version] if _VERSION.fullmatch(version):
            return DatasetTopic(levels[1], levels[0], int(version), None, site, agent, True)
        case [version, index] if _VERSION.fullmatch(version) and _CHUNK.fullmatch(index):
            return DatasetTopic(levels[1], levels[0], int(version), int(index), site, agent)
    return None
