"""The dashboard's registry health: down (will or silence), behind (lag), dead letters, conflicts.

A real registry process (so it can be killed -9), a real broker, the registry's SQLite
file read by the dashboard, the API, and the page in a real Chromium.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.central.dashboard import Dashboard, Fleet, Thresholds
from agent.central.store import Conflict, DeadLetter, Problems
from agent.testing import Broker, RegistryProcess, free_port
from tests.support.central import DESK_TOKEN, authorized, desk_guard, running_dashboard

PREFIX = "madoguchi/v1"
SITE, AGENT = "toda-city-hall-2f", "station-66"


def http_json(url: str) -> Any:
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=authorized()), timeout=20
    ) as res:
        return json.loads(res.read())


def types(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["type"] for a in alerts]


def test_registry_down_behind_and_problems_from_the_fleet_state() -> None:
    now = 1_000_000.0
    fleet = Fleet(Thresholds(stuck_after_s=60))
    assert fleet.registry_alerts(now) == []  # no registry seen yet: nothing to judge
    online = {"state": "online", "client_id": "r", "session": 5, "heartbeat_s": 10, "lag_s": 0}
    fleet.on_registry_status("r", online, now)
    assert fleet.registry_alerts(now + 29) == []
    assert types(fleet.registry_alerts(now + 31)) == ["registry_down"]  # 3 beats missed
    fleet.on_registry_status("r", {**online, "lag_s": 75.0}, now + 40)
    [behind] = fleet.registry_alerts(now + 41)
    assert (behind["type"], behind["detail"]) == ("registry_behind", "75 s")
    # an online station whose oldest unconfirmed record is old: the registry is behind
    fleet.on_registry_status("r", online, now + 50)
    fleet.on_status(SITE, AGENT, {"state": "online", "session": 1}, now + 50)
    fleet.on_telemetry(
        SITE, AGENT, {"session": 1, "outbox": {"oldest_unconfirmed_age_s": 90}}, now + 50
    )
    assert types(fleet.registry_alerts(now + 51)) == ["registry_behind"]
    # a stale will (older session) does not take a live registry down
    fleet.on_registry_status(
        "r", {"state": "offline", "client_id": "r", "session": 4, "reason": "x"}, now + 52
    )
    assert "registry_down" not in types(fleet.registry_alerts(now + 52))
    fleet.on_problems(
        Problems(
            3,
            1,
            [DeadLetter("t", "record 0: record seq over 2^63-1", b"", now + 50, SITE, AGENT)],
            [Conflict("0190c8e4-7d3a-7b61-9c2e-5f0a4b3c2d1e", SITE, AGENT, SITE, AGENT, "{}", now)],
        )
    )
    alerts = fleet.registry_alerts(now + 60)
    assert types(alerts) == ["registry_behind", "dead_letters", "conflicts"]
    assert "record seq over 2^63-1" in alerts[1]["detail"]
    # an hour later, the problems are no longer alerts (the counts stay in the snapshot)
    late = fleet.registry_snapshot(now + 4000)
    assert (late["dead_letters"], late["conflicts"]) == (3, 1)
    assert not {"dead_letters", "conflicts"} & set(types(late["alerts"]))


async def _until(url: str, test: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        fleet = await asyncio.to_thread(http_json, url)
        if test(fleet["registry"]):
            return fleet
        assert time.monotonic() < deadline, fleet["registry"]
        await asyncio.sleep(0.1)


@pytest.mark.broker
async def test_api_shows_dead_letters_then_registry_down_after_kill_9(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "registry.db"
    reg = RegistryProcess(broker.port, db, tmp_path / "registry.log", "--quiet")
    reg.start()
    try:
        await asyncio.to_thread(reg.wait_ready)
        dash = Dashboard(
            "127.0.0.1",
            broker.port,
            db=db,
            http_port=free_port(),
            db_poll_s=0.2,
            guard=desk_guard(),
        )
        async with running_dashboard(dash):
            url = f"http://127.0.0.1:{dash.http_port}/api/fleet"
            fleet = await _until(url, lambda r: r["consumers"])
            [consumer] = fleet["registry"]["consumers"]
            assert (consumer["name"], consumer["state"]) == ("madoguchi-registry", "online")
            assert fleet["registry"]["alerts"] == []
            async with aiomqtt.Client("127.0.0.1", broker.port) as station:
                await station.publish(f"{PREFIX}/{SITE}/{AGENT}/records", b"[" * 100_000, qos=1)
            fleet = await _until(url, lambda r: r["dead_letters"])
            [dead] = fleet["registry"]["alerts"]
            assert dead["type"] == "dead_letters" and "nested too deeply" in dead["detail"]
            reg.kill9()
            fleet = await _until(url, lambda r: "registry_down" in types(r["alerts"]))
            down = fleet["registry"]["alerts"][0]
            assert (down["type"], down["detail"]) == ("registry_down", "connection lost")
    finally:
        reg.stop()


@pytest.mark.broker
@pytest.mark.browser
async def test_the_page_shows_registry_down(broker: Broker, tmp_path: Path, browser: Any) -> None:
    from playwright.async_api import expect

    reg = RegistryProcess(broker.port, tmp_path / "registry.db", tmp_path / "registry.log")
    reg.start()
    try:
        await asyncio.to_thread(reg.wait_ready)
        dash = Dashboard("127.0.0.1", broker.port, http_port=free_port(), guard=desk_guard())
        async with running_dashboard(dash):
            context = await browser.new_context()
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"http://127.0.0.1:{dash.http_port}/#token={DESK_TOKEN}")
            await expect(page.locator("#registry")).to_have_text("稼働 online (1)", timeout=15_000)
            reg.kill9()
            await expect(page.locator("#registry")).to_have_text("停止 down", timeout=15_000)
            alert = page.locator('#registry-alerts [data-alert="registry_down"]')
            await expect(alert).to_contain_text("registry down: connection lost")
            await context.close()
            assert errors == []
    finally:
        reg.stop()


def test_consumers_that_came_and_went_are_forgotten_while_another_is_online() -> None:
    fleet = Fleet(Thresholds(keep_events_s=60))
    beat = {"state": "online", "session": 1, "heartbeat_s": 10, "lag_s": 0}
    fleet.on_registry_status("old-1", {**beat, "state": "offline", "reason": "x"}, 0.0)
    assert types(fleet.registry_alerts(1.0)) == ["registry_down"]
    fleet.on_registry_status("new-2", beat, 100.0)
    snap = fleet.registry_snapshot(101.0)
    assert [c["name"] for c in snap["consumers"]] == ["new-2"]
    assert snap["alerts"] == []


def test_a_registry_never_seen_after_the_grace_is_down() -> None:
    now = 1_000_000.0
    fleet = Fleet(Thresholds(registry_grace_s=30))
    assert fleet.registry_alerts(now + 3600) == []  # not started: nothing to judge yet
    fleet.started_at = now
    assert fleet.registry_alerts(now + 29) == []  # within the grace
    [down] = fleet.registry_alerts(now + 31)
    assert (down["type"], down["detail"]) == ("registry_down", "never seen")
    online = {"state": "online", "client_id": "r", "session": 1, "heartbeat_s": 10}
    fleet.on_registry_status("r", online, now + 32)
    assert fleet.registry_alerts(now + 33) == []


@pytest.mark.broker
async def test_api_says_registry_never_seen_then_clears_when_one_starts(
    broker: Broker, tmp_path: Path
) -> None:
    """No registry status at all within the grace after the dashboard's start: down."""
    grace = 1.5
    dash = Dashboard(
        "127.0.0.1",
        broker.port,
        http_port=free_port(),
        thresholds=Thresholds(registry_grace_s=grace),
        guard=desk_guard(),
    )
    reg = RegistryProcess(broker.port, tmp_path / "registry.db", tmp_path / "registry.log")
    try:
        async with running_dashboard(dash):
            url = f"http://127.0.0.1:{dash.http_port}/api/fleet"
            asked = time.time()
            first = await asyncio.to_thread(http_json, url)
            assert dash.fleet.started_at is not None
            if asked - dash.fleet.started_at < grace:
                assert first["registry"]["alerts"] == []  # still within the grace
            fleet = await _until(url, lambda r: "registry_down" in types(r["alerts"]))
            down = fleet["registry"]["alerts"][0]
            assert (down["type"], down["detail"]) == ("registry_down", "never seen")
            assert fleet["registry"]["consumers"] == []
            reg.start()
            await asyncio.to_thread(reg.wait_ready)
            fleet = await _until(url, lambda r: r["consumers"] and r["alerts"] == [])
            assert fleet["registry"]["consumers"][0]["state"] == "online"
    finally:
        reg.stop()
