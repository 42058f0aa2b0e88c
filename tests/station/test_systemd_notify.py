"""sd_notify against a real unix datagram socket, as systemd's manager would hold it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.station.systemd import Notifier, watchdog_interval
from tests.support.notify import Manager


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest) -> Iterator[Manager]:
    m = Manager(abstract=request.param == "abstract")
    yield m
    m.close()


def env(m: Manager, watchdog_usec: int | None = None, pid: int | None = None) -> dict[str, str]:
    e = {"NOTIFY_SOCKET": m.env_name}
    if watchdog_usec is not None:
        e["WATCHDOG_USEC"] = str(watchdog_usec)
        e["WATCHDOG_PID"] = str(os.getpid() if pid is None else pid)
    return e


def test_ready_status_stopping_arrive_as_datagrams(manager: Manager) -> None:
    n = Notifier(env(manager))
    assert n.enabled
    assert n.ready("outbox 0 pending\n2 devices")
    assert n.status("outbox 12 pending")
    assert n.stopping()
    got = manager.drain()
    n.close()
    assert got == [
        "READY=1\nSTATUS=outbox 0 pending 2 devices",
        "STATUS=outbox 12 pending",
        "STOPPING=1",
    ]


async def test_noop_without_notify_socket() -> None:
    n = Notifier({"WATCHDOG_USEC": "100000"})
    assert not n.enabled
    assert not n.ready("x")
    assert not n.status("y")
    assert not n.stopping()
    # Returns at once instead of running forever.
    await asyncio.wait_for(n.watchdog_loop(), timeout=5)
    assert n.sent == 0


def test_send_to_a_missing_socket_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.ready() is False
    assert n.sent == 0


def test_watchdog_interval_is_half_and_only_for_our_pid() -> None:
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_at_half_the_timeout(manager: Manager) -> None:
    usec = 400_000  # pings every 0.2 s
    n = Notifier(env(manager, usec))
    assert n.interval == 0.2
    task = asyncio.create_task(n.watchdog_loop())
    try:
        assert await manager.recv() == "WATCHDOG=1"
        start = time.monotonic()
        await asyncio.sleep(2.0)
        window = time.monotonic() - start
        pings = manager.drain()
    finally:
        task.cancel()
        n.close()
    assert set(pings) == {"WATCHDOG=1"}
    # Never faster than one ping per interval (+1 for the edge of the window) ...
    assert len(pings) <= window / 0.2 + 1
    # ... and on average at least one per WATCHDOG_USEC, or systemd would kill us.
    assert len(pings) >= window / 0.4


async def test_no_ping_while_the_loop_is_blocked(manager: Manager) -> None:
    n = Notifier(env(manager, 100_000))  # pings every 0.05 s
    task = asyncio.create_task(n.watchdog_loop())
    try:
        assert await manager.recv() == "WATCHDOG=1"
        manager.drain()
        time.sleep(0.6)  # a stuck loop: 12 intervals
        during = manager.drain()
        # Once the loop runs again, the pings resume.
        after = await manager.recv()
    finally:
        task.cancel()
        n.close()
    assert during == []
    assert after == "WATCHDOG=1"


async def test_no_watchdog_for_another_pid(manager: Manager) -> None:
    n = Notifier(env(manager, 100_000, pid=1))
    await asyncio.wait_for(n.watchdog_loop(), timeout=5)
    assert manager.drain() == []


def test_a_loop_restart_is_reloading_then_ready(manager: Manager) -> None:
    """cmd/config restarts the loop in the process: RELOADING=1 (with MONOTONIC_USEC, as
    systemd 253 wants it), then READY=1; never STOPPING=1 (remote_config.py)."""
    n = Notifier(env(manager))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading("configuration revision r1 applied")
    assert n.ready()
    got = manager.drain()
    n.close()
    reloading, mono, status = got[0].split("\n")
    assert reloading == "RELOADING=1" and status == "STATUS=configuration revision r1 applied"
    assert before <= int(mono.removeprefix("MONOTONIC_USEC=")) <= before + 5_000_000
    assert got[1:] == ["READY=1"]
