"""A registry no message can stop (issue #16): poison, hostile streams, conflicts, crashes.

Real mosquitto, the registry in this loop (or as a process for kill -9), SQLite and
PostgreSQL: while a hostile station sends anything at all, a good station's records are
all stored once and acked, every refused message or record is dead-lettered, and the
registry stays up; when it does die, its retained status says so by the will.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.central.dashboard import Fleet
from agent.central.registry import Registry, Stored, run_registry
from agent.central.store import Batch, RecordStore
from agent.central.store_pg import PostgresStore
from agent.central.store_sqlite import SqliteStore
from agent.contract.validate import RecordError, parse_records
from agent.errors import RegistryStoreError
from agent.testing import Broker, RegistryProcess, mqtt_collect, payload
from tests.support.central import Contract, PgCluster, envelope, record

GOOD_SITE, GOOD = "toda-city-hall-1f", "station-01"
BAD_SITE, BAD = "toda-city-hall-2f", "station-66"
PREFIX = "madoguchi/v1"
POISON: list[bytes] = [
    b"[" * 100_000,
    b"\xff\xfe\x00garbage",
    json.dumps(
        {"schema": "madoguchi.records/1", "site": BAD_SITE, "agent": BAD, "records": "x"}
    ).encode(),
]


def _topic(site: str, agent: str) -> str:
    return f"{PREFIX}/{site}/{agent}/records"


def poison_records() -> list[dict[str, Any]]:
    """The records of the issue: each once made the registry stop storing anything."""
    return [
        {**record(1), "seq": 2**63},
        {**record(2), "seq": 2**70},
        {**record(3), "data": "text"},
        {**record(4), "source": ["x"]},
        {**record(5), "site": "another-site"},
        {**record(6), "id": "not-a-uuid"},
    ]


def _open(kind: str, tmp_path: Path, pg: PgCluster | None) -> RecordStore:
    if kind == "sqlite":
        return SqliteStore(tmp_path / f"registry-{time.monotonic_ns()}.db")
    assert pg is not None
    return PostgresStore(pg.new_database())


@contextlib.asynccontextmanager
async def running(reg: Registry) -> AsyncIterator[asyncio.Task[None]]:
    async with reg:
        task = asyncio.create_task(reg.run(), name="test-registry")
        await asyncio.wait_for(reg.connected.wait(), 10)
        try:
            yield task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Acks:
    """Every ack the registry publishes, per station."""

    def __init__(self) -> None:
        self.ids: dict[str, list[str]] = {}
        self.changed = asyncio.Event()

    async def run(self, client: aiomqtt.Client) -> None:
        await client.subscribe(f"{PREFIX}/+/+/ack", qos=1)
        async for m in client.messages:
            agent = m.topic.value.split("/")[3]
            self.ids.setdefault(agent, []).extend(payload(m)["ids"])
            self.changed.set()

    async def until(self, agent: str, ids: set[str], timeout: float = 20) -> None:
        async def wait() -> None:
            while not ids <= set(self.ids.get(agent, [])):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


def expected_valid_ids(payloads: list[bytes]) -> set[str]:
    out: set[str] = set()
    for p in payloads:
        with contextlib.suppress(RecordError):
            out |= {r["id"] for r in parse_records(p, BAD_SITE, BAD).records}
    return out


def expected_refusals(payloads: list[bytes]) -> int:
    """Dead letters the contract's validator says these messages make."""
    n = 0
    for p in payloads:
        try:
            n += len(parse_records(p, BAD_SITE, BAD).refused)
        except RecordError:
            n += 1
    return n


async def hostile_run(
    broker: Broker, store: RecordStore, hostile: list[bytes], good_count: int = 30
) -> tuple[Registry, Acks, list[dict[str, Any]]]:
    """A good station sends `good_count` records in small messages while a hostile one
    sends `hostile`, interleaved; returns once every good record is acked."""
    good = [record(i) for i in range(1, good_count + 1)]
    acks = Acks()
    reg = Registry("127.0.0.1", broker.port, store, batch_max_messages=16)
    async with (
        running(reg) as task,
        aiomqtt.Client("127.0.0.1", broker.port) as spy,
        aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=200) as stations,
    ):
        listener = asyncio.create_task(acks.run(spy))
        await asyncio.sleep(0.1)  # the spy's subscription is in place
        pending = list(hostile)
        for i in range(0, good_count, 3):
            await stations.publish(
                _topic(GOOD_SITE, GOOD), envelope(GOOD_SITE, GOOD, good[i : i + 3]), qos=1
            )
            for _ in range(max(1, len(hostile) // (good_count // 3))):
                if pending:
                    await stations.publish(_topic(BAD_SITE, BAD), pending.pop(), qos=1)
        for p in pending:
            await stations.publish(_topic(BAD_SITE, BAD), p, qos=1)
        await acks.until(GOOD, {r["id"] for r in good})
        # the registry has read all of the hostile station's messages too: a marker after them
        marker = record(10_000)
        await stations.publish(_topic(BAD_SITE, BAD), envelope(BAD_SITE, BAD, [marker]), qos=1)
        await acks.until(BAD, {marker["id"]})
        assert not task.done(), "the registry stopped"
        listener.cancel()
    return reg, acks, good


@pytest.mark.broker
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_poison_of_the_issue_stops_nothing(
    backend: str, broker: Broker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pg = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None
    store = _open(backend, tmp_path, pg)
    hostile = POISON + [envelope(BAD_SITE, BAD, [r]) for r in poison_records()]
    reg, acks, good = await hostile_run(broker, store, hostile)
    async with store_open(store):
        problems = await store.problems(recent=100)
        assert await store.count() == len(good) + 1  # + the hostile station's valid marker
    assert sorted(acks.ids[GOOD]) == sorted({r["id"] for r in good})  # each acked once
    assert acks.ids[BAD] == [acks.ids[BAD][-1]]  # nothing of the poison acked
    assert problems.dead_letters == reg.dead_letters == len(hostile)
    reasons = {d.reason.split(": ", 1)[-1] for d in problems.recent_dead_letters}
    assert "record seq over 2^63-1" in reasons
    assert "record data is not an object" in reasons
    assert "record without a string source" in reasons
    assert "record site differs from the topic's" in reasons
    assert "JSON nested too deeply" in reasons
    assert all(len(d.payload) <= 1024 for d in problems.recent_dead_letters)
    assert all(d.topic == _topic(BAD_SITE, BAD) for d in problems.recent_dead_letters)


@contextlib.asynccontextmanager
async def store_open(store: RecordStore) -> AsyncIterator[RecordStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELD = st.sampled_from(
    ["id", "seq", "captured_at", "device", "kind", "source", "data", "operator", "site", "x"]
)


@st.composite
def hostile_message(draw: st.DrawFn) -> bytes:
    """Raw bytes, or an envelope whose records have fields replaced by anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    recs = []
    for _ in range(draw(st.integers(1, 3))):
        r = record(draw(st.integers(1, 50)))
        for key, value in draw(st.dictionaries(FIELD, JSON, max_size=2)).items():
            r[key] = value
        if draw(st.booleans()):
            r.pop(draw(FIELD), None)
        recs.append(r)
    return json.dumps(
        {"schema": "madoguchi.records/1", "site": BAD_SITE, "agent": BAD, "records": recs},
        allow_nan=True,
    ).encode()


@pytest.mark.broker
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_hypothesis_stream_of_hostile_records_while_another_station_sends(
    backend: str, broker: Broker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pg = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None

    @settings(
        max_examples=8,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(hostile_message(), min_size=10, max_size=25))
    def check(hostile: list[bytes]) -> None:
        store = _open(backend, tmp_path, pg)

        async def scenario() -> None:
            reg, acks, good = await hostile_run(broker, store, hostile, good_count=15)
            async with store_open(store):
                problems = await store.problems()
                stored = await store.count()
            assert sorted(acks.ids[GOOD]) == sorted(r["id"] for r in good)
            assert problems.dead_letters == reg.dead_letters == expected_refusals(hostile)
            # the hostile station's valid records (if any) were stored and acked, nothing else
            valid = expected_valid_ids(hostile)
            assert set(acks.ids[BAD]) - valid == {acks.ids[BAD][-1]}  # + the marker
            assert valid <= set(acks.ids[BAD])
            assert stored == len(good) + len(valid) + 1

        asyncio.run(scenario())

    check()


class PoisonedStore(SqliteStore):
    """A database that refuses any commit holding one particular record (as SQLite once
    refused a whole commit for one record's `"source": ["x"]`), after a first stall so
    that the messages queue up and share a commit."""

    def __init__(self, path: Path, poison_text: str) -> None:
        super().__init__(path)
        self.poison_text = poison_text
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.calls: list[int] = []

    async def store(self, batches: Sequence[Batch]) -> list[Stored]:
        self.entered.set()
        await self.release.wait()
        self.calls.append(len(batches))
        if any(r["data"].get("text") == self.poison_text for b in batches for r in b.records):
            raise RegistryStoreError("registry.db: datatype mismatch")
        return await super().store(batches)


@pytest.mark.broker
async def test_a_failed_batch_commit_is_retried_per_message_to_isolate_the_poison(
    broker: Broker, tmp_path: Path
) -> None:
    store = PoisonedStore(tmp_path / "registry.db", "poison")
    good = [record(i) for i in (1, 2, 3, 4)]
    bad = record(1, text="poison")
    acks = Acks()
    reg = Registry("127.0.0.1", broker.port, store, batch_max_messages=64)
    async with (
        running(reg) as task,
        aiomqtt.Client("127.0.0.1", broker.port) as spy,
        aiomqtt.Client("127.0.0.1", broker.port) as stations,
    ):
        listener = asyncio.create_task(acks.run(spy))
        await asyncio.sleep(0.1)
        for i, r in enumerate(good):
            await stations.publish(_topic(GOOD_SITE, GOOD), envelope(GOOD_SITE, GOOD, [r]), qos=1)
            if i == 0:  # the first commit stalls with the first record alone
                await asyncio.wait_for(store.entered.wait(), 10)
            if i == 1:
                await stations.publish(_topic(BAD_SITE, BAD), envelope(BAD_SITE, BAD, [bad]), qos=1)
        # behind the stalled first commit: one batch checked and waiting to be picked up
        # (from the second record on), the rest arriving meanwhile in one more; the poison
        # is alone in neither (one of its neighbours is always with it)
        await asyncio.sleep(0.3)
        store.release.set()
        await acks.until(GOOD, {r["id"] for r in good})
        listener.cancel()
        assert not task.done()
        problems = await store.problems()
    assert max(store.calls) > 1  # a shared commit failed, then each message on its own
    assert BAD not in acks.ids
    assert problems.dead_letters == 1
    assert problems.recent_dead_letters[0].reason.startswith("the database refused it")
    assert (problems.recent_dead_letters[0].site, problems.recent_dead_letters[0].agent) == (
        BAD_SITE,
        BAD,
    )


@pytest.mark.broker
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_same_id_other_content_is_a_conflict_alerted_and_acked(
    backend: str,
    broker: Broker,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None
    store = _open(backend, tmp_path, pg)
    first = record(1)
    second = {**first, "data": {"text": "another ticket", "symbology": None}}
    conflicts: list[Stored] = []
    acks = Acks()
    reg = Registry("127.0.0.1", broker.port, store, on_conflict=conflicts.append)
    with caplog.at_level(logging.WARNING, logger="agent.central.registry"):
        async with (
            running(reg),
            aiomqtt.Client("127.0.0.1", broker.port) as spy,
            aiomqtt.Client("127.0.0.1", broker.port) as station,
        ):
            listener = asyncio.create_task(acks.run(spy))
            await asyncio.sleep(0.1)
            topic = _topic(GOOD_SITE, GOOD)
            for body in (first, first, second):
                await station.publish(topic, envelope(GOOD_SITE, GOOD, [body]), qos=1)
                n = len(acks.ids.get(GOOD, []))
                while len(acks.ids.get(GOOD, [])) == n:
                    acks.changed.clear()
                    await asyncio.wait_for(acks.changed.wait(), 10)
            listener.cancel()
            problems = await store.problems()
            fleet = Fleet()
            fleet.on_problems(problems)
            alerts = fleet.registry_alerts(time.time())
            [row] = (await store.agents())[:1]
    assert acks.ids[GOOD] == [first["id"]] * 3  # the conflict is acked: the station stops
    assert (reg.stored_new, reg.duplicates, reg.conflicts) == (1, 1, 1)
    assert [c.record["data"]["text"] for c in conflicts] == ["another ticket"]
    assert problems.conflicts == 1
    assert json.loads(problems.recent_conflicts[0].body)["data"]["text"] == "another ticket"
    assert row.records == 1
    assert any("ALERT conflict" in r.getMessage() for r in caplog.records)
    assert not any("another ticket" in r.getMessage() for r in caplog.records)
    assert [a["type"] for a in alerts] == ["conflicts"]


class Boom(SqliteStore):
    """A bug in the store: not a database error, not anything the registry expects."""

    async def store(self, batches: Sequence[Batch]) -> list[Stored]:
        raise RuntimeError("a bug")


@pytest.mark.broker
async def test_an_unexpected_exception_ends_run_registry_instead_of_a_silent_death(
    broker: Broker, tmp_path: Path
) -> None:
    stop = asyncio.Event()
    body = asyncio.create_task(
        run_registry(
            "127.0.0.1", broker.port, Boom(tmp_path / "r.db"), PREFIX, "reg-boom", stop, quiet=True
        )
    )
    # wait until it is online (its retained status), then send it a record
    while True:
        seen = await mqtt_collect(broker.port, f"{PREFIX}/_registry/reg-boom/status", 0.3)
        if seen and payload(seen[-1])["state"] == "online":
            break
    async with aiomqtt.Client("127.0.0.1", broker.port) as station:
        await station.publish(
            _topic(GOOD_SITE, GOOD), envelope(GOOD_SITE, GOOD, [record(1)]), qos=1
        )
    with pytest.raises(BaseException) as failed:
        await asyncio.wait_for(body, 10)
    assert "a bug" in repr(failed.value)
    assert not stop.is_set()


@pytest.mark.broker
async def test_status_heartbeat_carries_lag_and_a_clean_stop_says_offline(
    broker: Broker, tmp_path: Path
) -> None:
    status = f"{PREFIX}/_registry/reg-beat/status"
    seen: list[dict[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as watcher:
        await watcher.subscribe(status, qos=1)

        async def watch() -> None:
            async for m in watcher.messages:
                seen.append(payload(m))

        w = asyncio.create_task(watch())
        reg = Registry(
            "127.0.0.1", broker.port, tmp_path / "r.db", client_id="reg-beat", heartbeat_s=0.2
        )
        async with running(reg):
            while len(seen) < 3:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        w.cancel()
    online = [s for s in seen if s["state"] == "online"]
    assert len(online) >= 3
    assert {"lag_s", "heartbeat_s", "stored", "dead_letters", "conflicts"} <= set(online[-1])
    assert online[-1]["heartbeat_s"] == 0.2 and online[-1]["lag_s"] == 0.0
    assert seen[-1]["state"] == "offline" and seen[-1]["reason"] == "stopped"
    contract = Contract()
    assert {contract.check(status, b) for b in seen} == {
        "registryStatus/online",
        "registryStatus/offline",
    }
    retained = await mqtt_collect(broker.port, status, 0.5)
    assert [payload(m)["state"] for m in retained] == ["offline"]


@pytest.mark.broker
def test_registry_killed_minus_9_retained_status_offline_by_its_will(
    broker: Broker, tmp_path: Path
) -> None:
    status = f"{PREFIX}/_registry/madoguchi-registry/status"
    proc = RegistryProcess(broker.port, tmp_path / "registry.db", tmp_path / "registry.log")
    proc.start()
    try:
        proc.wait_ready()
        first = asyncio.run(mqtt_collect(broker.port, status, 0.5))
        assert [payload(m)["state"] for m in first] == ["online"]
        session = payload(first[0])["session"]
        fleet = Fleet()
        fleet.on_registry_status("madoguchi-registry", payload(first[0]), time.time())
        assert fleet.registry_alerts(time.time()) == []
        proc.kill9()
        deadline = time.monotonic() + 10
        while True:
            after = asyncio.run(mqtt_collect(broker.port, status, 0.3))
            if after and payload(after[-1])["state"] == "offline":
                break
            assert time.monotonic() < deadline, "no offline will"
        will = payload(after[-1])
        assert Contract().check(status, will) == "registryStatus/offline"
        assert (will["session"], will["reason"]) == (session, "connection lost")
        fleet.on_registry_status("madoguchi-registry", will, time.time())
        [down] = fleet.registry_alerts(time.time())
        assert (down["type"], down["detail"]) == ("registry_down", "connection lost")
        assert oct((tmp_path / "registry.db").stat().st_mode & 0o777) == "0o600"
    finally:
        proc.stop()


class Stalled(SqliteStore):
    """A commit that takes as long as the test says (a slow disk, a long checkpoint)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = asyncio.Event()

    async def store(self, batches: Sequence[Batch]) -> list[Stored]:
        await self.release.wait()
        return await super().store(batches)


@pytest.mark.broker
async def test_the_heartbeat_shows_the_lag_of_a_stalled_commit(
    broker: Broker, tmp_path: Path
) -> None:
    store = Stalled(tmp_path / "r.db")
    status = f"{PREFIX}/_registry/reg-lag/status"
    reg = Registry("127.0.0.1", broker.port, store, client_id="reg-lag", heartbeat_s=0.1)
    lags: list[float] = []
    async with (
        running(reg),
        aiomqtt.Client("127.0.0.1", broker.port) as watcher,
    ):
        await watcher.subscribe(status, qos=1)
        await watcher.publish(
            _topic(GOOD_SITE, GOOD), envelope(GOOD_SITE, GOOD, [record(1)]), qos=1
        )
        async for m in watcher.messages:
            body = payload(m)
            if body["state"] == "online":
                lags.append(body["lag_s"])
            if lags and lags[-1] >= 0.5:
                break
        store.release.set()
        async for m in watcher.messages:
            if payload(m).get("lag_s") == 0.0 and payload(m)["stored"] == 1:
                break
    assert lags[-1] >= 0.5  # stuck on one commit for half a second: the dashboard sees it


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2 MB tmpfs: the registry database on a disk that fills up."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.broker
async def test_a_full_disk_acks_nothing_keeps_running_and_recovers(
    broker: Broker, small_disk: Path
) -> None:
    """ENOSPC: nothing committed, nothing acked, no dead letter for good records, the
    registry alive; once there is room again the re-sent records are stored once."""
    store = SqliteStore(small_disk / "registry.db")
    good = [record(i, text="x" * 2000) for i in range(1, 41)]
    acks = Acks()
    reg = Registry("127.0.0.1", broker.port, store, heartbeat_s=0.2)
    async with (
        running(reg) as task,
        aiomqtt.Client("127.0.0.1", broker.port) as spy,
        aiomqtt.Client("127.0.0.1", broker.port) as station,
    ):
        listener = asyncio.create_task(acks.run(spy))
        await asyncio.sleep(0.1)
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        for r in good:
            await station.publish(_topic(GOOD_SITE, GOOD), envelope(GOOD_SITE, GOOD, [r]), qos=1)
        while reg.store_failures == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert not task.done()
        assert GOOD not in acks.ids or len(acks.ids[GOOD]) < len(good)
        failed_now = set(r["id"] for r in good) - set(acks.ids.get(GOOD, []))
        assert failed_now
        filler.unlink()
        # the station re-sends what was not acked (resend_after_s): every record stored once
        for r in good:
            if r["id"] in failed_now:
                await station.publish(
                    _topic(GOOD_SITE, GOOD), envelope(GOOD_SITE, GOOD, [r]), qos=1
                )
        await acks.until(GOOD, {r["id"] for r in good})
        listener.cancel()
        assert not task.done()
        assert await store.count() == len(good)
        assert (await store.problems()).dead_letters == 0  # a full disk is not a bad record


@pytest.mark.broker
async def test_a_shared_consumer_named_after_its_pid_leaves_no_retained_status(
    broker: Broker, tmp_path: Path
) -> None:
    reg = Registry("127.0.0.1", broker.port, tmp_path / "r.db", shared="grp", heartbeat_s=0.2)
    assert str(os.getpid()) in reg.status_topic
    async with running(reg):
        online = await mqtt_collect(broker.port, reg.status_topic, 0.4)
        assert online and {payload(m)["state"] for m in online} == {"online"}
    # a clean stop: offline said, then the retained status cleared (a restart has a new name)
    assert await mqtt_collect(broker.port, f"{PREFIX}/_registry/+/status", 0.5) == []


@pytest.mark.broker
async def test_a_dead_letter_keeps_no_payload_that_names_a_personal_part(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "registry.db"
    bad = {**record(1), "seq": 2**63, "data": {"personal": {"name": "山田太郎"}}}
    reg = Registry("127.0.0.1", broker.port, db)
    async with running(reg), aiomqtt.Client("127.0.0.1", broker.port) as station:
        await station.publish(_topic(BAD_SITE, BAD), envelope(BAD_SITE, BAD, [bad]), qos=1)
        await station.publish(_topic(BAD_SITE, BAD), b"[" * 100, qos=1)
        while reg.dead_letters < 2:
            await asyncio.sleep(0.05)
        letters = (await reg.store.problems()).recent_dead_letters
    assert [d.payload for d in letters] == [b"[" * 100, b""]
    assert "seq over" in letters[1].reason
    for f in tmp_path.glob("registry.db*"):
        assert "山田太郎".encode() not in f.read_bytes()
