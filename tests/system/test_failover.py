"""Stations that fail over (issue #19): several brokers in `[mqtt] hosts`, a name with
several addresses, persistent sessions. Real mosquittos, the real registry, a real station."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from agent.contract.messages import Ack
from agent.contract.topics import Topics
from agent.testing import (
    LOOPBACK,
    Broker,
    Pty,
    StaticResolver,
    running_registry,
    running_station,
    with_brokers,
    write_config,
)

pytestmark = [pytest.mark.broker]

ACK = b"\x06"
SITE, NAME = "toda-city-hall-1f", "station-03"


async def until(what: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


def started(directory: Path) -> Broker:
    directory.mkdir()
    b = Broker(directory)
    b.start()
    return b


async def test_kill9_of_the_connected_broker_fails_over_and_stores_once(
    pty_port: Pty, tmp_path: Path
) -> None:
    """Two mosquittos, one registry watching each, one SQLite store between them; the
    station's broker is killed with SIGKILL: every scan reaches the store once, the station
    moves to the other broker and every record ends confirmed. (About 5 s.)"""
    b1, b2 = started(tmp_path / "b1"), started(tmp_path / "b2")
    db = tmp_path / "registry.db"
    cfg = with_brokers(
        write_config(tmp_path, b1.port, scanner=pty_port.link, outbox="resend_after_s = 2"),
        [f"{LOOPBACK}:{b1.port}", f"{LOOPBACK}:{b2.port}"],
    )
    try:
        async with (
            running_registry(b1.port, db, client_id="registry-b1") as r1,
            running_registry(b2.port, db, client_id="registry-b2") as r2,
            running_station(cfg) as run,
        ):
            uplink = run.station.uplink
            assert uplink is not None
            outbox = run.station.outbox
            assert outbox is not None
            for i in range(5):
                pty_port.scan(f"before-{i}")
                assert await pty_port.aread(1) == ACK
            await until(lambda: len(r1.new) == 5)
            assert uplink.describe()["broker"] == f"{LOOPBACK}:{b1.port}"
            b1.kill()  # SIGKILL: no will, no goodbye, acks in flight lost
            killed = time.monotonic()
            await until(lambda: uplink.describe()["broker"] == f"{LOOPBACK}:{b2.port}")
            print(f"on the other broker {time.monotonic() - killed:.3f} s after the kill")
            for i in range(5):
                pty_port.scan(f"after-{i}")
                assert await pty_port.aread(1) == ACK
            await until(lambda: len(r1.new) + len(r2.new) == 10)

            async def confirmed() -> int:
                return (await outbox.stats()).confirmed

            deadline = time.monotonic() + 20
            while await confirmed() < 10 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await confirmed() == 10
            telemetry = await uplink.telemetry()
            assert telemetry["uplink"]["broker"] == f"{LOOPBACK}:{b2.port}"
            assert telemetry["uplink"]["connected"] is True
            stored = r1.new + r2.new
            assert sorted(r["data"]["text"] for r in stored) == sorted(
                [f"before-{i}" for i in range(5)] + [f"after-{i}" for i in range(5)]
            )
            assert len({r["id"] for r in stored}) == 10  # none stored twice
            assert sorted(r["seq"] for r in stored) == list(range(1, 11))
            assert [r["data"]["text"] for r in r2.new] == [f"after-{i}" for i in range(5)]
    finally:
        b1.kill()
        b2.kill()


async def test_a_name_with_several_addresses_is_tried_address_by_address(
    broker: Broker, pty_port: Pty, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`broker.city.test` has two addresses, the first with nothing listening: the station
    goes on to the second without waiting for the backoff, and says where it is."""
    resolver = StaticResolver({"broker.city.test": ["127.0.0.2", LOOPBACK]})
    monkeypatch.setattr("agent.station.uplink.resolve_addresses", resolver)
    cfg = with_brokers(
        write_config(tmp_path, broker.port, scanner=pty_port.link, mqtt="backoff_max_s = 30"),
        [f"broker.city.test:{broker.port}"],
    )
    async with running_station(cfg) as run:
        uplink = run.station.uplink
        assert uplink is not None
        await until(lambda: uplink.connected, timeout=5)
        state = uplink.describe()
        assert state["broker"] == f"broker.city.test:{broker.port}"
        assert state["broker_address"] == LOOPBACK
        # the first attempt went to 127.0.0.2 and failed (unless it was the lucky one)
        assert resolver.asked[0] == "broker.city.test"
        assert state["connect_failures"] == 1, state


async def _records_ids(client: aiomqtt.Client) -> list[str]:
    async for m in client.messages:
        assert isinstance(m.payload, bytes)
        return [r["id"] for r in json.loads(m.payload)["records"]]
    raise AssertionError("no records")


@pytest.mark.parametrize(
    ("protocol", "persistent"), [("3.1.1", True), ("5", True), ("3.1.1", False)]
)
async def test_a_persistent_session_gets_the_acks_sent_while_away(
    broker: Broker, pty_port: Pty, tmp_path: Path, protocol: str, persistent: bool
) -> None:
    """The registry (here a plain client that acks once) acks while the station is away:
    with a persistent session the broker keeps that ack and the station confirms at
    reconnect without the registry's help; with a clean session the ack is gone and the
    station has to send the records again. (About 3 s each.)"""
    extra = f'protocol = "{protocol}"\npersistent_session = {str(persistent).lower()}\n'
    cfg = with_brokers(
        write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 60"),
        [f"{LOOPBACK}:{broker.port}"],
        extra,
    )
    topics = Topics().station(SITE, NAME)
    async with aiomqtt.Client(LOOPBACK, broker.port) as registry:
        await registry.subscribe(topics.records, qos=1)
        async with running_station(cfg) as run:
            for i in range(3):
                pty_port.scan(f"scan-{i}")
                assert await pty_port.aread(1) == ACK
            ids: list[str] = []
            while len(ids) < 3:
                ids += await asyncio.wait_for(_records_ids(registry), 10)
        # the station is away: the registry's ack goes to the broker
        await registry.publish(topics.ack, Ack(ids).encode(), qos=1)
        async with running_station(cfg) as run:
            outbox = run.station.outbox
            assert outbox is not None
            if persistent:
                deadline = time.monotonic() + 10
                while (await outbox.stats()).confirmed < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert (await outbox.stats()).confirmed == 3
            else:
                # at reconnect the records go again; a queued ack would have come first
                resent: list[str] = []
                while len(resent) < 3:
                    resent += await asyncio.wait_for(_records_ids(registry), 10)
                assert sorted(resent) == sorted(ids)
                with contextlib.suppress(TimeoutError):
                    await asyncio.sleep(0.5)
                assert (await outbox.stats()).confirmed == 0
