"""The registry's derived station status (`[station_status]`, issue #19): one
retained message with every station's state, `unreachable` when its broker node died."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.central.registry import run_registry
from agent.central.station_status import StationStatusFeed
from agent.contract.topics import Topics
from agent.testing import LOOPBACK, Broker, Pty, running_station, write_config

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("contract_spy")]

SITE, NAME = "toda-city-hall-1f", "station-03"
ACK = b"\x06"


async def next_state(client: aiomqtt.Client) -> tuple[str, dict[str, Any]]:
    async for m in client.messages:
        assert isinstance(m.payload, bytes)
        body = json.loads(m.payload)
        rows = [r for r in body["stations"] if (r["site"], r["agent"]) == (SITE, NAME)]
        if rows:
            return rows[0]["state"], rows[0]
    raise AssertionError("subscription ended")


async def test_the_registry_publishes_unreachable_for_a_station_whose_node_died(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    """The station's broker node bridges to the central one, where the registry runs with
    its station-status feed; the node is killed with SIGKILL. The feed said `online` while
    the station lived and says `unreachable` within two telemetry intervals plus one of
    its own periods after, though no will ever came. (About 6 s.)"""
    (tmp_path / "node").mkdir()
    node = Broker(
        tmp_path / "node",
        settings="connection to-central\n"
        f"address {LOOPBACK}:{broker.port}\n"
        "topic madoguchi/v1/# out 1\ncleansession true\n",
    )
    node.start()
    interval, period = 1.0, 0.5
    feed = StationStatusFeed(LOOPBACK, broker.port, "test-registry", interval_s=period)
    stop = asyncio.Event()
    registry = asyncio.create_task(
        run_registry(
            LOOPBACK,
            broker.port,
            tmp_path / "registry.db",
            Topics().prefix,
            "test-registry",
            stop,
            quiet=True,
            station_status=feed,
        )
    )
    cfg = write_config(tmp_path, node.port, scanner=pty_port.link, telemetry_interval_s=interval)
    try:
        async with (
            aiomqtt.Client(LOOPBACK, broker.port) as watcher,
            running_station(cfg),
        ):
            await watcher.subscribe(Topics().registry_stations("+"), qos=1)
            while (await asyncio.wait_for(next_state(watcher), 10))[0] != "online":
                pass  # the bridge is up: what the station sends reaches the central broker
            pty_port.scan("111122410000012345")
            assert await pty_port.aread(1) == ACK
            deadline = time.monotonic() + 15
            while (
                feed.stations.get((SITE, NAME)) is None
                or feed.stations[(SITE, NAME)].heard.records is None
            ):  # the registry told the feed of the stored record
                assert time.monotonic() < deadline, "the feed never heard of the record"
                await asyncio.sleep(0.05)
            states = [await asyncio.wait_for(next_state(watcher), 5) for _ in range(4)]
            assert {s for s, _ in states} == {"online"}, states
            node.kill()
            killed = time.monotonic()
            while (got := await asyncio.wait_for(next_state(watcher), 5))[0] == "online":
                assert time.monotonic() - killed < 2 * interval + period, "still online"
            state, row = got
            took = time.monotonic() - killed
            assert state == "unreachable", row
            assert row["silent_s"] >= 1.5 * interval and row["telemetry_interval_s"] == interval
            print(f"registry feed: unreachable {took:.2f} s after the kill")
    finally:
        node.kill()
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(registry, 10)


async def first_message(client: aiomqtt.Client) -> tuple[str, Any]:
    async for m in client.messages:
        assert isinstance(m.payload, bytes)
        return m.topic.value, json.loads(m.payload)
    raise AssertionError("subscription ended")


async def test_madoguchi_registry_publishes_it_with_a_station_status_section(
    broker: Broker, tmp_path: Path
) -> None:
    """central.toml's `[station_status]` is the switch: the real `madoguchi registry`
    process publishes the feed; without the section it does not. (About 4 s.)"""
    import sys

    from agent.testing import LoggedProcess

    base = f'[broker]\nhost = "{LOOPBACK}"\nport = {broker.port}\n[database]\ndsn = "r.db"\n'
    base += "[registry]\nquiet = true\n"
    for section, expect in (("", False), ("[station_status]\ninterval_s = 1\n", True)):
        config = tmp_path / "central.toml"
        config.write_text(base + section)
        proc = LoggedProcess(
            [sys.executable, "-m", "agent", "registry", "--config", str(config)],
            tmp_path / "registry.log",
        )
        proc.start()
        try:
            await asyncio.to_thread(proc.wait_log, "registry consuming", 20, this_run=True)
            async with aiomqtt.Client(LOOPBACK, broker.port) as watcher:
                await watcher.subscribe(Topics().registry_stations("+"), qos=1)
                got: list[Any] = []
                with contextlib.suppress(TimeoutError):
                    got.append(await asyncio.wait_for(first_message(watcher), 2.5))
        finally:
            proc.stop()
        if expect:
            ((topic, body),) = got
            assert topic == Topics().registry_stations("madoguchi-registry")
            assert body["interval_s"] == 1 and body["stations"] == []
        else:
            assert got == []
