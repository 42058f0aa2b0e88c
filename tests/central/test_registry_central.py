"""The registry's MQTT loop on PostgreSQL (and SQLite): exactly once, ack after commit.

Shared consumers, killed consumers, a database down or stalling: every record stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.central.registry import Registry, Stored
from agent.central.store import Batch
from agent.central.store_pg import PostgresStore
from agent.central.store_sqlite import SqliteStore
from agent.errors import RegistryStoreError
from agent.testing import Broker, Pty, RegistryProcess, payload, running_station, write_config
from tests.support.central import PgCluster, envelope, record

SITE, AGENT = "toda-city-hall-1f", "station-03"
ACK = b"\x06"


async def _acks(client: aiomqtt.Client, into: list[list[str]]) -> None:
    async for m in client.messages:
        into.append(payload(m)["ids"])


@pytest.mark.broker
async def test_redelivered_envelope_is_acked_every_time_and_stored_once(
    broker: Broker, pg_dsn: str, pg_cluster: PgCluster
) -> None:
    stored: list[Stored] = []
    recs = [record(i) for i in (1, 2, 3)]
    acks: list[list[str]] = []
    async with (
        Registry("127.0.0.1", broker.port, pg_dsn, on_stored=stored.append) as reg,
        aiomqtt.Client("127.0.0.1", broker.port) as agent,
    ):
        task = asyncio.create_task(reg.run())
        await asyncio.wait_for(reg.connected.wait(), 10)
        await agent.subscribe(f"madoguchi/v1/{SITE}/{AGENT}/ack", qos=1)
        listener = asyncio.create_task(_acks(agent, acks))
        for n in range(1, 6):  # a re-send after each ack: acked again every time
            await agent.publish(
                f"madoguchi/v1/{SITE}/{AGENT}/records", envelope(SITE, AGENT, recs), qos=1
            )
            while len(acks) < n:
                await asyncio.sleep(0.02)
        # a malformed message and a record without an id: neither stored nor acked
        await agent.publish(f"madoguchi/v1/{SITE}/{AGENT}/records", b"{nope", qos=1)
        bad = {**record(9), "id": None}
        await agent.publish(
            f"madoguchi/v1/{SITE}/{AGENT}/records", envelope(SITE, AGENT, [bad]), qos=1
        )
        await agent.publish(
            f"madoguchi/v1/{SITE}/{AGENT}/records", envelope(SITE, AGENT, recs[:1]), qos=1
        )
        while len(acks) < 6:  # in order: the bad ones before it were not acked
            await asyncio.sleep(0.02)
        listener.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    ids = [r["id"] for r in recs]
    assert acks == [ids] * 5 + [ids[:1]]
    assert [s.new for s in stored].count(True) == 3
    assert [s.new for s in stored].count(False) == 13
    assert pg_cluster.query(pg_dsn, "SELECT id FROM records ORDER BY seq") == [(i,) for i in ids]


class CommitThenDie(PostgresStore):
    """A consumer that commits and then never gets to publish its ack (it is killed there)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.committed = asyncio.Event()

    async def store(self, batches: Sequence[Batch]) -> list[Stored]:
        out = await super().store(batches)
        self.committed.set()
        await asyncio.Event().wait()  # the process dies here: between COMMIT and the ack
        return out


@pytest.mark.broker
async def test_consumer_killed_between_commit_and_ack_record_resent_and_stored_once(
    broker: Broker, pg_dsn: str, pg_cluster: PgCluster, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 1")
    acks: list[list[str]] = []
    async with (
        aiomqtt.Client("127.0.0.1", broker.port) as spy,
        running_station(cfg) as run,
    ):
        await spy.subscribe(f"madoguchi/v1/{SITE}/{AGENT}/ack", qos=1)
        listener = asyncio.create_task(_acks(spy, acks))
        dying = CommitThenDie(pg_dsn)
        async with Registry("127.0.0.1", broker.port, dying, shared="registry") as reg1:
            task = asyncio.create_task(reg1.run())
            await asyncio.wait_for(reg1.connected.wait(), 10)
            pty_port.scan("111122410000012345")
            assert await pty_port.aread(1) == ACK
            await asyncio.wait_for(dying.committed.wait(), 20)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        [(rid,)] = pg_cluster.query(pg_dsn, "SELECT id FROM records")
        outbox = run.station.outbox
        assert outbox is not None
        assert (await outbox.stats()).unconfirmed == 1  # stored centrally, never acked
        assert acks == []

        stored: list[Stored] = []
        async with Registry(
            "127.0.0.1", broker.port, pg_dsn, shared="registry", on_stored=stored.append
        ) as reg2:
            task = asyncio.create_task(reg2.run())
            while (await outbox.stats()).unconfirmed:
                await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        listener.cancel()
    assert stored and all(s.record["id"] == rid and not s.new for s in stored)
    assert [rid] in acks
    assert pg_cluster.query(pg_dsn, "SELECT count(*) FROM records") == [(1,)]


@pytest.mark.broker
async def test_store_failure_is_never_acked(broker: Broker, tmp_path: Path) -> None:
    class FailsOnce(SqliteStore):
        calls = 0

        async def store(self, batches: Sequence[Batch]) -> list[Stored]:
            self.calls += 1
            if self.calls == 1:
                raise RegistryStoreError("disk full")
            return await super().store(batches)

    acks: list[list[str]] = []
    r1, r2 = record(1), record(2)
    topic = f"madoguchi/v1/{SITE}/{AGENT}/records"
    async with (
        Registry(
            "127.0.0.1", broker.port, FailsOnce(tmp_path / "r.db"), batch_max_messages=1
        ) as reg,
        aiomqtt.Client("127.0.0.1", broker.port) as agent,
    ):
        task = asyncio.create_task(reg.run())
        await asyncio.wait_for(reg.connected.wait(), 10)
        await agent.subscribe(f"madoguchi/v1/{SITE}/{AGENT}/ack", qos=1)
        listener = asyncio.create_task(_acks(agent, acks))
        await agent.publish(topic, envelope(SITE, AGENT, [r1]), qos=1)
        await agent.publish(topic, envelope(SITE, AGENT, [r2]), qos=1)
        while not acks:  # acks come in order: one for r1 would be here first
            await asyncio.sleep(0.02)
        listener.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await reg.store.count() == 1
    assert acks == [[r2["id"]]]


@pytest.mark.broker
@pytest.mark.slow
async def test_three_shared_consumers_one_killed_mid_stream_every_record_once(
    broker: Broker, pg_dsn: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    consumers = [
        RegistryProcess(broker.port, pg_dsn, tmp_path / f"registry-{i}.log", "--shared", "registry")
        for i in range(3)
    ]
    stations = ["station-01", "station-02", "station-03"]
    ptys = [Pty(tmp_path / f"tty-{n}") for n in stations]
    per_station = 60
    try:
        for c in consumers:
            c.start()
        for c in consumers:
            await asyncio.to_thread(c.wait_log, "registry consuming")
        cfgs = [
            write_config(tmp_path, broker.port, scanner=p.link, outbox="resend_after_s = 2", name=n)
            for p, n in zip(ptys, stations, strict=True)
        ]
        async with contextlib.AsyncExitStack() as stack:
            runs = [await stack.enter_async_context(running_station(c)) for c in cfgs]
            killed = asyncio.Event()

            async def feed(p: Pty, name: str) -> None:
                for i in range(per_station):
                    if i == per_station * 2 // 3:
                        await killed.wait()  # the last third goes to the two survivors
                    p.scan(f"{name}-{i:04d}")
                    assert await p.aread(1) == ACK

            async def kill_one() -> None:
                # mid-stream: the victim has stored some records and more keep coming
                await asyncio.to_thread(consumers[1].wait_log, "stored ", 60, 5)
                consumers[1].kill9()
                killed.set()

            await asyncio.gather(
                kill_one(), *(feed(p, n) for p, n in zip(ptys, stations, strict=True))
            )
            total = per_station * len(stations)
            for run in runs:
                outbox = run.station.outbox
                assert outbox is not None
                while (await outbox.stats()).unconfirmed:
                    await asyncio.sleep(0.1)
                assert (await outbox.stats()).confirmed == per_station
    finally:
        for c in consumers:
            c.stop()
        for p in ptys:
            p.close()
    assert pg_cluster.query(pg_dsn, "SELECT count(*), count(DISTINCT id) FROM records") == [
        (total, total)
    ]
    for name in stations:
        rows = pg_cluster.query(
            pg_dsn,
            "SELECT seq, body->'data'->>'text' FROM records WHERE agent = %s ORDER BY seq",
            (name,),
        )
        assert rows == [(i + 1, f"{name}-{i:04d}") for i in range(per_station)]
    assert pg_cluster.query(pg_dsn, "SELECT count(*) FROM gaps") == [(0,)]
    stored_by = [c.text().count("stored ") for c in consumers]
    assert all(n > 0 for n in stored_by), stored_by  # all three took a share
    assert sum(stored_by) <= total  # no record was new to two consumers


@pytest.mark.broker
async def test_shared_consumer_killed_inside_its_transaction_record_resent_and_stored_once(
    broker: Broker, pg_dsn: str, pg_cluster: PgCluster, pty_port: Pty, tmp_path: Path
) -> None:
    import psycopg

    consumers = [
        RegistryProcess(broker.port, pg_dsn, tmp_path / f"registry-{i}.log", "--shared", "g")
        for i in range(3)
    ]
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 1")
    try:
        for c in consumers:
            c.start()
        for c in consumers:
            await asyncio.to_thread(c.wait_log, "registry consuming")
        # hold the agent's row: whichever consumer gets the record blocks in its transaction
        holder = await psycopg.AsyncConnection.connect(pg_dsn)
        await holder.execute("INSERT INTO agents (site, agent) VALUES (%s, %s)", (SITE, AGENT))
        await holder.commit()
        await holder.execute(
            "SELECT 1 FROM agents WHERE site = %s AND agent = %s FOR UPDATE", (SITE, AGENT)
        )
        async with running_station(cfg) as run:
            pty_port.scan("111122410000012345")
            assert await pty_port.aread(1) == ACK
            victim_pid = None
            # pg_stat_activity is a snapshot per transaction: look from outside the holder's
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as look:
                while victim_pid is None:
                    cur = await look.execute(
                        "SELECT application_name FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND application_name LIKE 'madoguchi-%'"
                    )
                    row = await cur.fetchone()
                    victim_pid = None if row is None else int(row[0].rsplit("-", 1)[1])
                    await asyncio.sleep(0.05)
            [victim] = [c for c in consumers if c.proc is not None and c.proc.pid == victim_pid]
            victim.kill9()  # received, inside its transaction, not committed, not acked
            await holder.rollback()
            await holder.close()
            outbox = run.station.outbox
            assert outbox is not None
            while (await outbox.stats()).unconfirmed:
                await asyncio.sleep(0.05)
    finally:
        for c in consumers:
            c.stop()
    assert "stored " not in victim.text()
    assert sum(c.text().count("stored ") for c in consumers) == 1
    rows = pg_cluster.query(pg_dsn, "SELECT seq, body->'data'->>'text' FROM records")
    assert rows == [(1, "111122410000012345")]


@pytest.mark.broker
async def test_a_gap_left_open_past_the_timeout_raises_one_alert(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alerts: asyncio.Queue[Any] = asyncio.Queue()
    topic = f"madoguchi/v1/{SITE}/{AGENT}/records"
    async with (
        Registry(
            "127.0.0.1",
            broker.port,
            tmp_path / "r.db",
            gap_timeout_s=0.5,
            on_alert=alerts.put_nowait,
        ) as reg,
        aiomqtt.Client("127.0.0.1", broker.port) as agent,
    ):
        task = asyncio.create_task(reg.run())
        await asyncio.wait_for(reg.connected.wait(), 10)
        await agent.publish(topic, envelope(SITE, AGENT, [record(1), record(3)]), qos=1)
        gap = await asyncio.wait_for(alerts.get(), 20)
        assert (gap.site, gap.agent, gap.first, gap.last) == (SITE, AGENT, 2, 2)
        # the record comes after all: the gap closes, and no second alert was raised
        await agent.publish(topic, envelope(SITE, AGENT, [record(2)]), qos=1)
        while await reg.store.open_gaps():
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert alerts.empty() and len(reg.alerts) == 1
    assert "ALERT seq gap open" in caplog.text


@pytest.mark.broker
@pytest.mark.slow
async def test_database_down_nothing_acked_then_everything_stored_once(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cluster = PgCluster()  # its own: this test stops the server
    cluster.start()
    try:
        dsn = cluster.new_database()
        cfg = write_config(
            tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 1"
        )
        stored: list[Stored] = []
        async with (
            Registry("127.0.0.1", broker.port, dsn, on_stored=stored.append) as reg,
            running_station(cfg) as run,
        ):
            task = asyncio.create_task(reg.run())
            await asyncio.wait_for(reg.connected.wait(), 10)
            outbox = run.station.outbox
            assert outbox is not None
            pty_port.scan("before")
            assert await pty_port.aread(1) == ACK
            while (await outbox.stats()).unconfirmed:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(cluster.stop_server)
            for text in ("during-1", "during-2"):
                pty_port.scan(text)  # the station still takes scans: its outbox is local
                assert await pty_port.aread(1) == ACK
            commits = reg.commits
            while reg.store_failures < 2:  # both reached the registry; its store failed
                await asyncio.sleep(0.05)
            assert reg.commits == commits and reg.stored_new == 1
            assert (await outbox.stats()).unconfirmed == 2  # and nothing was acked
            await asyncio.to_thread(cluster.start_server)
            while (await outbox.stats()).unconfirmed:  # re-sent, stored, acked
                await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        rows = cluster.query(dsn, "SELECT seq, body->'data'->>'text' FROM records ORDER BY seq")
        assert rows == [(1, "before"), (2, "during-1"), (3, "during-2")]
        assert [s.record["data"]["text"] for s in stored if s.new] == [t for _, t in rows]
    finally:
        cluster.stop()


class HeldStore(SqliteStore):
    """A database that stalls (a long checkpoint, a slow disk) until released."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = asyncio.Event()

    async def store(self, batches: Sequence[Batch]) -> list[Stored]:
        await self.release.wait()
        return await super().store(batches)


@pytest.mark.broker
@pytest.mark.slow
async def test_a_burst_while_the_database_stalls_is_queued_not_dropped(
    broker: Broker, tmp_path: Path
) -> None:
    """Paho has PUBACKed every message the registry holds: dropping one loses it for good
    from a publisher that does not re-send (and delays an agent by resend_after_s)."""
    n = 12_000  # more than the 10,000-message queue the registry once had
    store = HeldStore(tmp_path / "registry.db")
    new: list[Stored] = []
    async with (
        Registry("127.0.0.1", broker.port, store, on_stored=new.append) as reg,
        aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=500) as agent,
    ):
        task = asyncio.create_task(reg.run())
        await asyncio.wait_for(reg.connected.wait(), 10)
        topic = f"madoguchi/v1/{SITE}/{AGENT}/records"
        for start in range(1, n + 1, 500):
            await asyncio.gather(
                *(
                    agent.publish(topic, envelope(SITE, AGENT, [record(seq)]), qos=1)
                    for seq in range(start, min(n + 1, start + 500))
                )
            )
        store.release.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                while len(new) < n:
                    await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sorted(s.record["seq"] for s in new) == list(range(1, n + 1))
    assert all(s.new for s in new)
