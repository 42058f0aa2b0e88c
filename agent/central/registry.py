"""The reference registry consumer: the other half of the contract.

Subscribes to every agent's `records`, stores each record once (its `id` is
the key), commits, and only then publishes the ack. A duplicate (a re-send) is
acked again but stored once. Gaps in an agent's `seq` are kept in the database;
a gap still open after `gap_timeout_s` is an alert.

Storage is behind `RecordStore` (agent/central/store.py) with two backends:
SQLite (agent/central/store_sqlite.py, a file path) and PostgreSQL
(agent/central/store_pg.py, a `postgresql://` DSN), picked by
agent/central/stores.py. The MQTT loop (`Registry`) is written once for both;
every topic it reads or writes comes from `agent.contract.topics.Topics`.

Several consumers can share the load with an MQTT 5 shared subscription
(`$share/GROUP/...`). A consumer killed after the broker handed it a message
but before its commit loses that message on the wire; it was never acked, so
the agent re-sends it after `resend_after_s` and a live consumer stores it.
That is why the ack must never go out before the commit.

Personal data arrives only sealed (`data.personal_sealed`, agent/personal_seal.py):
the registry checks the envelope's shape, the store keeps it apart from the record
body, and `_purge_personal` deletes it after `personal_retention_hours`; a plain
`data.personal` is dropped with a warning. The console masks long numbers unless
`show_data`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent._aio import NO_DELAY, Backoff
from agent.central.blobs import BlobAssembler, BlobState
from agent.central.store import Batch, Gap, PersonalStore, RecordStore, Stored
from agent.central.stores import open_store
from agent.contract.blobs import missing_request
from agent.contract.messages import Ack
from agent.contract.records import SCHEMA
from agent.contract.topics import DEFAULT_PREFIX, Topic, Topics
from agent.contract.validate import check_record
from agent.errors import BlobError, BlobMismatch, RegistryStoreError
from agent.personal_seal import parse_envelope

__all__ = [
    "Gap",
    "OnAlert",
    "OnStored",
    "Registry",
    "Stored",
    "describe_record",
    "mask_identifiers",
    "run_registry",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

OnStored = Callable[[Stored], None]
OnAlert = Callable[[Gap], None]


# -- the MQTT loop ------------------------------------------------------------------------


class Registry:
    """`madoguchi registry`: store idempotently, commit, then ack. Open with `async with`.

    `db` is a `RecordStore`, a SQLite path, or a `postgresql://` DSN.
    `shared` names an MQTT 5 shared-subscription group: every consumer of the
    group gets a share of the records (each message goes to one of them).
    """

    def __init__(
        self,
        host: str,
        port: int,
        db: RecordStore | Path | str,
        *,
        topic_prefix: str = DEFAULT_PREFIX,
        client_id: str | None = None,
        shared: str | None = None,
        on_stored: OnStored | None = None,
        on_alert: OnAlert | None = None,
        tls_context: Any = None,
        batch_max_messages: int = 64,
        gap_timeout_s: float = 300.0,
        blob_dir: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        personal_retention_hours: float | None = 72.0,
    ) -> None:
        self.host = host
        # sealed personal parts are purged this long after they were stored (None: never)
        self.personal_retention_hours = personal_retention_hours
        self.personal_purged = 0
        self.personal_in_clear = 0
        self.port = port
        self.prefix = topic_prefix
        self.topics = Topics(topic_prefix)
        self.shared = shared
        if client_id is None:
            client_id = "madoguchi-registry"
            if shared is not None:  # every member of a group needs its own id
                client_id = f"madoguchi-registry-{shared}-{socket.gethostname()}-{os.getpid()}"
        self.client_id = client_id
        self.on_stored = on_stored
        self.on_alert = on_alert
        self.tls_context = tls_context
        self.username = username
        self.password = password
        self.batch_max_messages = batch_max_messages
        self.gap_timeout_s = gap_timeout_s
        self.store: RecordStore = db if not isinstance(db, (str, Path)) else open_store(db)
        self.connected = asyncio.Event()
        self.stored_new = 0
        self.duplicates = 0
        self.commits = 0
        self.store_failures = 0
        self.alerts: list[Gap] = []
        # photos: chunks put together in files, then stored once in the record store;
        # a photo record is acked only when its blob is stored
        if blob_dir is None:
            blob_dir = (
                Path(db).with_name(Path(db).stem + "-blobs")
                if isinstance(db, Path) or (isinstance(db, str) and "://" not in db)
                else Path("madoguchi-registry-blobs")
            )
        self.blobs = BlobAssembler(blob_dir)
        self.blob_requests: list[tuple[str, list[int]]] = []
        self._photos_waiting: dict[str, tuple[str, str]] = {}  # record id -> (site, agent)
        self._blob_executor: ThreadPoolExecutor | None = None

    @property
    def topic(self) -> str:
        return Topics.shared(self.shared, self.topics.all_records)

    @property
    def blob_topic(self) -> str:
        return Topics.shared(self.shared, self.topics.all_blobs)

    async def __aenter__(self) -> Self:
        self._blob_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-blobs")
        await self.store.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.store.close()
        finally:
            if self._blob_executor is not None:
                self._blob_executor.shutdown(wait=True)
                self._blob_executor = None

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.shared is None:
            # one consumer: a persistent session keeps records queued while it restarts
            props.SessionExpiryInterval = 7 * 24 * 3600
            clean_start: Any = False
        else:
            # a group member that dies must leave the group at once, not hold a queue
            # of records nobody will read: the agents' re-send covers what it had
            props.SessionExpiryInterval = 0
            clean_start = True
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=clean_start,
            properties=props,
            tls_context=self.tls_context,
            username=self.username,
            password=self.password,
            keepalive=30,
            # unbounded: paho has already PUBACKed what is queued here, so a bounded
            # queue would drop records the broker counts as delivered (agents re-send
            # them only after resend_after_s; other publishers never)
            max_inflight_messages=100,
            socket_options=NO_DELAY,
        )

    async def run(self) -> None:
        """Consume until cancelled, reconnecting with backoff."""
        backoff = Backoff(cap=10.0)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_gaps(), name="registry-gaps")
            if self.personal_retention_hours is not None:
                tg.create_task(self._purge_personal(), name="registry-personal-retention")
            while True:
                try:
                    async with self._client() as client:
                        await client.subscribe(self.topic, qos=1)
                        await client.subscribe(self.blob_topic, qos=1)
                        backoff.reset()
                        self.connected.set()
                        log.info("registry consuming %s on %s:%d", self.topic, self.host, self.port)
                        await self._consume(client)
                except aiomqtt.MqttError as e:
                    self.connected.clear()
                    delay = backoff.next()
                    log.warning(
                        "registry: broker %s:%d: %s; retry in %.1f s",
                        self.host,
                        self.port,
                        e,
                        delay,
                    )
                    await asyncio.sleep(delay)

    async def _consume(self, client: aiomqtt.Client) -> None:
        """Take what is queued (at most `batch_max_messages`), one commit, then the acks.

        Under load the queue holds many messages and a commit covers them all;
        when quiet, each message is committed on its own without waiting.
        """
        messages = client.messages
        async for first in messages:
            taken = [first]
            while len(messages) and len(taken) < self.batch_max_messages:
                taken.append(await anext(messages))
            records = []
            for m in taken:
                topic = self.topics.parse(m.topic.value)
                if topic is None:
                    log.warning(
                        "registry: dropped a message on %s: not a topic of the contract",
                        m.topic.value[:200],
                    )
                elif topic.kind == "records":
                    records.append((topic, m))
                elif topic.kind in ("blob_manifest", "blob_chunk"):
                    await self._handle_blob(client, topic, m)
                # anything else (our own blob requests on the wildcard) is not for us
            batches = [b for b in (self._parse(t, m) for t, m in records) if b is not None]
            if not batches:
                continue
            try:
                stored = await self.store.store(batches)
            except RegistryStoreError as e:
                # nothing committed, nothing acked: the agents send it again
                self.store_failures += 1
                log.error("registry: store failed, %d message(s) not acked: %s", len(batches), e)
                continue
            self.commits += 1
            await self._ack(client, stored)

    async def _ack(self, client: aiomqtt.Client, stored: list[Stored]) -> None:
        ids: dict[tuple[str, str], list[str]] = {}
        for s in stored:
            if s.new:
                self.stored_new += 1
            else:
                self.duplicates += 1
            if self.on_stored is not None:
                self.on_stored(s)
            if await self._blob_ready(s):
                ids.setdefault((s.site, s.agent), []).append(s.record["id"])
        # one ack per agent, all in flight together: a broker far away costs one
        # round trip per commit, not one per agent
        await asyncio.gather(
            *(
                client.publish(self.topics.station(site, agent).ack, Ack(agent_ids).encode(), qos=1)
                for (site, agent), agent_ids in ids.items()
            )
        )

    def _parse(self, where: Topic, message: aiomqtt.Message) -> Batch | None:
        topic = message.topic.value
        try:
            body = json.loads(message.payload)
            if not isinstance(body, dict):
                raise ValueError("payload is not an object")
            if body.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {body.get('schema')!r}")
            site, agent = body["site"], body["agent"]
            if [where.site, where.agent] != [site, agent]:
                raise ValueError("envelope site/agent differ from the topic")
            records = body["records"]
            if not isinstance(records, list):
                raise ValueError("records must be a list")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("registry: dropped a malformed message on %s: %s", topic, e)
            return None
        good = []
        for i, r in enumerate(records):
            try:
                checked = check_record(r)
                self._check_personal(site, agent, checked)
                good.append(checked)
            except ValueError as e:  # never log the record: it may hold personal data
                log.warning("registry: %s/%s record %d not stored: %s", site, agent, i, e)
        return Batch(site, agent, good) if good else None

    def _check_personal(self, site: str, agent: str, record: dict[str, Any]) -> None:
        """A sealed personal part must parse (`PersonalSealError`, a ValueError, if not);
        one in the clear is counted and warned about, and the store drops it."""
        data = record.get("data")
        if not isinstance(data, dict):
            return
        rid = str(record.get("id"))
        if "personal_sealed" in data:
            parse_envelope(data["personal_sealed"], rid)
        if "personal" in data:
            self.personal_in_clear += 1
            log.warning(
                "registry: %s/%s record %s carried personal data in the clear: not stored "
                "(the station needs outbox.registry_public_key)",
                site,
                agent,
                rid,
            )

    async def _purge_personal(self) -> None:
        """Purge sealed personal parts older than `personal_retention_hours`."""
        assert self.personal_retention_hours is not None
        keep_s = self.personal_retention_hours * 3600
        every = min(300.0, max(0.2, keep_s / 4))
        store = self.store
        if not hasattr(store, "purge_personal"):
            return
        personal = cast(PersonalStore, store)
        while True:
            try:
                ids = await personal.purge_personal(keep_s, who="registry retention")
            except RegistryStoreError as e:
                log.warning("registry: personal data purge failed: %s", e)
            else:
                if ids:
                    self.personal_purged += len(ids)
                    log.info(
                        "registry: purged the sealed personal part of %d record(s) "
                        "(retention %.1f h)",
                        len(ids),
                        self.personal_retention_hours,
                    )
            await asyncio.sleep(every)

    async def _watch_gaps(self) -> None:
        """Raise an alert, once, for each gap open longer than `gap_timeout_s`."""
        every = min(5.0, max(0.2, self.gap_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            try:
                overdue = await self.store.overdue_gaps(self.gap_timeout_s)
            except RegistryStoreError as e:
                log.warning("registry: gap check failed: %s", e)
                continue
            for g in overdue:
                log.warning(
                    "ALERT seq gap open for more than %.0f s: %s/%s missing %d..%d",
                    self.gap_timeout_s,
                    g.site,
                    g.agent,
                    g.first,
                    g.last,
                )
                self.alerts.append(g)
                if self.on_alert is not None:
                    self.on_alert(g)

    # -- blobs (photos): docs/CONTRACT.md "Blobs", agent/central/blobs.py -------------

    async def _in_blob_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._blob_executor is not None, "registry not open"
        return await asyncio.get_running_loop().run_in_executor(self._blob_executor, fn, *args)

    async def _blob_ready(self, stored: Stored) -> bool:
        """A photo record is acked only when its blob is complete, verified and stored."""
        record = stored.record
        if record.get("kind") != "photo":
            return True
        rid, sha = record["id"], str(record.get("data", {}).get("sha256"))
        done = await self._in_blob_thread(
            self.blobs.is_complete, stored.site, stored.agent, rid, sha
        )
        if done and await self._keep_blob(stored.site, stored.agent, rid):
            return True
        self._photos_waiting[rid] = (stored.site, stored.agent)
        return False

    async def _keep_blob(self, site: str, agent: str, rid: str) -> bool:
        """Put a finished blob into the record store (idempotent); False if that failed."""
        path = self.blobs.final_path(site, agent, rid)

        def load() -> tuple[dict[str, Any], bytes]:
            return json.loads(path.with_suffix(".json").read_text()), path.read_bytes()

        try:
            meta, data = await self._in_blob_thread(load)
            await self.store.store_blob(
                record_id=rid,
                site=site,
                agent=agent,
                name="photo",
                content_type=str(meta.get("content_type", "application/octet-stream")),
                sha256=str(meta["sha256"]),
                data=data,
            )
        except (OSError, ValueError, KeyError, RegistryStoreError, BlobMismatch) as e:
            log.error("registry: blob of record %s not stored: %s", rid, e)
            return False
        return True

    async def _handle_blob(
        self, client: aiomqtt.Client, topic: Topic, message: aiomqtt.Message
    ) -> None:
        site, agent, rid = topic.site, topic.agent, str(topic.record_id)
        try:
            if topic.kind == "blob_manifest":
                body = json.loads(message.payload)
                state: BlobState = await self._in_blob_thread(
                    self.blobs.manifest, site, agent, rid, body
                )
            else:
                payload = message.payload
                if topic.chunk is None or not isinstance(payload, bytes | bytearray):
                    raise BlobError("a chunk's payload must be bytes")
                state = await self._in_blob_thread(
                    self.blobs.chunk, site, agent, rid, topic.chunk, bytes(payload)
                )
        except (BlobError, ValueError, OSError) as e:
            log.warning("registry: dropped a blob message on %s: %s", message.topic.value, e)
            return
        station = self.topics.station(site, agent)
        if state.missing:
            self.blob_requests.append((rid, state.missing))
            body = missing_request(state.sha256, state.missing)
            await client.publish(station.blob_missing(rid), body, qos=1)
        if (
            state.complete
            and rid in self._photos_waiting
            and await self._keep_blob(site, agent, rid)
        ):
            self._photos_waiting.pop(rid, None)
            await client.publish(station.ack, Ack([rid]).encode(), qos=1)


_LONG_DIGITS = re.compile(r"\d(?:[\d -]*\d)?")


def _mask_digits(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    if len(digits) < 8:
        return m.group(0)
    return f"{digits[:4]}-****-{digits[-4:]}"


def mask_identifiers(text: str) -> str:
    """Numbers of 8 digits or more (ticket numbers, My Numbers, card ids) as
    `1111-****-2345`; shorter numbers (a municipality code, a count) stay."""
    return _LONG_DIGITS.sub(_mask_digits, text)


def describe_record(record: dict[str, Any], *, show_data: bool = False) -> str:
    """One line for a console: never personal data, only what identifies the read.
    Identifiers in a scanned text are masked unless `show_data` (`--show-data`)."""
    data = record.get("data", {})
    interp = data.get("interpretation") or {}
    text = data.get("text")
    what = interp.get("type", record.get("kind"))
    verdict = "" if not interp else ("valid" if interp.get("valid") else "INVALID")
    problems = ",".join(interp.get("problems", []))
    shown = "" if text is None or record.get("kind") != "barcode" else repr(text)
    if shown and not show_data:
        shown = mask_identifiers(shown)
    return " ".join(
        p
        for p in (
            f"seq={record.get('seq')}",
            str(record.get("device")),
            what or "",
            verdict,
            problems,
            shown,
        )
        if p
    )


async def run_registry(
    host: str,
    port: int,
    db: Path | str,
    prefix: str,
    client_id: str | None,
    stop: asyncio.Event,
    tls_context: Any = None,
    *,
    shared: str | None = None,
    gap_timeout_s: float = 300.0,
    batch_max_messages: int = 64,
    quiet: bool = False,
    blob_dir: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    personal_retention_hours: float | None = 72.0,
    show_data: bool = False,
) -> None:
    """The `madoguchi registry` command body: print each stored record until stopped."""

    def printer(s: Stored) -> None:
        mark = "stored   " if s.new else "duplicate"
        print(
            f"{mark} {s.site}/{s.agent} {describe_record(s.record, show_data=show_data)}",
            flush=True,
        )

    async with Registry(
        host,
        port,
        db,
        topic_prefix=prefix,
        client_id=client_id,
        shared=shared,
        on_stored=None if quiet else printer,
        tls_context=tls_context,
        gap_timeout_s=gap_timeout_s,
        batch_max_messages=batch_max_messages,
        blob_dir=blob_dir,
        username=username,
        password=password,
        personal_retention_hours=personal_retention_hours,
    ) as registry:
        task = asyncio.create_task(registry.run(), name="registry")
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
