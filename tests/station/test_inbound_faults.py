"""Repeated faults are counted, logged once per change, and become a degraded state that
says why (agent/station/uplink.py InboundFaults, agent/station/kiosk/bounded.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.config import ApiSection
from agent.errors import OutboxError
from agent.station.kiosk.bounded import BoundedHttp
from agent.station.uplink import InboundFaults
from agent.testing import Broker, Pty, RegistryProbe, running_station, write_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_faults_degrade_then_recover_with_few_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    faults = InboundFaults(clock)
    caplog.set_level(logging.WARNING, logger="agent.station.uplink")
    for _ in range(4):
        faults.fault("malformed", "ack: JSON nested too deeply")
    assert faults.degraded is None
    for _ in range(200):
        faults.fault("malformed", "ack: JSON nested too deeply")
        clock.now += 0.01
    faults.fault("oversize", "ack: 2097152 bytes over the cap")
    assert faults.describe()["malformed"] == 204 and faults.describe()["oversize"] == 1
    why = faults.degraded
    assert why is not None and "205 inbound faults" in why and "oversize" in why
    # one line for the first malformed one, one for the change to oversize
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]
    assert "203 more" in caplog.records[1].getMessage()
    clock.now += InboundFaults.window_s + 1
    assert faults.degraded is None  # quiet for a window: no longer degraded
    faults.fault("malformed", "again")  # same kind as the last line but a minute later: logged
    assert len(caplog.records) == 3


class Conn:
    """Stands for a BoundedH11Protocol: only what BoundedHttp reads of it."""

    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.closed = False

    def close_now(self) -> None:
        self.closed = True


def test_at_the_cap_the_oldest_idle_connection_goes_never_a_busy_one() -> None:
    bounds = BoundedHttp(ApiSection(max_connections=4))
    busy = Conn(True)
    idle = [Conn(False) for _ in range(3)]
    for c in [busy, *idle]:
        assert bounds.admit(c)  # type: ignore[arg-type]
    kiosk = Conn(False)
    assert bounds.admit(kiosk)  # type: ignore[arg-type]
    assert idle[0].closed and not busy.closed and bounds.evicted == 1
    for c in idle[1:]:
        c.busy = True
    kiosk.busy = True
    late = Conn(False)
    assert not bounds.admit(late)  # type: ignore[arg-type]
    assert bounds.refused == 1 and len(bounds.open) == 4


def test_descriptor_errors_are_logged_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    bounds = BoundedHttp(ApiSection())
    passed: list[dict[str, object]] = []
    handler = bounds.exception_handler(lambda loop, ctx: passed.append(ctx))
    loop = asyncio.new_event_loop()
    try:
        caplog.set_level(logging.WARNING, logger="agent.station.kiosk.bounded")
        emfile = OSError(errno.EMFILE, "Too many open files")
        for _ in range(500):
            handler(
                loop, {"message": "socket.accept() out of system resource", "exception": emfile}
            )
        assert bounds.describe()["out_of_descriptors"] is True
        assert bounds.admit(Conn(False))  # type: ignore[arg-type]  # within the retry: same episode
        assert bounds.describe()["out_of_descriptors"] is True
        bounds._resource_last -= 3  # the retry delay has passed without an error
        assert bounds.admit(Conn(False))  # type: ignore[arg-type]  # accepting again
        handler(loop, {"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "Too many open files" in lines[0]
    assert "after 500 descriptor error(s)" in lines[1]
    assert bounds.resource_errors == 500 and not bounds.describe()["out_of_descriptors"]
    assert len(passed) == 1  # other loop errors go to the previous handler


# -- on a real broker: a failing handler or outbox never ends the station ---------------


@pytest.mark.broker
async def test_failing_ack_handler_and_outbox_keep_the_uplink_up(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 1")
    async with running_station(cfg) as run:
        app = run.station
        assert app.outbox is not None and app.uplink is not None
        outbox, uplink = app.outbox, app.uplink
        real_confirm, real_mark_sent = outbox.confirm, outbox.mark_sent
        confirm_calls = 0

        async def broken_confirm(ids: Any) -> int:
            nonlocal confirm_calls
            confirm_calls += 1
            if confirm_calls <= 2:
                raise RuntimeError("confirm failed for the test")
            return await real_confirm(ids)

        sent_calls = 0

        async def broken_mark_sent(seqs: Any) -> None:
            nonlocal sent_calls
            sent_calls += 1
            if sent_calls == 1:
                raise OutboxError(f"{cfg}: outbox: disk I/O error (the test)")
            await real_mark_sent(seqs)

        outbox.confirm = broken_confirm  # type: ignore[method-assign]
        outbox.mark_sent = broken_mark_sent  # type: ignore[method-assign]
        for i in range(3):
            pty_port.scan(f"fault-{i}")
            assert await pty_port.aread(1) == b"\x06"
        await registry.wait_for(3, timeout=20)
        for _ in range(200):
            if (await outbox.stats()).unconfirmed == 0:
                break
            await asyncio.sleep(0.05)
        assert (await outbox.stats()).unconfirmed == 0
        assert uplink.inbound.counts["failed"] == 2
        assert uplink.connected and not run.task.done()
        assert sent_calls >= 2 and confirm_calls >= 3
