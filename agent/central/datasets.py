"""Reference datasets on the central side: build, sign, publish (docs/CONTRACT.md, "Datasets").

Only the central side holds the Ed25519 private key (PEM, PKCS#8, mode 0600); a
station pins the public key (`[datasets] public_key`, 64 hex digits). A version is
`max(previous + 1, now in ms)`, so it grows across restarts and a lost state file.

A publication is the chunks first, then the manifest, all retained at QoS 1: a
station that sees the manifest finds the body already there; one that connects later
gets the newest at once. The previous version's chunks are cleared after.

`UsedTicketsFeed` is the registry's hook: every new valid 18-digit vaccination ticket
record goes into its own SQLite table (`{db}-datasets.db`); within `debounce_s` the
tickets added since the last version go out as a signed delta chained to it, and every
`compact_every` deltas (and at start) the whole set goes out as a new full version,
which clears the deltas it absorbed from the broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.store import Stored
from agent.central.store_sqlite import enable_wal
from agent.contract.datasets import (
    CHUNK_BYTES,
    DATASETS_SITE,
    SCHEMAS,
    Manifest,
    build_manifest,
    canonical_body,
    chunk_topic,
    delta_topic,
    field_problems,
    manifest_topic,
    parse_manifest,
    parse_topic,
    scope_label,
    signed_bytes,
)
from agent.contract.messages import MessageError
from agent.contract.records import iso_ms, utc_now
from agent.errors import BrokerLinkError, ConfigError, DatasetKeyError

log = logging.getLogger(__name__)


# -- keys -------------------------------------------------------------------------------


def generate_key(private: Path, public: Path) -> str:
    """A new signing key pair; returns the public key as hex (what stations pin).
    Never overwrites: FileExistsError."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = public_hex(key)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with open(public, "x", encoding="ascii") as f:
        f.write(pub + "\n")
    return pub


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetKeyError(f"{path}: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise DatasetKeyError(f"{path}: not an unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise DatasetKeyError(f"{path}: not an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


# -- building ---------------------------------------------------------------------------


def next_version(previous: int = 0) -> int:
    return max(previous + 1, time.time_ns() // 1_000_000)


def signed_messages(
    key: Ed25519PrivateKey,
    prefix: str,
    kind: str,
    version: int,
    rows: list[dict[str, Any]],
    *,
    expires_at: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    site: str | None = None,
    agent: str | None = None,
    base: int | None = None,
) -> list[tuple[str, bytes]]:
    """(topic, payload) to publish retained, in order: the chunks, then the manifest.
    With `site`, the version is scoped to that site's stations (topics and signed manifest);
    with `site` and `agent`, to that one station. With `base`, a delta: `rows` are added
    to version `base`, and the manifest goes to its own delta topic."""
    scope = "fleet" if site is None else "site" if agent is None else "station"
    body = canonical_body(rows)
    manifest = build_manifest(
        kind,
        version,
        body,
        len(rows),
        issued_at=iso_ms(utc_now()),
        expires_at=expires_at,
        chunk_bytes=chunk_bytes,
        scope=scope,
        site=site,
        agent=agent,
        base=base,
    )
    manifest["signature"] = base64.b64encode(key.sign(signed_bytes(manifest))).decode()
    out = [
        (
            chunk_topic(prefix, kind, version, i, scope, site, agent),
            body[i * chunk_bytes : (i + 1) * chunk_bytes],
        )
        for i in range(manifest["chunks"])
    ]
    where = (
        manifest_topic(prefix, kind, scope, site, agent)
        if base is None
        else delta_topic(prefix, kind, version, scope, site, agent)
    )
    out.append((where, json.dumps(manifest).encode()))
    return out


class Publisher(Protocol):
    """What publishes a version: the registry's own connection (agent/central/mqtt_lean.py)
    or an aiomqtt client (`madoguchi datasets publish`)."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = ..., retain: bool = ...
    ) -> None: ...


async def publish(
    client: Publisher,
    messages: list[tuple[str, bytes]],
    clear: Iterable[str] = (),
) -> None:
    """The chunks and the manifest, retained; then the previous version's chunks cleared."""
    for topic, payload in messages:
        await client.publish(topic, payload, qos=1, retain=True)
    for topic in clear:
        await client.publish(topic, b"", qos=1, retain=True)


def read_rows(kind: str, path: Path) -> list[dict[str, Any]]:
    """Rows of `kind` from a CSV (header row) or JSON (list of objects) file; ConfigError
    with every problem at once, one line each: `FILE:ROW:COLUMN: FIELD: REASON` (CSV) or
    `FILE:ROW:FIELD: REASON` (JSON).

    CSV: ROW is the line in the file (the header is line 1), COLUMN the column number
    (1-based; 0 for a required column the header lacks, reported once on line 1).
    JSON: ROW is the object's place in the list (1-based), COLUMN the field name.
    Values are never in the lines (they may be personal)."""
    if kind not in SCHEMAS:
        raise ConfigError([f"{path}: kind: {kind!r} is not one of {', '.join(sorted(SCHEMAS))}"])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: {getattr(e, 'strerror', None) or e}"]) from e
    if path.suffix.lower() == ".json":
        rows, problems = _json_rows(kind, path, text)
    else:
        rows, problems = _csv_rows(kind, path, text)
    if problems:
        raise ConfigError(problems)
    return rows


def _json_rows(kind: str, path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        rows = json.loads(text)
    except ValueError as e:
        line = getattr(e, "lineno", 0)
        col = getattr(e, "colno", 0)
        return [], [f"{path}:{line}:{col}: not JSON: {getattr(e, 'msg', e)}"]
    if not isinstance(rows, list):
        return [], [f"{path}:0:0: not a JSON list of objects"]
    problems: list[str] = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            problems.append(f"{path}:{n}:-: not an object")
            continue
        problems += [f"{path}:{n}:{f}: {why}" for f, why in field_problems(kind, row)]
    return rows, problems


def _csv_rows(kind: str, path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    schema = SCHEMAS[kind]
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        return [], [f"{path}:1:0: no header row"]
    except csv.Error as e:
        return [], [f"{path}:1:0: not CSV: {e}"]
    problems: list[str] = []
    column = {name.strip(): i for i, name in enumerate(header, 1)}
    for name, i in column.items():
        if name not in schema:
            problems.append(f"{path}:1:{i}: {name[:64]}: unknown column")
    absent = [k for k, (required, _) in schema.items() if required and k not in column]
    problems += [f"{path}:1:0: {k}: missing column" for k in absent]
    rows: list[dict[str, Any]] = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue  # a blank line
            if len(cells) > len(header):
                problems.append(f"{path}:{line}:{len(header) + 1}: more cells than the header")
            row = {
                name.strip(): cell
                for name, cell in zip(header, cells, strict=False)
                if cell != "" and name.strip() in schema
            }
            rows.append(row)
            for f, why in field_problems(kind, row):
                if f in absent:
                    continue  # said once, on line 1
                problems.append(f"{path}:{line}:{column.get(f, 0)}: {f}: {why}")
    except csv.Error as e:
        problems.append(f"{path}:{reader.line_num}:0: not CSV: {e}")
    return rows, problems


async def publish_dataset(
    host: str,
    port: int,
    prefix: str,
    key: Ed25519PrivateKey,
    kind: str,
    rows: list[dict[str, Any]],
    *,
    expires_at: str | None = None,
    tls_context: Any = None,
    username: str | None = None,
    password: str | None = None,
    site: str | None = None,
    agent: str | None = None,
) -> int:
    """`madoguchi refdata publish` (and `registry publish-dataset`): one version, retained;
    returns the version. The version held on the broker (its retained manifest) is read
    first: the new one is newer than it, and its chunks are cleared after. `site` alone:
    that site's stations; `site` and `agent`: that one station."""
    async with aiomqtt.Client(
        host, port, tls_context=tls_context, username=username, password=password
    ) as client:
        scope = "fleet" if site is None else "site" if agent is None else "station"
        topic = manifest_topic(prefix, kind, scope, site, agent)
        previous = await _retained_manifest(client, topic)
        old = 0 if previous is None else previous.version
        version = next_version(old)
        messages = signed_messages(
            key, prefix, kind, version, rows, expires_at=expires_at, site=site, agent=agent
        )
        clear = (
            []
            if previous is None
            else [
                chunk_topic(prefix, kind, old, i, scope, site, agent)
                for i in range(previous.chunks)
            ]
        )
        await publish(client, messages, clear)
    return version


async def _retained_manifest(
    client: aiomqtt.Client, topic: str, wait_s: float = 1.0
) -> Manifest | None:
    """The retained manifest on `topic`, if the broker has one (it comes at subscribe)."""
    await client.subscribe(topic, qos=1)
    try:
        async with asyncio.timeout(wait_s):
            async for m in client.messages:
                if isinstance(m.payload, bytes | bytearray) and m.payload:
                    try:
                        return parse_manifest(bytes(m.payload))
                    except MessageError:
                        return None
    except TimeoutError:
        return None
    finally:
        await client.unsubscribe(topic)
    return None


# -- the registry's used_tickets --------------------------------------------------------


class UsedTicketsFeed:
    """Keeps `used_tickets` from the records the registry stores and publishes it.

    The registry calls `note()` for every stored record (cheap, in the loop) and runs
    `run()` in its TaskGroup with a getter for its current client.
    """

    kind = "used_tickets"

    def __init__(
        self,
        path: Path,
        key: Ed25519PrivateKey,
        prefix: str,
        *,
        debounce_s: float = 0.2,
        compact_every: int = 100,
    ) -> None:
        self.path = path
        self.key = key
        self.prefix = prefix
        self.debounce_s = debounce_s
        #: deltas between two full versions
        self.compact_every = compact_every
        self.version = 0
        self.published = 0
        self.deltas = 0  # deltas published since the last full version
        self._dirty = asyncio.Event()
        self._db: sqlite3.Connection | None = None
        self._last_chunks: list[str] = []  # retained topics of the full version and deltas
        self._new: list[dict[str, Any]] = []  # tickets added since the last version
        self._full_due = True  # at start: the broker may hold nothing, or an older chain

    def open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        enable_wal(db)
        db.executescript(
            "CREATE TABLE IF NOT EXISTS used_tickets (municipality_code TEXT, ticket_number TEXT,"
            " dose TEXT, site TEXT, agent TEXT, at TEXT,"
            " PRIMARY KEY (municipality_code, ticket_number, dose)) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS versions (kind TEXT PRIMARY KEY, version INTEGER);"
        )
        row = db.execute("SELECT version FROM versions WHERE kind = ?", (self.kind,)).fetchone()
        self.version = row[0] if row else 0
        self._db = db
        self._dirty.set()  # publish what is held at start: the broker may have lost it

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def note(self, stored: Stored) -> None:
        """A stored record: a valid 18-digit vaccination ticket becomes a used ticket."""
        if not stored.new or self._db is None:
            return
        data = stored.record.get("data")
        interp = data.get("interpretation") if isinstance(data, dict) else None
        if not isinstance(interp, dict) or interp.get("type") != "vaccination_ticket":
            return
        if not interp.get("valid", False):
            return
        f = interp.get("fields") or {}
        row = (
            f.get("municipality_code"),
            f.get("ticket_number"),
            f.get("round_code"),
            stored.site,
            stored.agent,
            str(stored.record.get("captured_at") or iso_ms(utc_now())),
        )
        cur = self._db.execute("INSERT OR IGNORE INTO used_tickets VALUES (?, ?, ?, ?, ?, ?)", row)
        if cur.rowcount:
            cols = ("municipality_code", "ticket_number", "dose", "site", "agent", "at")
            self._new.append(dict(zip(cols, row, strict=True)))
            self._dirty.set()

    def rows(self) -> list[dict[str, Any]]:
        assert self._db is not None
        cols = ("municipality_code", "ticket_number", "dose", "site", "agent", "at")
        q = "SELECT " + ", ".join(cols) + " FROM used_tickets ORDER BY ticket_number"
        return [dict(zip(cols, r, strict=True)) for r in self._db.execute(q)]

    async def run(
        self, connected: asyncio.Event, client_now: Callable[[], Publisher | None]
    ) -> None:
        """Publish a new version after each change, at most one per `debounce_s`."""
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce_s)  # gather the rest of a burst into one version
            await connected.wait()
            client = client_now()
            if client is None:  # between connections: wait for the next one
                await asyncio.sleep(self.debounce_s)
                continue
            self._dirty.clear()
            base = self.version
            version = next_version(base)
            full = self._full_due or self.version == 0 or self.deltas >= self.compact_every
            new, self._new = self._new, []
            if full:
                messages = signed_messages(self.key, self.prefix, self.kind, version, self.rows())
                clear = self._last_chunks
            else:
                messages = signed_messages(
                    self.key, self.prefix, self.kind, version, new, base=base
                )
                clear = []
            try:
                await publish(client, messages, clear)
            except (aiomqtt.MqttError, BrokerLinkError) as e:
                log.warning("used_tickets v%d not published: %s", version, e)
                self._new = new + self._new
                self._dirty.set()
                continue
            assert self._db is not None
            self._db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?)", (self.kind, version))
            self.version = version
            self.published += 1
            topics = [t for t, _ in messages]
            if full:
                self._full_due, self.deltas = False, 0
                self._last_chunks = topics[:-1]  # the full manifest is replaced, not cleared
            else:
                self.deltas += 1
                self._last_chunks += topics  # cleared by the next full version
            what = "full" if full else f"delta of {len(new)} on v{base}"
            log.info("used_tickets v%d published, %s (%d chunk(s))", version, what, len(topics) - 1)


# -- what the stations hold: `madoguchi refdata status` ---------------------------------


async def fleet_status(
    host: str,
    port: int,
    prefix: str,
    *,
    wait_s: float = 1.0,
    tls_context: Any = None,
    username: str | None = None,
    password: str | None = None,
) -> dict[str, Any]:
    """The retained dataset manifests (what is published, per scope) and the retained
    status of every station (what each holds, what it refused), gathered for `wait_s`
    after the last retained message. Reads only; needs the registry's ACL."""
    published: dict[tuple[str, str], dict[str, Any]] = {}
    stations: dict[str, dict[str, Any]] = {}
    filters = [
        f"{prefix}/{DATASETS_SITE}/fleet/+/manifest",
        f"{prefix}/{DATASETS_SITE}/site/+/+/manifest",
        f"{prefix}/{DATASETS_SITE}/station/+/+/+/manifest",
        f"{prefix}/+/+/status",
    ]
    async with aiomqtt.Client(
        host, port, tls_context=tls_context, username=username, password=password
    ) as client:
        for f in filters:
            await client.subscribe(f, qos=1)
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(wait_s):
                    m = await anext(client.messages)
                _take(prefix, str(m.topic), m.payload, published, stations)
    return {"published": published, "stations": stations}


def _take(
    prefix: str,
    topic: str,
    payload: Any,
    published: dict[tuple[str, str], dict[str, Any]],
    stations: dict[str, dict[str, Any]],
) -> None:
    if not isinstance(payload, bytes | bytearray) or not payload:
        return
    t = parse_topic(prefix, topic)
    if t is not None:
        if t.version is None:
            try:
                m = parse_manifest(bytes(payload))
            except MessageError:
                return
            label = scope_label(m.scope, m.site, m.agent)
            published[(m.kind, label)] = {
                "version": m.version,
                "rows": m.rows,
                "issued_at": m.issued_at,
                "expires_at": m.expires_at,
            }
        return
    levels = topic[len(prefix) + 1 :].split("/")
    if len(levels) != 3 or levels[2] != "status" or levels[0].startswith("_"):
        return
    try:
        body = json.loads(payload)
    except ValueError:
        return
    if isinstance(body, dict):
        stations[f"{levels[0]}/{levels[1]}"] = body


def status_rows(report: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """One row per (station, kind) a station holds, refused or should hold: its version,
    age, and `state`: current, behind (a newer version is published for it), stale (past
    its expiry), refused, missing (published for it, not held) or offline."""
    now = time.time() if now is None else now
    published: dict[tuple[str, str], dict[str, Any]] = report["published"]
    out: list[dict[str, Any]] = []
    for name, body in sorted(report["stations"].items()):
        site, agent = name.split("/", 1)
        scopes = ("fleet", f"site:{site}", f"station:{site}/{agent}")
        newest: dict[str, int] = {}
        for (kind, label), p in published.items():
            if label in scopes:
                newest[kind] = max(newest.get(kind, 0), p["version"])
        if body.get("state") != "online":
            out.append({"station": name, "kind": None, "version": None, "state": "offline"})
            continue
        sets = body.get("datasets") or {}
        held = sets.get("held") or {}
        refused = sets.get("refused") or {}
        for kind in sorted(set(held) | set(refused) | set(newest)):
            h = held.get(kind) or {}
            row: dict[str, Any] = {
                "station": name,
                "kind": kind,
                "version": h.get("version"),
                "published": newest.get(kind),
                "age_s": _age(h.get("issued_at"), now),
            }
            expires = h.get("expires_at")
            if kind in refused:
                row["state"] = "refused"
                row["reason"] = str(refused[kind].get("reason"))[:200]
            elif not h:
                row["state"] = "missing"
            elif newest.get(kind, 0) > int(h.get("version") or 0):
                row["state"] = "behind"
            elif h.get("stale") or (expires is not None and (_age(expires, now) or 0) > 0):
                row["state"] = "stale"
            else:
                row["state"] = "current"
            out.append(row)
    return out


def _age(iso: Any, now: float) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return round(now - t.timestamp(), 1)
