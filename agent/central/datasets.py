"""Reference datasets on the central side: build, sign, publish (docs/CONTRACT.md, "Datasets").

Only the central side holds the Ed25519 private key (PEM, PKCS#8, mode 0600); a
station pins the public key (`[datasets] public_key`, 64 hex digits). A version is
`max(previous + 1, now in ms)`, so it grows across restarts and a lost state file.

A publication is the chunks first, then the manifest, all retained at QoS 1: a
station that sees the manifest finds the body already there; one that connects later
gets the newest at once. The previous version's chunks are cleared after.

`UsedTicketsFeed` is the registry's hook: every new valid 18-digit vaccination ticket
record goes into its own SQLite table (`{db}-datasets.db`), and a new full version
is published within `debounce_s` (a delta protocol is the next step, issue #20).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.store import Stored
from agent.contract.datasets import (
    CHUNK_BYTES,
    SCHEMAS,
    Manifest,
    build_manifest,
    canonical_body,
    check_rows,
    chunk_topic,
    manifest_topic,
    parse_manifest,
    signed_bytes,
)
from agent.contract.messages import MessageError
from agent.contract.records import iso_ms, utc_now
from agent.errors import ConfigError, DatasetKeyError

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
) -> list[tuple[str, bytes]]:
    """(topic, payload) to publish retained, in order: the chunks, then the manifest.
    With `site`, the version is scoped to that site's stations (topics and signed manifest)."""
    scope = "fleet" if site is None else "site"
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
    )
    manifest["signature"] = base64.b64encode(key.sign(signed_bytes(manifest))).decode()
    out = [
        (
            chunk_topic(prefix, kind, version, i, scope, site),
            body[i * chunk_bytes : (i + 1) * chunk_bytes],
        )
        for i in range(manifest["chunks"])
    ]
    out.append((manifest_topic(prefix, kind, scope, site), json.dumps(manifest).encode()))
    return out


async def publish(
    client: aiomqtt.Client,
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
    with every problem at once."""
    if kind not in SCHEMAS:
        raise ConfigError([f"{path}: kind: {kind!r} is not one of {', '.join(sorted(SCHEMAS))}"])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: {getattr(e, 'strerror', None) or e}"]) from e
    rows: Any
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise ConfigError([f"{path}: not JSON: {e}"]) from e
    else:
        rows = [
            {k: v for k, v in r.items() if v not in ("", None)}
            for r in csv.DictReader(io.StringIO(text))
        ]
    problems = check_rows(kind, rows)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return list(rows)


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
) -> int:
    """`madoguchi registry publish-dataset`: one version, retained; returns the version.
    The version held on the broker (its retained manifest) is read first: the new one is
    newer than it, and its chunks are cleared after."""
    async with aiomqtt.Client(
        host, port, tls_context=tls_context, username=username, password=password
    ) as client:
        scope = "fleet" if site is None else "site"
        previous = await _retained_manifest(client, manifest_topic(prefix, kind, scope, site))
        old = 0 if previous is None else previous.version
        version = next_version(old)
        messages = signed_messages(
            key, prefix, kind, version, rows, expires_at=expires_at, site=site
        )
        clear = (
            []
            if previous is None
            else [chunk_topic(prefix, kind, old, i, scope, site) for i in range(previous.chunks)]
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
        self, path: Path, key: Ed25519PrivateKey, prefix: str, *, debounce_s: float = 0.2
    ) -> None:
        self.path = path
        self.key = key
        self.prefix = prefix
        self.debounce_s = debounce_s
        self.version = 0
        self.published = 0
        self._dirty = asyncio.Event()
        self._db: sqlite3.Connection | None = None
        self._last_chunks: list[str] = []

    def open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
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
            self._dirty.set()

    def rows(self) -> list[dict[str, Any]]:
        assert self._db is not None
        cols = ("municipality_code", "ticket_number", "dose", "site", "agent", "at")
        q = "SELECT " + ", ".join(cols) + " FROM used_tickets ORDER BY ticket_number"
        return [dict(zip(cols, r, strict=True)) for r in self._db.execute(q)]

    async def run(
        self, connected: asyncio.Event, client_now: Callable[[], aiomqtt.Client | None]
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
            version = next_version(self.version)
            messages = signed_messages(self.key, self.prefix, self.kind, version, self.rows())
            try:
                await publish(client, messages, self._last_chunks)
            except aiomqtt.MqttError as e:
                log.warning("used_tickets v%d not published: %s", version, e)
                self._dirty.set()
                continue
            assert self._db is not None
            self._db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?)", (self.kind, version))
            self.version = version
            self.published += 1
            self._last_chunks = [t for t, _ in messages[:-1]]
            log.info("used_tickets v%d published (%d chunk(s))", version, len(messages) - 1)
