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

Records reach `Registry.take` as `Inbound` messages, and acks leave through a
`Publish` callable: from the registry's own MQTT connection (below), or from a
`Transport` such as agent/central/amqp.py (a RabbitMQ quorum queue, docs/cluster.md),
which settles each batch with its broker only after `take` returned.

Several consumers can share the load with an MQTT 5 shared subscription
(`$share/GROUP/...`). A consumer killed after the broker handed it a message
but before its commit loses that message on the wire; it was never acked, so
the agent re-sends it after `resend_after_s` and a live consumer stores it.
That is why the ack must never go out before the commit.

Nothing a station sends can stop it (docs/CONTRACT.md "Registry"): every
message goes through `agent.contract.validate.parse_records`; what fails is
never acked, is kept in the bounded `dead_letters` table and counted. A
commit that fails is retried message by message, so one station's poison
never holds back another's records. A known id with other content is a
conflict: kept apart, alerted, and acked (the first content stays). An
unexpected exception in any task ends `run()` (and the process, non-zero, for
systemd to restart); the retained `{prefix}/_registry/{name}/status` (online +
heartbeat, offline by will) lets the dashboard see a registry down or behind.
Personal data arrives only sealed (`data.personal_sealed`, agent/personal_seal.py):
the registry checks the envelope's shape, the store keeps it apart from the record
body, and `_purge_personal` deletes it after `personal_retention_hours`; a plain
`data.personal` is dropped with a warning. The console masks long numbers unless
`show_data`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, cast

from agent._aio import Backoff, raise_if_cancelling
from agent.central.blobs import BlobAssembler, BlobState
from agent.central.datasets import UsedTicketsFeed
from agent.central.fastjson import CODEC
from agent.central.mqtt_lean import LeanClient, Will
from agent.central.station_status import StationStatusFeed
from agent.central.store import (
    Batch,
    DeadLetter,
    Gap,
    PersonalStore,
    RecordStore,
    Stored,
    carries_personal,
)
from agent.central.stores import open_store
from agent.contract.blobs import PHOTO_KIND, missing_request
from agent.contract.messages import Ack
from agent.contract.records import iso_ms, utc_now
from agent.contract.topics import DEFAULT_PREFIX, Topic, Topics, registry_name
from agent.contract.validate import LOST_RANGE, RecordError, load_json, lost_range, parse_records
from agent.errors import BlobError, BlobMismatch, BrokerLinkError, RegistryStoreError
from agent.personal_seal import parse_envelope

__all__ = [
    "Gap",
    "Inbound",
    "OnAlert",
    "OnStored",
    "Registry",
    "Stored",
    "Transport",
    "describe_record",
    "mask_identifiers",
    "run_registry",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

OnStored = Callable[[Stored], None]
OnAlert = Callable[[Gap], None]
OnConflict = Callable[[Stored], None]

#: the retained will of a consumer named after its pid expires after a day (it is never
#: cleared otherwise: the restarted consumer has another name)
EPHEMERAL_WILL_EXPIRY_S = 24 * 3600
#: bytes of a refused payload kept as its dead letter (none if it names a personal part)
MAX_KEPT_PAYLOAD = 1024


# -- the transport seam -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message as any transport hands it over: its contract topic (`/`-separated, as
    on MQTT) and its payload. Validation, storage and acks see only this."""

    topic: str
    payload: bytes


#: publish `payload` on contract topic `topic`, at least once, confirmed by the broker
Publish = Callable[[str, bytes], Awaitable[None]]
#: send the acks of one commit, (topic, payload) each; returns once they are on their way
AckAll = Callable[[list[tuple[str, bytes]]], Awaitable[None]]


class Transport(Protocol):
    """Where the records come from when not from the registry's own MQTT connection
    (agent/central/amqp.py): it calls `registry.take(publish, messages)` per batch and
    settles the batch with its broker only after that returned (commit, then acks)."""

    async def run(self, registry: Registry) -> None: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A batch checked and ready to store: its parsed messages and what was refused."""

    batches: list[tuple[Inbound, Batch]]
    letters: list[DeadLetter]


# -- the MQTT loop ------------------------------------------------------------------------


ACK_DEADLINE_S = 10.0
"""How long the broker may take to confirm (PUBACK) all the acks of one commit (what
aiomqtt allowed one publish, for the lot). Past it the connection counts as lost."""

COMMITS_ACKING = 4
"""Commits whose acks may wait for the broker's PUBACKs while the next batch is stored:
the registry's loop does not stop for a broker round trip per commit."""

RECEIVE_MAXIMUM = 1024
"""Records messages the broker may have out to one consumer unsettled (MQTT 5 Receive
Maximum): PUBACKed after their commit, so a burst waits at the broker, not in memory;
at least 4 batches of `batch_max_messages`, so the next batch is always here."""

BATCH_MAX_BYTES = 8 * 1024 * 1024
"""Payload bytes of one batch at most (beside `batch_max_messages`): 512 one-record
messages are ~250 kB, 512 full 200 kB envelopes would be 100 MB; 8 MiB is 40 of those
(20,000 records in one commit)."""

ACK_MAX_IDS = 4096
"""Ids per ack message at most (about 160 kB): under the station's default 1 MiB
`mqtt.max_inbound_bytes` with room to spare, whatever one commit covered."""


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
        batch_max_messages: int = 512,
        gap_timeout_s: float = 300.0,
        blob_dir: Path | None = None,
        heartbeat_s: float = 10.0,
        on_conflict: OnConflict | None = None,
        username: str | None = None,
        password: str | None = None,
        personal_retention_hours: float | None = 72.0,
        datasets: UsedTicketsFeed | None = None,
        transport: Transport | None = None,
        on_acked: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        #: called once per batch, before its acks go out: a console flushes its lines once per
        #: commit, not once per record (a write per record was a tenth of the CPU)
        self.on_acked = on_acked
        #: None: records come over the registry's MQTT connection; else from this
        self.transport = transport
        #: keeps and publishes `used_tickets` from the records stored (agent/central/datasets.py)
        self.datasets = datasets
        # sealed personal parts are purged this long after they were stored (None: never)
        self.personal_retention_hours = personal_retention_hours
        self.personal_purged = 0
        self.personal_in_clear = 0
        self.port = port
        self.prefix = topic_prefix
        self.topics = Topics(topic_prefix)
        self.shared = shared
        # a client id made of the pid is new at every start: its retained status must not
        # pile up on the broker (cleared at a clean stop, the will expires)
        self._ephemeral_id = client_id is None and shared is not None
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
        self.dead_letters = 0
        self.conflicts = 0
        self.heartbeat_s = heartbeat_s
        self.on_conflict = on_conflict
        self.status_topic = self.topics.registry_status(registry_name(self.client_id))
        self._session = 0
        self._client_now: LeanClient | None = None
        self._busy_since: float | None = None  # when the batch being stored was taken
        self.alerts: list[Gap] = []
        #: `lost_range` records received (docs/CONTRACT.md "lost-range record")
        self.lost_ranges: list[Gap] = []
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
        if self.datasets is not None:
            self.datasets.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.datasets is not None:
            self.datasets.close()
        try:
            await self.store.close()
        finally:
            if self._blob_executor is not None:
                self._blob_executor.shutdown(wait=True)
                self._blob_executor = None

    def _status(self, state: str, **extra: Any) -> bytes:
        """The retained registry status: who, which connection, what it has done."""
        body: dict[str, Any] = {
            "state": state,
            "client_id": self.client_id,
            "session": self._session,
            "ts": iso_ms(utc_now()),
            **extra,
        }
        return json.dumps(body).encode()

    def _heartbeat_body(self) -> bytes:
        busy = self._busy_since
        return self._status(
            "online",
            heartbeat_s=self.heartbeat_s,
            lag_s=0.0 if busy is None else round(time.time() - busy, 3),
            stored=self.stored_new,
            duplicates=self.duplicates,
            conflicts=self.conflicts,
            dead_letters=self.dead_letters,
            store_failures=self.store_failures,
        )

    def _client(self) -> LeanClient:
        self._session = time.time_ns() // 1_000_000  # a later connection: a larger session
        will = Will(
            self.status_topic,
            self._status("offline", reason="connection lost"),
            retain=True,
            expiry_s=EPHEMERAL_WILL_EXPIRY_S if self._ephemeral_id else None,
        )
        # one consumer: a persistent session keeps records queued while it restarts;
        # a group member that dies must leave the group at once, not hold a queue of
        # records nobody will read: the agents' re-send covers what it had
        return LeanClient(
            self.host,
            self.port,
            client_id=self.client_id,
            clean_start=self.shared is not None,
            session_expiry_s=7 * 24 * 3600 if self.shared is None else 0,
            keepalive=30,
            receive_maximum=max(RECEIVE_MAXIMUM, 4 * self.batch_max_messages),
            tls_context=self.tls_context,
            username=self.username,
            password=self.password,
            will=will,
        )

    async def run(self) -> None:
        """Consume until cancelled, reconnecting with backoff.

        Only broker errors are retried here; anything else unexpected ends `run()`
        with that exception (and the process, for systemd to restart it): a registry
        that stays up but stores nothing is the one failure nobody sees.
        """
        backoff = Backoff(cap=10.0)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_gaps(), name="registry-gaps")
            tg.create_task(self._heartbeat(), name="registry-heartbeat")
            if self.personal_retention_hours is not None:
                tg.create_task(self._purge_personal(), name="registry-personal-retention")
            if self.datasets is not None:
                tg.create_task(
                    self.datasets.run(self.connected, lambda: self._client_now),
                    name="registry-datasets",
                )
            if self.transport is not None:
                log.info("registry: records from %s", self.transport.describe())
                await self.transport.run(self)
                return
            while True:
                try:
                    async with self._client() as client:
                        await client.subscribe(self.topic, qos=1)
                        await client.subscribe(self.blob_topic, qos=1)
                        await client.publish(
                            self.status_topic, self._heartbeat_body(), qos=1, retain=True
                        )
                        raise_if_cancelling()
                        self._client_now = client
                        backoff.reset()
                        self.connected.set()
                        log.info("registry consuming %s on %s:%d", self.topic, self.host, self.port)
                        try:
                            await self._consume(client)
                        finally:
                            self._client_now = None
                            await self._say_offline(client)
                except BrokerLinkError as e:
                    self.connected.clear()
                    delay = backoff.next()
                    log.warning("registry: %s; retry in %.1f s", e, delay)
                    await asyncio.sleep(delay)

    async def _say_offline(self, client: LeanClient) -> None:
        """A clean stop sends no will: say offline ourselves (best effort, bounded)."""
        with contextlib.suppress(BrokerLinkError, TimeoutError):
            async with asyncio.timeout(2.0):
                retain = not self._ephemeral_id
                await client.publish(
                    self.status_topic,
                    self._status("offline", reason="stopped"),
                    qos=1,
                    retain=retain,
                )
                if not retain:  # and no retained status left behind under a pid's name
                    await client.publish(self.status_topic, b"", qos=1, retain=True)

    async def _heartbeat(self) -> None:
        """The retained status again every `heartbeat_s`, with the consumer's lag."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            client = self._client_now
            if client is None:
                continue
            try:
                await client.publish(self.status_topic, self._heartbeat_body(), qos=1, retain=True)
            except BrokerLinkError as e:  # the consume loop sees the broker go and reconnects
                log.debug("registry: heartbeat not sent: %s", e)

    async def _consume(self, client: LeanClient) -> None:
        """Take what has arrived (at most `batch_max_messages`), one commit, then settle
        the batch with the broker (its PUBACKs) and send the acks.

        Under load many messages are waiting and a commit covers them all; when quiet,
        each message is committed on its own without waiting.
        """

        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1)

        acking: collections.deque[asyncio.Task[None]] = collections.deque()

        async def confirm(sends: list[tuple[str, bytes]]) -> None:
            try:
                async with asyncio.timeout(ACK_DEADLINE_S):
                    await client.publish_many(sends)
            except TimeoutError:
                # as a publish of its own would have: the connection is lost and made
                # again (run()); the records are committed, the stations re-send
                client.fail(
                    BrokerLinkError(
                        f"broker {self.host}:{self.port} confirmed no ack of a commit"
                        f" within {ACK_DEADLINE_S:.0f} s"
                    )
                )
            except BrokerLinkError:
                pass  # the connection is over: the loop below hears it from the client

        async def ack_all(sends: list[tuple[str, bytes]]) -> None:
            # written at once, confirmed in the background; the oldest commits' acks are
            # waited for only when COMMITS_ACKING of them are out
            while len(acking) >= COMMITS_ACKING:
                await acking.popleft()
            acking.append(asyncio.create_task(confirm(sends), name="registry-acks"))

        # two stages: this loop checks batch k+1 while the committer stores batch k (in
        # the store's thread) and sends its acks; commits and acks stay in arrival order.
        # The next batch is taken only once the committer has picked the last one up:
        # what arrives meanwhile makes one batch (one commit), as without the stages
        ready: asyncio.Queue[tuple[_Prepared, Callable[[], None]]] = asyncio.Queue(1)
        picked = asyncio.Event()

        async def commit_in_turn() -> None:
            while True:
                prepared, settle = await ready.get()
                picked.set()
                self._busy_since = time.time()
                try:
                    await self._commit(publish, prepared, ack_all, settle)
                finally:
                    self._busy_since = None

        committer = asyncio.create_task(commit_in_turn(), name="registry-commit")

        async def unless_committer_failed(step: Awaitable[T]) -> T:
            waiting = asyncio.ensure_future(step)
            try:
                await asyncio.wait((waiting, committer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not waiting.done():
                    waiting.cancel()
            if committer.done():
                committer.result()  # its error ends the loop as its own would
                raise AssertionError("the committer returned")  # it never does
            return waiting.result()

        try:
            while True:
                taken = await unless_committer_failed(
                    client.batch(self.batch_max_messages, BATCH_MAX_BYTES)
                )
                inbound = [Inbound(m.topic, m.payload) for m in taken]
                prepared = await self._prepare(publish, inbound)
                settle = functools.partial(client.settle, taken)
                picked.clear()
                ready.put_nowait((prepared, settle))  # the slot is free: picked up before
                await unless_committer_failed(picked.wait())
        finally:
            for task in (committer, *acking):
                task.cancel()
            await asyncio.gather(committer, *acking, return_exceptions=True)

    async def take(self, publish: Publish, taken: list[Inbound]) -> None:
        """One batch from a transport: validate, store (isolating a poison message),
        commit, then the acks through `publish`; refused ones dead-lettered. When this
        returns, the transport may settle the batch with its broker."""
        self._busy_since = time.time()
        try:
            await self._commit(publish, await self._prepare(publish, taken), None, None)
        finally:
            self._busy_since = None

    async def _prepare(self, publish: Publish, taken: list[Inbound]) -> _Prepared:
        """Sort and check a batch: records parsed, blobs handled, refusals noted."""
        records = []
        letters: list[DeadLetter] = []
        for m in taken:
            topic = self.topics.parse(m.topic)
            if topic is None:
                letters.append(self._letter(m, None, "not a topic of the contract"))
            elif topic.kind == "records":
                records.append((topic, m))
            elif topic.kind in ("blob_manifest", "blob_chunk"):
                await self._handle_blob(publish, topic, m)
            # anything else (our own blob requests on the wildcard) is not for us
        parsed = [(m, self._parse(t, m, letters)) for t, m in records]
        return _Prepared([(m, b) for m, b in parsed if b is not None], letters)

    async def _commit(
        self,
        publish: Publish,
        prepared: _Prepared,
        ack_all: AckAll | None,
        settle: Callable[[], None] | None,
    ) -> None:
        """Store a checked batch in one transaction, keep its refusals, settle, ack."""
        batches, letters = prepared.batches, prepared.letters
        stored: list[Stored] = []
        if batches:
            try:
                stored = await self.store.store([b for _, b in batches])
            except RegistryStoreError as e:
                stored = await self._isolate(batches, e, letters)
            else:
                self.commits += 1
        # the refused are kept before the acks go out: whoever sees an ack of a later
        # message finds every earlier refusal counted
        await self._dead_letter(letters)
        if settle is not None:
            settle()
        if stored:
            await self._ack(publish, stored, ack_all)

    async def _isolate(
        self,
        batches: list[tuple[Inbound, Batch]],
        error: RegistryStoreError,
        letters: list[DeadLetter],
    ) -> list[Stored]:
        """A failed commit, again message by message: the poison is the one that fails
        while others pass. If every one fails, the database is down: nothing is acked
        and the agents send it all again."""
        if len(batches) == 1:
            self.store_failures += 1
            log.error("registry: store failed, 1 message not acked: %s", error)
            return []
        stored: list[Stored] = []
        failed: list[tuple[Inbound, Batch, RegistryStoreError]] = []
        for m, b in batches:
            try:
                stored.extend(await self.store.store([b]))
                self.commits += 1
            except RegistryStoreError as e:
                failed.append((m, b, e))
        if not stored:
            self.store_failures += 1
            log.error("registry: store failed, %d message(s) not acked: %s", len(batches), error)
            return []
        for m, b, why in failed:
            # the first line only: a database's detail lines may quote the values
            reason = f"the database refused it: {str(why).splitlines()[0][:200]}"
            letters.append(self._letter(m, b.site, reason, b.agent))
        return stored

    def _letter(self, m: Inbound, site: str | None, reason: str, agent: str = "") -> DeadLetter:
        payload = m.payload
        if b"personal" in bytes(payload).lower():
            # the registry database holds no personal data in the clear, even refused
            payload = b""
        return DeadLetter(
            topic=_clean(m.topic[:300]),
            reason=_clean(reason),
            payload=bytes(payload[:MAX_KEPT_PAYLOAD]),
            at=time.time(),
            site=site or "",
            agent=agent,
        )

    async def _dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Count, log (reason and topic only: the payload may hold personal data), keep."""
        if not letters:
            return
        self.dead_letters += len(letters)
        for d in letters:
            log.warning("ALERT dead letter on %s: %s", d.topic, d.reason)
        try:
            await self.store.dead_letter(letters)
        except RegistryStoreError as e:
            log.error("registry: %d dead letter(s) not kept: %s", len(letters), e)

    async def _ack(
        self, publish: Publish, stored: list[Stored], ack_all: AckAll | None = None
    ) -> None:
        ids: dict[tuple[str, str], list[str]] = {}
        for s in stored:
            if s.new:
                self.stored_new += 1
                if s.record.get("kind") == LOST_RANGE:
                    self._lost_range_alert(s)
            elif s.conflict:
                self.conflicts += 1
                log.warning(
                    "ALERT conflict: %s/%s sent record %s again with other content;"
                    " the first stays, the second is kept in conflicts",
                    s.site,
                    s.agent,
                    s.record["id"],
                )
                if self.on_conflict is not None:
                    self.on_conflict(s)
            else:
                self.duplicates += 1
            if self.on_stored is not None:
                self.on_stored(s)
            if self.datasets is not None:
                self.datasets.note(s)
            # a photo waits for its blob; no coroutine for every other record
            if s.conflict or s.record["kind"] != PHOTO_KIND or await self._blob_ready(s):
                ids.setdefault((s.site, s.agent), []).append(s.record["id"])
        if self.on_acked is not None:  # the lines of what is about to be acked
            self.on_acked()
        # one ack per agent, all in flight together: a broker far away costs one
        # round trip per commit, not one per agent
        # and at most ACK_MAX_IDS ids per ack: a commit of many big messages must not make
        # an ack the station drops as over its mqtt.max_inbound_bytes (issue #18)
        sends = [
            (self.topics.station(site, agent).ack, Ack(agent_ids[i : i + ACK_MAX_IDS]).encode())
            for (site, agent), agent_ids in ids.items()
            for i in range(0, len(agent_ids), ACK_MAX_IDS)
        ]
        if ack_all is not None:
            await ack_all(sends)
        else:
            await asyncio.gather(*(publish(topic, payload) for topic, payload in sends))

    def _lost_range_alert(self, s: Stored) -> None:
        """A station reported seqs it could not read from a damaged outbox: stored like
        any record, and an alert at once (no gap timeout: the station knows they are gone)."""
        first, last = lost_range(s.record)
        log.warning(
            "ALERT %s/%s lost seq %d..%d (%d record(s)) to a damaged outbox",
            s.site,
            s.agent,
            first,
            last,
            last - first + 1,
        )
        gap = Gap(s.site, s.agent, first, last, time.time())
        self.lost_ranges.append(gap)
        if self.on_alert is not None:
            self.on_alert(gap)

    def _parse(self, where: Topic, message: Inbound, letters: list[DeadLetter]) -> Batch | None:
        """The valid records of a message; each refusal becomes a dead letter."""
        try:
            env = parse_records(message.payload, where.site, where.agent, codec=CODEC)
        except RecordError as e:  # never log the payload: it may hold personal data
            letters.append(self._letter(message, where.site, str(e), where.agent))
            return None
        for bad in env.refused:
            letters.append(
                self._letter(message, where.site, f"record {bad.index}: {bad.reason}", where.agent)
            )
        good = env.records
        if any(carries_personal(r) for r in good):
            good = []
            for r in env.records:
                try:
                    self._check_personal(where.site, where.agent, r)
                    good.append(r)
                except ValueError as e:  # never log the record: it may hold personal data
                    reason = f"record {r['id']}: {e}"[:300]
                    letters.append(self._letter(message, where.site, reason, where.agent))
        return Batch(env.site, env.agent, good) if good else None

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
        """Whether a photo record may be acked: only once its blob is complete, verified
        and stored (`_ack` asks only for photos)."""
        record = stored.record
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

    async def _handle_blob(self, publish: Publish, topic: Topic, message: Inbound) -> None:
        site, agent, rid = topic.site, topic.agent, str(topic.record_id)
        try:
            if topic.kind == "blob_manifest":
                body = load_json(message.payload)
                state: BlobState = await self._in_blob_thread(
                    self.blobs.manifest, site, agent, rid, body
                )
            else:
                if topic.chunk is None:
                    raise BlobError("a chunk's topic must name its index")
                state = await self._in_blob_thread(
                    self.blobs.chunk, site, agent, rid, topic.chunk, message.payload
                )
        except (BlobError, ValueError, OSError, TypeError, KeyError) as e:
            # (RecordError is a ValueError) a bad blob message is that message's problem only
            log.warning("registry: dropped a blob message on %s: %s", _clean(message.topic), e)
            return
        station = self.topics.station(site, agent)
        if state.missing:
            self.blob_requests.append((rid, state.missing))
            body = missing_request(state.sha256, state.missing)
            await publish(station.blob_missing(rid), body)
        if (
            state.complete
            and rid in self._photos_waiting
            and await self._keep_blob(site, agent, rid)
        ):
            self._photos_waiting.pop(rid, None)
            await publish(station.ack, Ack([rid]).encode())


def _clean(text: str) -> str:
    """Printable, valid UTF-8 text for a log line and a database column."""
    return (
        "".join(c if c >= " " and c != "\x7f" else "?" for c in text)
        .encode("utf-8", "replace")
        .decode()
    )


_LONG_DIGITS = re.compile(r"\d(?:[\d -]*\d)?")
_NOT_DIGIT = re.compile(r"\D")


def _mask_digits(m: re.Match[str]) -> str:
    found = m.group(0)
    if len(found) < 8:  # fewer characters: fewer than 8 digits
        return found
    digits = _NOT_DIGIT.sub("", found)
    if len(digits) < 8:
        return found
    return f"{digits[:4]}-****-{digits[-4:]}"


def mask_identifiers(text: str) -> str:
    """Numbers of 8 digits or more (ticket numbers, My Numbers, card ids) as
    `1111-****-2345`; shorter numbers (a municipality code, a count) stay."""
    return _LONG_DIGITS.sub(_mask_digits, text)


def describe_record(record: dict[str, Any], *, show_data: bool = False) -> str:
    """One line for a console: never personal data, only what identifies the read.
    Identifiers in a scanned text are masked unless `show_data` (`--show-data`)."""
    data = record.get("data")
    data = data if isinstance(data, dict) else {}
    interp = data.get("interpretation")
    interp = interp if isinstance(interp, dict) else {}
    text = data.get("text")
    kind = record.get("kind")
    parts = [f"seq={record.get('seq')}", str(record.get("device"))]
    what = str(interp.get("type", kind))
    if what:
        parts.append(what)
    if interp:
        parts.append("valid" if interp.get("valid") else "INVALID")
        found = interp.get("problems")
        if isinstance(found, list) and found:
            parts.append(",".join(str(p) for p in found))
    if text is not None and kind == "barcode":
        shown = repr(text)
        parts.append(shown if show_data else mask_identifiers(shown))
    return " ".join(p for p in parts if p)


def tune_gc() -> None:
    """The garbage collector as `madoguchi registry` sets it for its process: the
    youngest generation collected after 1,000,000 allocations, not 700.

    A record is about five containers, and all of them die at its ack, by reference
    counting (the collector only ever finds cycles). The collector's count is
    allocations less deallocations, so it only grows with what is alive: two batches in
    flight (`BATCH_MAX_BYTES` each) are up to about 600,000 containers, and a drain
    peaked at 330,000. Below that peak every batch paid a collection that scanned all of
    it (35 ms per 100,000 here) and promoted it, for the older collections to scan
    again: at 700 a fifth of the registry's CPU per record, at 100,000 still 2 µs
    (issue #18). What outlives a batch is about 0.1 container a record, so a
    collection still comes every few million records. A process that hosts a registry
    in-process (a benchmark) calls it too."""
    gc.set_threshold(1_000_000, 50, 100)


async def run_registry(
    host: str,
    port: int,
    db: RecordStore | Path | str,
    prefix: str,
    client_id: str | None,
    stop: asyncio.Event,
    tls_context: Any = None,
    *,
    shared: str | None = None,
    gap_timeout_s: float = 300.0,
    batch_max_messages: int = 512,
    quiet: bool = False,
    heartbeat_s: float = 10.0,
    blob_dir: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    personal_retention_hours: float | None = 72.0,
    show_data: bool = False,
    datasets: UsedTicketsFeed | None = None,
    station_status: StationStatusFeed | None = None,
    transport: Transport | None = None,
) -> None:
    """The `madoguchi registry` command body: print each stored record until stopped.

    Returns when `stop` is set; raises when the consumer ended on its own (an
    unexpected error), so that the process exits non-zero and systemd restarts it.
    """

    def printer(s: Stored) -> None:
        if station_status is not None:  # the derived station status hears of every record
            station_status.on_stored(s.site, s.agent, time.time())
        if quiet:
            return
        mark = "stored   " if s.new else "CONFLICT " if s.conflict else "duplicate"
        # flushed once per batch (`on_acked`), not per record
        print(f"{mark} {s.site}/{s.agent} {describe_record(s.record, show_data=show_data)}")

    async with Registry(
        host,
        port,
        db,
        topic_prefix=prefix,
        client_id=client_id,
        shared=shared,
        on_stored=None if quiet and station_status is None else printer,
        tls_context=tls_context,
        gap_timeout_s=gap_timeout_s,
        batch_max_messages=batch_max_messages,
        heartbeat_s=heartbeat_s,
        blob_dir=blob_dir,
        username=username,
        password=password,
        personal_retention_hours=personal_retention_hours,
        datasets=datasets,
        transport=transport,
        on_acked=None if quiet else sys.stdout.flush,
    ) as registry:
        task = asyncio.create_task(registry.run(), name="registry")
        stopped = asyncio.create_task(stop.wait(), name="registry-stop")
        feed = None  # its own connection (agent/central/station_status.py)
        if station_status is not None:
            feed = asyncio.create_task(station_status.run(), name="registry-station-status")
        try:
            # the consumer, not only `stop`: a registry whose consumer died must exit
            waits = {task, stopped} if feed is None else {task, stopped, feed}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if feed is not None and feed.done():
                log.critical("registry: the station status feed stopped: exiting for a restart")
                feed.result()
                raise RegistryStoreError("registry: the station status feed stopped")
            if task.done():
                log.critical("registry: the consumer stopped: exiting for a restart")
                task.result()  # its exception, with its traceback
                raise RegistryStoreError("registry: the consumer stopped without an error")
        finally:
            stopped.cancel()
            for t in (task, feed):
                if t is not None and not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
