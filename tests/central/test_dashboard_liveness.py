"""A station whose broker died shows `unreachable` (issue #19): no will fires when a
broker node dies, and retained messages may live on that node only, so the dashboard
judges from silence: telemetry, records and acks (agent/central/liveness.py)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest

from agent.central.dashboard import Dashboard, Fleet
from agent.central.liveness import DEFAULT_TELEMETRY_INTERVAL_S
from agent.central.store import AgentSummary
from agent.testing import LOOPBACK, Broker, Pty, free_port, running_station, write_config
from tests.support.browser import ARTIFACTS
from tests.support.central import DESK_TOKEN, desk_guard, running_dashboard

SITE, NAME = "toda-city-hall-1f", "station-03"
KEY = f"{SITE}/{NAME}"
ACK = b"\x06"


def row(fleet: Fleet, now: float) -> dict[str, Any]:
    (site,) = fleet.snapshot(now)["sites"]
    (station,) = site["stations"]
    return station


def test_silence_past_one_and_a_half_intervals_is_unreachable() -> None:
    fleet = Fleet()
    t0 = 1_000_000.0
    fleet.on_status(SITE, NAME, {"state": "online", "session": 3, "telemetry_interval_s": 10}, t0)
    assert row(fleet, t0 + 14.9)["state"] == "online"
    r = row(fleet, t0 + 15.1)
    assert r["state"] == "unreachable"
    assert [a["type"] for a in r["alerts"]] == ["unreachable"]
    assert "nothing heard for 15 s (telemetry every 10 s" in r["alerts"][0]["detail"]
    # any sign of life counts: telemetry, the registry's ack, a stored record
    fleet.on_ack(SITE, NAME, t0 + 20)
    assert row(fleet, t0 + 30)["state"] == "online"
    assert row(fleet, t0 + 36)["state"] == "unreachable"
    summary = AgentSummary(
        site=SITE,
        agent=NAME,
        records=1,
        max_seq=1,
        last_stored_at=t0 + 40,
        per_minute=[],
        clock_synced=True,
    )
    fleet.on_registry([summary], [])
    assert row(fleet, t0 + 50)["state"] == "online"
    fleet.on_telemetry(SITE, NAME, {"session": 3, "telemetry_interval_s": 10}, t0 + 60)
    assert row(fleet, t0 + 74)["state"] == "online"
    assert row(fleet, t0 + 76)["state"] == "unreachable"
    # a station that said goodbye is offline, never "unreachable"
    fleet.on_status(SITE, NAME, {"state": "offline", "session": 3, "reason": "shutdown"}, t0 + 77)
    assert row(fleet, t0 + 500)["state"] == "offline"
    # an ack for a station never heard of does not invent one
    fleet.on_ack(SITE, "ghost", t0)
    assert (SITE, "ghost") not in fleet.stations


def test_a_station_that_does_not_say_its_interval_gets_the_default() -> None:
    fleet = Fleet()
    fleet.on_status(SITE, NAME, {"state": "online", "session": 1}, 0.0)
    limit = 1.5 * DEFAULT_TELEMETRY_INTERVAL_S
    assert row(fleet, limit - 0.1)["state"] == "online"
    assert row(fleet, limit + 0.1)["state"] == "unreachable"


@pytest.mark.broker
@pytest.mark.browser
async def test_the_station_s_broker_killed_shows_unreachable_within_two_intervals(
    pty_port: Pty, tmp_path: Path, page: Any
) -> None:
    """The station's broker bridges to the dashboard's (two nodes); the station's node is
    killed with SIGKILL: no will reaches the dashboard, the retained status still says
    online, and yet the row turns `unreachable` within two telemetry intervals (1 s each
    here). Alive, it never does. (About 8 s.)"""
    from playwright.async_api import expect

    (tmp_path / "dash").mkdir()
    (tmp_path / "node").mkdir()
    b_dash = Broker(tmp_path / "dash")
    b_dash.start()
    bridge = (
        "max_queued_messages 1000000\n"
        "connection to-dashboard-node\n"
        f"address {LOOPBACK}:{b_dash.port}\n"
        "topic madoguchi/v1/# out 1\n"
        "cleansession true\n"
    )
    b_node = Broker(tmp_path / "node", settings=bridge)
    b_node.start()
    interval = 1.0
    cfg = write_config(tmp_path, b_node.port, scanner=pty_port.link, telemetry_interval_s=interval)
    dash = Dashboard(LOOPBACK, b_dash.port, http_port=free_port(), guard=desk_guard())
    try:
        async with running_dashboard(dash), running_station(cfg):
            await page.goto(f"http://{LOOPBACK}:{dash.http_port}/#token={DESK_TOKEN}")
            tr = page.locator(f'tr[data-station="{KEY}"]')
            await expect(tr).to_have_class(re.compile(r"\bonline\b"), timeout=20_000)
            pty_port.scan("111122410000012345")
            assert await pty_port.aread(1) == ACK
            # alive for three intervals: never called unreachable
            seen = set()
            end = time.monotonic() + 3 * interval
            while time.monotonic() < end:
                seen.add(row(dash.fleet, time.time())["state"])
                await asyncio.sleep(0.05)
            assert seen == {"online"}
            b_node.kill()  # the station's node dies: no will anywhere
            killed = time.time()
            while (state := row(dash.fleet, time.time())["state"]) == "online":
                assert time.time() - killed < 2 * interval, "still online after 2 intervals"
                await asyncio.sleep(0.02)
            took = time.time() - killed
            assert state == "unreachable", state
            print(f"unreachable {took:.2f} s after the kill (telemetry every {interval} s)")
            await expect(tr).to_have_class(re.compile(r"\bunreachable\b"), timeout=5_000)
            await expect(tr.locator("td.state")).to_have_text("応答なし / Unreachable")
            await expect(tr.locator('[data-alert="unreachable"]')).to_be_visible()
            await page.screenshot(path=str(ARTIFACTS / "dashboard-unreachable.png"), full_page=True)
    finally:
        b_node.kill()
        b_dash.kill()
