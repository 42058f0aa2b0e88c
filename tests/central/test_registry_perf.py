"""The registry's per-message insert (one executemany per message) and its bounded acks
(issue #18): the same answers as one INSERT per record, and no ack a station drops."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.central import registry as registry_module
from agent.central.registry import Registry
from agent.central.store import Batch
from agent.central.store_sqlite import RegistryStore
from agent.testing import Broker
from tests.support.central import envelope, record

SITE, AGENT = "toda-city-hall-1f", "station-01"


def test_one_message_with_an_id_twice_is_one_new_and_one_duplicate(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path / "registry.db")
    store.open()
    try:
        r = record(1)
        other = {**record(2), "id": r["id"], "seq": 2}
        got = store.store_many([Batch(SITE, AGENT, [r, r, record(3), other])])
        assert [(s.new, s.conflict) for s in got] == [
            (True, False),
            (False, False),
            (True, False),
            (False, True),
        ]
        again = store.store_many([Batch(SITE, AGENT, [r])])
        assert [(s.new, s.conflict) for s in again] == [(False, False)]
        assert store.count() == 2
    finally:
        store.close()


_text = st.text(max_size=30)
# the columns hold what agent/contract/validate.py lets through (no control characters);
# `data` may hold anything
_name = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fields=st.lists(
        st.tuples(_name, _name, st.sampled_from(["", "device", "manual\u3042"]), _text),
        min_size=1,
        max_size=6,
    )
)
def test_hostile_text_is_stored_as_it_was_parsed(
    tmp_path: Path, fields: list[tuple[str, str, str, str]]
) -> None:
    """Quotes, backslashes, control characters, any Unicode: each body reads back as the
    record, the columns are the record's fields, source '' stored as 'device' as before."""
    records: list[dict[str, Any]] = []
    for i, (device, kind, source, text) in enumerate(fields, 1):
        records.append(
            {**record(i, text=text), "device": device or "d", "kind": kind or "k", "source": source}
        )
    path = tmp_path / f"r-{uuid.uuid4()}.db"
    store = RegistryStore(path)
    store.open()
    try:
        got = store.store_many([Batch(SITE, AGENT, records)])
        assert all(s.new for s in got)
        rows = store.db.execute(
            "SELECT id, seq, device, kind, source, body FROM records ORDER BY seq"
        ).fetchall()
    finally:
        store.close()
    assert len(rows) == len(records)
    for (rid, seq, device, kind, source, body), r in zip(rows, records, strict=True):
        assert (rid, seq, device, kind) == (r["id"], r["seq"], r["device"], r["kind"])
        assert source == (r["source"] or "device")
        assert json.loads(body) == r


@pytest.mark.broker
async def test_a_commit_of_many_ids_is_acked_in_bounded_acks(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "ACK_MAX_IDS", 3)
    records = [record(i) for i in range(1, 11)]
    acks: list[list[str]] = []
    done = asyncio.Event()
    reg = Registry("127.0.0.1", broker.port, tmp_path / "registry.db")
    async with reg:
        task = asyncio.create_task(reg.run(), name="test-registry")
        try:
            await asyncio.wait_for(reg.connected.wait(), 10)
            async with (
                aiomqtt.Client("127.0.0.1", broker.port) as spy,
                aiomqtt.Client("127.0.0.1", broker.port) as station,
            ):
                await spy.subscribe(f"madoguchi/v1/{SITE}/{AGENT}/ack", qos=1)

                async def listen() -> None:
                    async for m in spy.messages:
                        acks.append(json.loads(m.payload)["ids"])  # type: ignore[arg-type]
                        if sum(map(len, acks)) >= len(records):
                            done.set()

                listener = asyncio.create_task(listen(), name="test-ack-listener")
                topic = f"madoguchi/v1/{SITE}/{AGENT}/records"
                await station.publish(topic, envelope(SITE, AGENT, records), qos=1)
                await asyncio.wait_for(done.wait(), 10)
                listener.cancel()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert [len(a) for a in acks] == [3, 3, 3, 1]
    assert [i for a in acks for i in a] == [r["id"] for r in records]


@pytest.mark.broker
async def test_a_commit_acking_many_stations_logs_no_warning(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Live scans from 40 stations queued for the registry while it was away: a commit
    acks all of them at once. aiomqtt's default warned "There are N pending publish
    calls." for every ack past the tenth: a registry log full of warnings under load."""
    agents = [f"station-{i:02d}" for i in range(40)]
    db = tmp_path / "registry.db"

    async def run_registry(until: asyncio.Event | None) -> None:
        reg = Registry("127.0.0.1", broker.port, db, client_id="reg-fanout")
        async with reg:
            task = asyncio.create_task(reg.run(), name="test-registry")
            try:
                await asyncio.wait_for(reg.connected.wait(), 10)
                if until is not None:
                    await asyncio.wait_for(until.wait(), 20)
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

    await run_registry(None)  # its persistent session now queues records for it
    acked: set[str] = set()
    done = asyncio.Event()
    async with aiomqtt.Client("127.0.0.1", broker.port) as fleet:
        await fleet.subscribe(f"madoguchi/v1/{SITE}/+/ack", qos=1)
        for i, agent in enumerate(agents):
            topic = f"madoguchi/v1/{SITE}/{agent}/records"
            await fleet.publish(topic, envelope(SITE, agent, [record(i + 1)]), qos=1)

        async def listen() -> None:
            async for m in fleet.messages:
                acked.add(str(m.topic).split("/")[3])
                if len(acked) == len(agents):
                    done.set()

        listener = asyncio.create_task(listen(), name="test-ack-listener")
        with caplog.at_level(logging.WARNING):
            await run_registry(done)
        listener.cancel()
    assert acked == set(agents)
    assert not [r.getMessage() for r in caplog.records if "pending" in r.getMessage()]


@pytest.mark.broker
async def test_a_broker_frozen_before_confirming_the_acks_is_a_lost_connection(
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The acks of a commit wait without timers of their own and share one deadline: a
    broker that freezes after the commit must still end in a reconnect (as aiomqtt's own
    per-publish timeout did), not in a registry stuck waiting or crashed; the record
    stays stored and is acked when the station sends it again (its PUBACK, written
    after the commit, reaches the broker when it wakes: it is not handed over again)."""
    monkeypatch.setattr(registry_module, "ACK_DEADLINE_S", 1.0)
    assert broker.proc is not None
    pid = broker.proc.pid
    reg = Registry("127.0.0.1", broker.port, tmp_path / "registry.db", client_id="reg-frozen")
    real_store = reg.store.store
    froze = asyncio.Event()

    async def store_then_freeze(batches: list[Batch]) -> Any:
        stored = await real_store(batches)
        if not froze.is_set():
            os.kill(pid, signal.SIGSTOP)  # committed; the ack's PUBACK will not come
            froze.set()
        return stored

    monkeypatch.setattr(reg.store, "store", store_then_freeze)
    r = record(1)
    topic = f"madoguchi/v1/{SITE}/{AGENT}/records"
    with caplog.at_level(logging.WARNING):
        async with reg:
            task = asyncio.create_task(reg.run(), name="test-registry")
            try:
                await asyncio.wait_for(reg.connected.wait(), 10)
                async with aiomqtt.Client("127.0.0.1", broker.port) as station:
                    await station.subscribe(f"madoguchi/v1/{SITE}/{AGENT}/ack", qos=1)
                    await station.publish(topic, envelope(SITE, AGENT, [r]), qos=1)
                    await asyncio.wait_for(froze.wait(), 10)
                    # past the deadline (1 s) the registry leaves the frozen broker
                    async with asyncio.timeout(20):
                        while reg.connected.is_set():
                            await asyncio.sleep(0.1)
                    assert not task.done()
                    os.kill(pid, signal.SIGCONT)
                await asyncio.wait_for(reg.connected.wait(), 20)
                async with aiomqtt.Client("127.0.0.1", broker.port) as station:
                    await station.subscribe(f"madoguchi/v1/{SITE}/{AGENT}/ack", qos=1)
                    await station.publish(topic, envelope(SITE, AGENT, [r]), qos=1)
                    async with asyncio.timeout(10):
                        async for m in station.messages:
                            assert json.loads(m.payload)["ids"] == [r["id"]]  # type: ignore[arg-type]
                            break
            finally:
                os.kill(pid, signal.SIGCONT)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
    assert reg.stored_new == 1 and reg.duplicates == 1
    assert any("confirmed no ack" in rec.getMessage() for rec in caplog.records)


def _state(store: RegistryStore) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    db = store.db
    return (
        db.execute("SELECT id, site, agent, seq, body FROM records ORDER BY id").fetchall(),
        db.execute("SELECT site, agent, first, last FROM gaps ORDER BY 1, 2, 3").fetchall(),
        db.execute("SELECT site, agent, max_seq, records FROM agents ORDER BY 1, 2").fetchall(),
        db.execute("SELECT record_id FROM conflicts ORDER BY 1").fetchall(),
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    commits=st.lists(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(1, 12), st.booleans()), min_size=1, max_size=8
        ),
        min_size=1,
        max_size=5,
    )
)
def test_a_commit_of_many_stations_answers_as_each_message_alone(
    tmp_path: Path, commits: list[list[tuple[int, int, bool]]]
) -> None:
    """One-record messages from many stations go in with one `executemany` for the whole
    commit, and skip the gaps query when every seq is above the station's highest: the
    answers (new, duplicate, conflict), gaps, agents and conflicts are those of storing
    each message on its own. Messages: (station, seq, same content as before or not);
    a station's seq reused is a re-send of that record, with other content a conflict."""
    ids: dict[tuple[int, int], str] = {}
    one, alone = (RegistryStore(tmp_path / f"{k}-{uuid.uuid4()}.db") for k in ("one", "alone"))
    one.open()
    alone.open()
    try:
        for commit in commits:
            batches = []
            for station, seq, same in commit:
                rid = ids.setdefault((station, seq), str(uuid.uuid4()))
                r = {**record(seq, text="a" if same else f"other-{seq}"), "id": rid}
                batches.append(Batch(SITE, f"station-{station}", [r]))
            together = one.store_many(batches)
            each = [s for b in batches for s in alone.store_many([b])]
            key = sorted((s.agent, s.record["id"], s.new, s.conflict) for s in together)
            assert key == sorted((s.agent, s.record["id"], s.new, s.conflict) for s in each)
            assert _state(one)[:2] == _state(alone)[:2]
            assert _state(one)[2:] == _state(alone)[2:]
    finally:
        one.close()
        alone.close()
