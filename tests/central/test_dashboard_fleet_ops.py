"""The dashboard's columns and alerts for remote configuration and certificate renewal
(issue #22, point 6): from the station's status, then from newer telemetry."""

from __future__ import annotations

from typing import Any

from agent.central.dashboard import Fleet

S, A = "site-a", "station-01"


def row(fleet: Fleet, now: float) -> dict[str, Any]:
    [site] = fleet.snapshot(now)["sites"]
    [station] = site["stations"]
    assert isinstance(station, dict)
    return station


def test_config_revision_rollback_and_renewal_state_are_shown_and_alerted() -> None:
    f = Fleet()
    f.on_status(
        S,
        A,
        {"state": "online", "session": 1, "config_revision": "r1", "config_state": "confirmed"},
        now=0.0,
    )
    r = row(f, 1.0)
    assert (r["config_revision"], r["config_state"]) == ("r1", "confirmed")
    assert [a["type"] for a in r["alerts"]] == []
    rolled = {"revision": "r2", "reason": "no broker and registry within 120 s", "at": "x"}
    renewal = {"state": "failed", "attempts": 3, "last_error": "not on the allowlist"}
    f.on_telemetry(
        S,
        A,
        {
            "session": 1,
            "config_revision": "r1",
            "config_state": "rolled_back",
            "config_rolled_back": rolled,
            "cert_renewal": renewal,
        },
        now=2.0,
    )
    r = row(f, 3.0)
    assert r["config_rolled_back"] == rolled and r["cert_renewal"] == renewal
    alerts = {a["type"]: a for a in r["alerts"]}
    assert alerts["config_rolled_back"]["detail"] == "r2: no broker and registry within 120 s"
    assert alerts["cert_renewal_failed"]["detail"] == "3 attempt(s): not on the allowlist"
    f.on_telemetry(
        S,
        A,
        {
            "session": 1,
            "config_revision": "r3",
            "config_state": "confirmed",
            "cert_renewal": {**renewal, "state": "renewed"},
        },
        now=4.0,
    )
    assert [a["type"] for a in row(f, 5.0)["alerts"]] == []
