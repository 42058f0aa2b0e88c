"""The dashboard's state machine (status sessions, alerts) and its HTTP API on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.central.audit import AuditLog
from agent.central.dashboard import Dashboard, Fleet, Thresholds
from agent.central.store import AgentSummary, Gap
from agent.testing import Broker, Pty, free_port, running_station, write_config
from tests.support.central import (
    DESK_TOKEN,
    DESK_USER,
    authorized,
    desk_guard,
    running_dashboard,
)

S, A = "toda-city-hall-1f", "station-03"


def rows(fleet: Fleet, now: float) -> dict[str, dict[str, Any]]:
    snap = fleet.snapshot(now)
    return {f"{r['site']}/{r['agent']}": r for site in snap["sites"] for r in site["stations"]}


def alert_types(fleet: Fleet, now: float, key: str = f"{S}/{A}") -> list[str]:
    return [a["type"] for a in rows(fleet, now)[key]["alerts"]]


def test_a_stale_will_does_not_flip_a_live_station() -> None:
    f = Fleet()
    f.on_status(S, A, {"state": "online", "session": 7}, now=100.0)
    # the will of session 6 arrives late (the broker noticed the old connection only now)
    f.on_status(S, A, {"state": "offline", "session": 6}, now=101.0)
    assert rows(f, 102.0)[f"{S}/{A}"]["state"] == "online"
    f.on_telemetry(S, A, {"session": 6, "outbox": {}}, now=103.0)  # late, old connection
    assert f.stations[(S, A)].telemetry == {}
    f.on_status(S, A, {"state": "offline", "session": 7}, now=104.0)  # the current one dies
    row = rows(f, 105.0)[f"{S}/{A}"]
    assert row["state"] == "offline"
    assert alert_types(f, 105.0) == ["offline"]
    f.on_telemetry(S, A, {"session": 8, "outbox": {}}, now=106.0)  # back, birth missed
    assert rows(f, 106.0)[f"{S}/{A}"]["state"] == "online"


def test_alerts_from_telemetry_and_registry() -> None:
    f = Fleet(Thresholds(stuck_after_s=60, nearly_full_ratio=0.8, gap_timeout_s=300))
    outbox = {"oldest_unconfirmed_age_s": 30.0, "db_bytes": 100, "max_bytes": 1000}
    f.on_status(S, A, {"state": "online", "session": 1, "outbox": outbox}, now=0.0)
    assert alert_types(f, 1.0) == []
    f.on_telemetry(
        S,
        A,
        {
            "session": 1,
            "outbox": {"oldest_unconfirmed_age_s": 61.0, "db_bytes": 850, "max_bytes": 1000},
            "devices": {"ticket-scanner": {"state": "disconnected", "reads": 3, "errors": 1}},
            "alerts": [{"type": "expired_lot", "device": "vial", "fields": {"10": "AB12"}}],
        },
        now=10.0,
    )
    summary = AgentSummary(S, A, 12, 10, 9.0, False, [0, 4, 6])
    f.on_registry([summary], [Gap(S, A, 5, 6, 5.0)])
    assert alert_types(f, 20.0) == [
        "outbox_stuck",
        "outbox_nearly_full",
        "clock_unsynced",
        "device",
        "expired_lot",
    ]
    expired = next(a for a in rows(f, 20.0)[f"{S}/{A}"]["alerts"] if a["type"] == "expired_lot")
    assert expired["detail"] == "vial lot AB12"
    assert "seq_gap" in alert_types(f, 305.0)  # the gap is overdue after gap_timeout_s
    assert "expired_lot" not in alert_types(f, 10.0 + 3601)  # agent alerts age out
    assert f.per_minute == [0, 4, 6]


def test_stations_are_grouped_by_site() -> None:
    f = Fleet()
    for site, agent in [("b-site", "s1"), ("a-site", "s2"), ("a-site", "s1")]:
        f.on_status(site, agent, {"state": "online", "session": 1}, now=0.0)
    snap = f.snapshot(1.0)
    assert [(s["site"], [r["agent"] for r in s["stations"]]) for s in snap["sites"]] == [
        ("a-site", ["s1", "s2"]),
        ("b-site", ["s1"]),
    ]


def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers=authorized({"content-type": "application/json"})
    )
    with urllib.request.urlopen(req, timeout=20) as res:
        return json.loads(res.read())


@pytest.mark.broker
@pytest.mark.usefixtures("contract_spy")
async def test_api_shows_a_live_station_and_runs_a_command(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    audit = AuditLog(tmp_path / "audit.jsonl")
    dash = Dashboard(
        "127.0.0.1", broker.port, http_port=free_port(), guard=desk_guard(), audit=audit
    )
    async with running_dashboard(dash), running_station(cfg):
        base = f"http://127.0.0.1:{dash.http_port}"
        while True:
            fleet = await asyncio.to_thread(http_json, f"{base}/api/fleet")
            if fleet["sites"] and fleet["sites"][0]["stations"][0]["devices"]:
                break
            await asyncio.sleep(0.1)
        [site] = fleet["sites"]
        [row] = site["stations"]
        assert (site["site"], row["agent"], row["state"]) == (S, A, "online")
        assert row["devices"]["ticket-scanner"]["state"] == "connected"
        result = await asyncio.to_thread(
            http_json, f"{base}/api/command", {"site": S, "agent": A, "name": "diagnostics"}
        )
        assert result["ok"] is True and "python" in result
        entries = audit.tail()
        assert [(e["who"], e["site"], e["agent"], e["command"], e["outcome"]) for e in entries] == [
            (DESK_USER, S, A, "diagnostics", "sent"),
            (DESK_USER, S, A, "diagnostics", "ok"),
        ]
        assert entries[0]["request_id"] == entries[1]["request_id"]
        shown = await asyncio.to_thread(http_json, f"{base}/api/audit")
        assert shown["entries"] == entries
        with pytest.raises(urllib.error.HTTPError) as e:
            await asyncio.to_thread(
                http_json, f"{base}/api/command", {"site": S, "agent": A, "name": "shutdown"}
            )
        assert e.value.code == 404
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/").read().decode())
        assert "窓口フリート" in page and "madoguchi fleet" in page


@pytest.mark.broker
def test_dashboard_command_serves_and_stops_on_sigterm(broker: Broker, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    http_port = free_port()
    log = tmp_path / "dashboard.log"
    token_file = tmp_path / "dashboard-token"
    token_file.write_text(f"{DESK_USER} {DESK_TOKEN}\n")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "dashboard",
                "--port",
                str(broker.port),
                "--db",
                str(tmp_path / "registry.db"),
                "--http-port",
                str(http_port),
                "--token-file",
                str(token_file),
                "--audit-file",
                str(tmp_path / "audit.jsonl"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            deadline = time.monotonic() + 20
            fleet = None
            while fleet is None and time.monotonic() < deadline:
                try:
                    fleet = http_json(f"http://127.0.0.1:{http_port}/api/fleet")
                except OSError:
                    assert proc.poll() is None, log.read_text()
                    time.sleep(0.1)
            assert fleet is not None and fleet["sites"] == []
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # a second dashboard on a port already taken says so and exits 1
    with socket_bound() as taken:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "dashboard",
                "--port",
                str(broker.port),
                "--http-port",
                str(taken),
                "--token-file",
                str(token_file),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=Path(__file__).resolve().parents[2],
            check=False,
        )
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken}" in r.stderr


@contextlib.contextmanager
def socket_bound() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_release_state_per_station_and_a_rollback_alert() -> None:
    """issue #22: the running release and the last rollout's state per station."""
    f = Fleet()
    healthy = {"version": "1.1", "target": "1.1", "state": "healthy", "reason": None}
    f.on_status(S, A, {"state": "online", "session": 1, "release": healthy}, now=0.0)
    f.on_status("b-site", "s1", {"state": "online", "session": 1}, now=0.0)
    assert rows(f, 1.0)[f"{S}/{A}"]["release"] == healthy
    assert rows(f, 1.0)["b-site/s1"]["release"] is None
    assert "release_rolled_back" not in alert_types(f, 1.0)
    back = {"version": "1.1", "target": "1.2", "state": "rolled_back", "reason": "exited 1"}
    f.on_telemetry(S, A, {"session": 1, "outbox": {}, "release": back}, now=2.0)
    row = rows(f, 3.0)[f"{S}/{A}"]
    assert row["release"] == back
    (alert,) = [a for a in row["alerts"] if a["type"] == "release_rolled_back"]
    assert alert["detail"] == "1.2: exited 1"


@pytest.mark.broker
async def test_stop_during_a_subscribe_whose_answer_swallows_the_cancel(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's `asyncio.wait_for` (inside aiomqtt's subscribe) returns normally when
    the SUBACK lands together with the cancel: the task carries on "cancelling". The
    dashboard then waited for messages forever and SIGTERM never ended it (seen in a
    fresh-clone run). Here the swallow is made certain; `run` must still return."""
    import aiomqtt

    real_subscribe = aiomqtt.Client.subscribe
    in_subscribe = asyncio.Event()

    async def swallowing_subscribe(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> Any:
        result = await real_subscribe(self, *args, **kwargs)
        in_subscribe.set()
        # the cancel arrives here and is lost, as wait_for loses it when its future is done
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.5)
        return result

    monkeypatch.setattr(aiomqtt.Client, "subscribe", swallowing_subscribe)
    dash = Dashboard("127.0.0.1", broker.port, http_port=free_port(), guard=desk_guard())
    stop = asyncio.Event()
    running = asyncio.create_task(dash.run(stop), name="test-dashboard")
    await asyncio.wait_for(in_subscribe.wait(), 10)
    stop.set()
    await asyncio.wait_for(running, 10)
