"""The whole path on a real mosquitto: pty scanner -> agent -> broker -> registry -> ack."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

import aiomqtt
import pytest

from agent.config import load_config
from agent.testing import (
    AgentProcess,
    Broker,
    Pty,
    RegistryProbe,
    mqtt_collect,
    payload,
    running_station,
    write_config,
)

# every message the agent and the registry send in these runs must fit docs/asyncapi.yaml
pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("contract_spy")]

ACK, NAK = b"\x06", b"\x15"


async def test_scans_reach_registry_in_order_with_exact_text(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    texts = [f"1111224100000{i:05d}" for i in range(20)] + ["01049123451234591725123110AB\x1d21X"]
    async with running_station(cfg) as run:
        for t in texts:
            pty_port.scan(t)
            assert await pty_port.aread(1) == ACK
        got = await registry.wait_for(len(texts))
        assert [r["data"]["text"] for r in got] == texts
        assert [r["seq"] for r in got] == list(range(1, len(texts) + 1))
        assert len({r["id"] for r in got}) == len(texts)
        r0 = got[0]
        assert r0["device"] == "ticket-scanner" and r0["kind"] == "barcode"
        assert r0["source"] == "device"
        assert r0["captured_at"].endswith("Z")
        assert set(r0["data"]) >= {"text", "symbology", "interpretation"}
        # the agent hears every ack
        for _ in range(100):
            if (await run.station.outbox.stats()).unconfirmed == 0:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert (await run.station.outbox.stats()).confirmed == len(texts)  # type: ignore[union-attr]


async def test_broker_down_acks_continue_then_all_delivered(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    # records that reached the broker while the registry was still reconnecting are
    # re-sent after resend_after_s: that, not the broker, is the guarantee
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 2")
    async with running_station(cfg):
        pty_port.scan("before-1")
        assert await pty_port.aread(1) == ACK
        await registry.wait_for(1)
        broker.stop()  # a clean stop keeps the registry's persistent session
        for i in range(10):  # the outbox is local: the operator still gets an ACK
            pty_port.scan(f"during-{i}")
            assert await pty_port.aread(1) == ACK
            await asyncio.sleep(0.3)
        broker.start()
        got = await registry.wait_for(11, timeout=30)
    assert [r["data"]["text"] for r in got] == ["before-1"] + [f"during-{i}" for i in range(10)]
    assert [r["seq"] for r in got] == list(range(1, 12))


async def test_silent_registry_gets_resends_and_stores_once(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 1")
    seen: list[dict] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as spy:
        await spy.subscribe("madoguchi/v1/+/+/records", qos=1)
        async with running_station(cfg):
            pty_port.scan("111122410000012345")
            assert await pty_port.aread(1) == ACK

            async def collect() -> None:
                async for m in spy.messages:
                    seen.extend(payload(m)["records"])
                    if len(seen) >= 3:
                        return

            await asyncio.wait_for(collect(), 15)
    assert len(seen) >= 3
    assert len({r["id"] for r in seen}) == 1  # the same record, the same id, again
    assert {r["seq"] for r in seen} == {1}
    # now a registry comes: it stores the record once and acks
    from agent.central.store_sqlite import RegistryStore

    store = RegistryStore(tmp_path / "reg.db")
    store.open()
    for r in seen:
        store.store("toda-city-hall-1f", "station-03", [r])
    assert store.count() == 1
    store.close()


async def retained_status(
    port: int, topic: str, state: str, session: int | None = None, timeout: float = 10.0
) -> aiomqtt.Message:
    """The agent's status once it reads `state` (and `session`), seen by a new subscriber.

    A fresh subscription each time, so what is checked is the retained message a
    dashboard opening now would get; an older retained value may come first.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        msgs = await mqtt_collect(port, topic, 0.3)
        for m in msgs:
            body = payload(m)
            last = body
            if m.retain and body["state"] == state and session in (None, body["session"]):
                return m
    raise AssertionError(f"status never became {state} (session {session}); last {last}")


async def test_status_online_offline_and_session(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    topic = "madoguchi/v1/toda-city-hall-1f/station-03/status"
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        agent.start()
        agent.wait_log("connected to 127.0.0.1")
        m = await retained_status(broker.port, topic, "online")
        first = payload(m)
        assert first["devices"]["ticket-scanner"]["state"] in ("connected", "starting")
        assert agent.signal(signal.SIGTERM) == 0
        m = await retained_status(broker.port, topic, "offline")
        assert payload(m) == {**payload(m), "state": "offline", "session": first["session"]}

        agent.start()
        agent.wait_log(f"(session {first['session'] + 1})")
        m = await retained_status(broker.port, topic, "online", session=first["session"] + 1)
        second = payload(m)
        agent.kill9()  # no clean disconnect: the broker publishes the will
        m = await retained_status(broker.port, topic, "offline", session=second["session"])
        assert payload(m) == {"state": "offline", "session": second["session"]}
    finally:
        agent.close()


async def test_kill9_during_burst_loses_nothing_acknowledged(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 2")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    acked: list[str] = []
    try:
        agent.start()
        agent.wait_log("connected to 127.0.0.1")
        await asyncio.to_thread(agent.wait_connected)  # its open() flushes input
        for i in range(60):
            text = f"burst-{i:03d}"
            pty_port.scan(text)
            reply = await pty_port.aread(1, timeout=2)
            if reply == ACK:
                acked.append(text)
            if i == 30:
                agent.kill9()
                break
        assert len(acked) >= 25
        agent.start()
        agent.wait_log("connected to 127.0.0.1")
        agent.wait_connected()  # the port's open() flushes input
        for i in range(5):
            pty_port.scan(f"after-{i}")
            if await pty_port.aread(1) == ACK:
                acked.append(f"after-{i}")
        await registry.wait_for(len(acked), timeout=30)
        await asyncio.sleep(1)
    finally:
        agent.close()
    texts = [r["data"]["text"] for r in registry.new]
    assert set(acked) <= set(texts)
    assert len(texts) == len(set(texts)), "a scan was stored under two ids"
    seqs = sorted(r["seq"] for r in registry.new)
    assert seqs == list(range(1, len(seqs) + 1)), "seq must stay gap-free across kill -9"
    assert len({r["id"] for r in registry.new}) == len(seqs)


async def test_outbox_full_naks_and_keeps_old(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    broker.kill()  # nothing can leave: the outbox fills up
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="max_bytes = 150_000")
    async with running_station(cfg) as run:
        replies = []
        for i in range(400):
            pty_port.scan(f"{i:0>400}")
            replies.append(await pty_port.aread(1))
            if replies[-1] == NAK:
                break
        assert replies[-1] == NAK
        assert all(r == ACK for r in replies[:-1])
        stats = await run.station.outbox.stats()  # type: ignore[union-attr]
        assert stats.unconfirmed == len(replies) - 1
        assert run.station.devices["ticket-scanner"].naks == 1


async def test_corrupt_outbox_at_start_agent_runs(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg_path = write_config(tmp_path, broker.port, scanner=pty_port.link)
    cfg = load_config(cfg_path)
    cfg.outbox_path.parent.mkdir(parents=True)
    cfg.outbox_path.write_bytes(b"\x00garbage" * 1000)
    async with running_station(cfg) as run:
        pty_port.scan("still works")
        assert await pty_port.aread(1) == ACK
        [r] = await registry.wait_for(1)
        assert r["data"]["text"] == "still works"
        assert run.station.outbox.recovered_from is not None  # type: ignore[union-attr]
    assert list(cfg.outbox_path.parent.glob("outbox.db.corrupt-*"))


async def test_commands_answer_on_result_topics(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    base = "madoguchi/v1/toda-city-hall-1f/station-03"
    async with running_station(cfg), aiomqtt.Client("127.0.0.1", broker.port) as dash:
        await dash.subscribe(f"{base}/cmd/+/result", qos=1)
        await dash.subscribe(f"{base}/status", qos=1)

        async def birth() -> None:  # the agent subscribes to cmd/# before its birth
            async for m in dash.messages:
                if m.topic.value.endswith("/status") and payload(m)["state"] == "online":
                    return

        await asyncio.wait_for(birth(), 10)
        for name in ("ping", "rebirth", "resend", "diagnostics", "self-destruct"):
            await dash.publish(f"{base}/cmd/{name}", json.dumps({"request_id": name}), qos=1)
        await dash.publish(f"{base}/cmd/ping", b"{not json", qos=1)
        results: dict[str, dict] = {}
        births = 0

        async def collect() -> None:
            nonlocal births
            async for m in dash.messages:
                body = payload(m)
                if m.topic.value.endswith("/status"):
                    births += body["state"] == "online"
                    continue
                results[body["request_id"] or "bad"] = body
                if len(results) == 6 and births >= 1:
                    return

        await asyncio.wait_for(collect(), 15)
    assert results["ping"]["ok"] and results["ping"]["pong"]
    assert results["rebirth"]["ok"]
    assert results["resend"]["ok"] and "requeued" in results["resend"]
    diag = results["diagnostics"]
    assert diag["ok"] and diag["devices"]["ticket-scanner"]["state"] == "connected"
    assert "outbox" in diag and "aiomqtt" in diag
    assert results["self-destruct"]["ok"] is False
    assert "unknown command" in results["self-destruct"]["error"]
    assert results["bad"]["ok"] is False


async def test_telemetry_carries_the_contract_fields(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    async with running_station(cfg):
        pty_port.scan("x")
        await pty_port.aread(1)
        msgs = await mqtt_collect(
            broker.port, "madoguchi/v1/toda-city-hall-1f/station-03/telemetry", 2.5
        )
    assert msgs
    t = payload(msgs[-1])
    assert {"pending", "unconfirmed", "oldest_unconfirmed_age_s", "db_bytes"} <= set(t["outbox"])
    dev = t["devices"]["ticket-scanner"]
    assert dev["state"] == "connected" and dev["reads"] == 1 and dev["errors"] == 0
    assert t["uptime_s"] >= 0 and t["rss_bytes"] > 1_000_000


def test_registry_gap_detection(tmp_path: Path) -> None:
    from agent.central.store_sqlite import RegistryStore

    s = RegistryStore(tmp_path / "r.db")
    s.open()

    def rec(seq: int) -> dict:
        return {
            "id": f"id-{seq}",
            "seq": seq,
            "captured_at": "2026-11-22T00:00:00.000Z",
            "device": "d",
            "kind": "barcode",
            "source": "device",
            "data": {"text": "t"},
        }

    s.store("site", "a", [rec(1), rec(2), rec(5)])
    assert s.gaps() == [("site", "a", 3, 4)]
    s.store("site", "a", [rec(3)])
    assert s.gaps() == [("site", "a", 4, 4)]
    out = s.store("site", "a", [rec(4), rec(4)])
    assert [o.new for o in out] == [True, False]
    assert s.gaps() == []
    assert s.count() == 5
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("SELECT count(DISTINCT id) FROM records").fetchone() == (5,)
    db.close()
    s.close()
