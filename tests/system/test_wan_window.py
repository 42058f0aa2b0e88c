"""A window of records messages in flight over a slow link (issue #18, point 5).

The broker is reached through `LatencyLink` (agent/testing.py): 25 ms each way on
loopback, a WAN round trip of 50 ms (this kernel has no netem: CONFIG_NET_SCH_NETEM
is off; loss is LatencyLink's model of what TCP shows of it: a chunk with a lost segment
held one retransmission timeout, everything behind it waiting). A backlog drains with
`inflight_messages = 8`: more than one message's bytes are on the link at once, every
record reaches the registry exactly once and in seq order (also under 1 % loss), and a
broker killed mid-window loses nothing. With the default configuration the window grows
past 8 on this link (its PUBACKs take 50 ms and more) and stays at 8 on loopback.
Rates are measured in bench/bench_wan.py, not here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import load_config
from agent.contract.records import Read
from agent.station.outbox import Outbox
from agent.testing import Broker, LatencyLink, Pty, RegistryProbe, running_station, write_config

N = 3000
BATCH = 100
LIVE = 20  # scans after the drain on loopback


def a_read(i: int) -> Read:
    return Read(device="ticket-scanner", kind="barcode", data={"text": f"1111224100{i:08d}"})


async def _backlog(cfg: Path) -> None:
    async with Outbox(load_config(cfg).outbox_path) as ob:
        for i in range(N):
            await ob.append(a_read(i))


def _config(tmp_path: Path, port: int, pty: Pty, window: str | None = "8") -> Path:
    """A fixed window of `window` messages; None: the default (8, growing to 32)."""
    fixed = "" if window is None else f"\ninflight_messages = {window}"
    fixed += "" if window is None else f"\ninflight_messages_max = {window}"
    return write_config(
        tmp_path,
        port,
        scanner=pty.link,
        mqtt=f"backoff_max_s = 0.5\nbatch_max_records = {BATCH}{fixed}",
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loss", [0.0, 0.01], ids=["delay", "delay+1%loss"])
async def test_a_backlog_drains_through_a_window_in_seq_order_exactly_once(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path, loss: float
) -> None:
    async with LatencyLink(broker.port, 0.025, loss=loss, seed=7) as link:
        cfg = _config(tmp_path, link.port, pty_port)
        await _backlog(cfg)
        async with running_station(cfg):
            got = await registry.wait_for(N, timeout=90)
    seqs = [r["seq"] for r in got]
    assert len(seqs) == N and len({r["id"] for r in got}) == N
    assert seqs == sorted(seqs) == list(range(1, N + 1))  # wire order is seq order
    # more than 3 messages' bytes on the link at once (one in flight: about one message)
    one_message = link.bytes_up / (N / BATCH)
    assert link.max_in_flight_up > 3 * one_message, (link.max_in_flight_up, one_message)
    assert (link.lost_segments > 0) == (loss > 0)  # the loss model did hold segments back


@pytest.mark.timeout(180)
async def test_a_broker_killed_mid_window_loses_nothing(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    async with LatencyLink(broker.port, 0.025) as link:
        cfg = _config(tmp_path, link.port, pty_port)
        await _backlog(cfg)
        async with running_station(cfg) as run:
            await registry.wait_for(N // 5, timeout=60)
            broker.kill()
            broker.start()
            got = await registry.wait_for(N, timeout=120)
            ob = run.station.outbox
            assert ob is not None
            for _ in range(200):  # the acks of the last messages
                if (await ob.stats()).unconfirmed == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await ob.stats()).unconfirmed == 0
    ids = [r["id"] for r in got]
    assert len(set(ids)) == N  # each record stored once (duplicates were acked, not stored)
    assert sorted(r["seq"] for r in got) == list(range(1, N + 1))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wan", [True, False], ids=["wan", "loopback"])
async def test_the_default_window_grows_only_where_pubacks_are_slow(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path, wan: bool
) -> None:
    """The default configuration: 8 messages in flight on loopback (the drain's memory;
    bench_drain_cpu shows it never leaving 8 with the agent in its own process),
    up to 32 while PUBACKs take 30 ms or more (more than 8 messages' bytes on the link at
    once); the station reports which in telemetry."""
    # 100 ms each way: the agent builds a message in a few ms, so more than 8 are on the
    # link within one delay only on a long one
    async with LatencyLink(broker.port, 0.1 if wan else 0.0) as link:
        cfg = _config(tmp_path, link.port if wan else broker.port, pty_port, window=None)
        await _backlog(cfg)
        async with running_station(cfg) as run:
            got = await registry.wait_for(N, timeout=90)
            if not wan:
                # live scans, one PUBACK each: a stall of this loaded machine during the
                # drain (the registry shares this process) may have grown the window for
                # a moment; quick PUBACKs bring it back
                for i in range(LIVE):
                    pty_port.scan(f"live-{i}")
                    assert await pty_port.aread(1, timeout=10) == b"\x06"
                got = (await registry.wait_for(N + LIVE, timeout=30))[:N]
            uplink = run.station.uplink
            assert uplink is not None
            seen = uplink.describe()
    assert sorted(r["seq"] for r in got) == list(range(1, N + 1))
    assert seen["puback_rtt_ms"] is not None
    if wan:
        assert seen["window"] == 32 and seen["puback_rtt_ms"] >= 30
        one_message = link.bytes_up / (N / BATCH)
        assert link.max_in_flight_up > 8 * one_message, (link.max_in_flight_up, one_message)
    else:
        assert seen["window"] == 8 and seen["puback_rtt_ms"] < 15
        assert link.bytes_up == 0  # loopback: the link was not used
