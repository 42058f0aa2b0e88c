"""The agent under a notify socket: READY after start, watchdog pings, STATUS with the
outbox depth, STOPPING on SIGTERM; and clock_synced on every record."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.station import clock
from agent.station.app import StationApp
from agent.testing import AgentProcess, Broker, Pty, RegistryProbe, running_station, write_config
from tests.support.notify import Manager

pytestmark = pytest.mark.broker
ACK = b"\x06"


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    m = Manager(abstract=True)
    monkeypatch.setenv("NOTIFY_SOCKET", m.env_name)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield m
    m.close()


async def test_agent_process_notifies_systemd(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path, manager: Manager
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        before_ready = await manager.until("READY=1")
        ready = before_ready[-1].splitlines()
        assert ready[0] == "READY=1"
        assert ready[1].startswith("STATUS=outbox 0 unconfirmed (0 unsent)")
        pings = [m for m in await manager.until("WATCHDOG=1") if m == "WATCHDOG=1"]
        assert pings == ["WATCHDOG=1"]
        await asyncio.to_thread(agent.wait_connected)  # the port's open() flushes input
        pty_port.scan("111122410000012345")
        assert await pty_port.aread(1) == ACK
        (record,) = await registry.wait_for(1)
        # The same kernel state the agent read (stable here: nobody syncs the test clock).
        assert record["clock_synced"] is clock.clock_synced()
        code = await asyncio.to_thread(agent.signal, signal.SIGTERM)
        assert code == 0
        after = manager.drain()
    finally:
        agent.close()
    assert "STOPPING=1" in after


async def test_status_shows_the_outbox_depth(
    broker: Broker, pty_port: Pty, tmp_path: Path, manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No registry: records stay unconfirmed and STATUS says how many."""
    monkeypatch.setattr(StationApp, "status_interval_s", 0.1)
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    async with running_station(cfg):
        await manager.until("READY=1")
        for i in range(3):
            pty_port.scan(f"11112241000001234{i}")
            assert await pty_port.aread(1) == ACK

        async def three_waiting() -> str:
            while True:
                line = (await manager.until("STATUS="))[-1]
                if line.startswith("STATUS=outbox 3 unconfirmed"):
                    return line

        line = await asyncio.wait_for(three_waiting(), 20)
        assert "uplink connected" in line
        assert "devices 1/1 connected" in line
