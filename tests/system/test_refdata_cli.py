"""`madoguchi refdata publish` and `refdata status` as the desk runs them (issue #20): real
mosquitto, two real stations at one site, the CLI in a subprocess. A station-scoped
version reaches only its station; the status command reads what each station says it
holds from its retained status (republished when a version is applied)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.testing import Broker, Pty, mqtt_collect, running_station, serial_scanner, write_config
from tests.support.cli import run_cli


def station_config(tmp: Path, port: int, pty: Pty, name: str, key: str) -> Path:
    devices = serial_scanner(pty.link)
    devices += f'\n[datasets]\npublic_key = "{key}"\nmax_age_s = 3600\n'
    return write_config(tmp, port, devices=devices, site="toda-1f", name=name)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


async def retained_versions(port: int, name: str) -> dict[str, int]:
    *_, m = await mqtt_collect(port, f"madoguchi/v1/toda-1f/{name}/status", 0.3)  # the last
    held = json.loads(m.payload).get("datasets", {}).get("held", {})  # type: ignore[arg-type]
    return {k: v["version"] for k, v in held.items()}


@pytest.mark.timeout(90)
async def test_refdata_publish_per_station_and_status_says_who_holds_what(
    broker: Broker, tmp_path: Path
) -> None:
    """About 15 s: two stations, four CLI runs, and the rate-limited status republish."""
    made = run_cli("registry", "dataset-keygen", "--private", "k.pem", "--public", "k.pub",
                cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    pub = (tmp_path / "k.pub").read_text().strip()
    port = str(broker.port)
    staff = tmp_path / "staff.csv"
    staff.write_text("uid,operator\n01010601CB095703,staff-014\n")
    bad_scope = run_cli("refdata", "publish", "staff", str(staff), "--key", "k.pem",
                     "--scope", "station:toda-1f", "--port", port, cwd=tmp_path)  # fmt: skip
    assert bad_scope.returncode == 1
    assert bad_scope.stderr.startswith("--scope: 'station:toda-1f' is not fleet, site:SITE")
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,operator\nnot-hex,staff-014\n0101,Staff 1\n")
    refused = run_cli("refdata", "publish", "staff", str(bad), "--key", "k.pem",
                   "--port", port, cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"{bad}:2:1: uid: not a valid value",
        f"{bad}:3:2: operator: not a valid value",
    ]
    p1, p2 = Pty(tmp_path / "tty1"), Pty(tmp_path / "tty2")
    try:
        async with (
            running_station(station_config(tmp_path, broker.port, p1, "desk-1", pub)) as s1,
            running_station(station_config(tmp_path, broker.port, p2, "desk-2", pub)) as s2,
        ):
            d1, d2 = s1.station.station.datasets, s2.station.station.datasets
            assert d1 is not None and d2 is not None
            ok = run_cli("refdata", "publish", "staff", str(staff), "--key", "k.pem",
                      "--scope", "station:toda-1f/desk-1", "--port", port,
                      cwd=tmp_path)  # fmt: skip
            assert ok.returncode == 0, ok.stderr
            assert "1 row(s) published for station toda-1f/desk-1" in ok.stdout
            lots = tmp_path / "lots.json"
            lots.write_text('[{"gtin": "04912345123459", "lot": "AB", "reason": "recall"}]')
            fleet = run_cli("refdata", "publish", "recalled_lots", str(lots), "--key", "k.pem",
                         "--port", port, cwd=tmp_path)  # fmt: skip
            assert fleet.returncode == 0 and "(scope fleet)" in fleet.stdout, fleet.stderr
            await until(lambda: {"staff", "recalled_lots"} <= set(d1.held))
            await until(lambda: "recalled_lots" in d2.held)
            assert "staff" not in d2.held and not d2.refused
            assert d1.staff("01010601cb095703") == "staff-014"
            v_staff, v_lots = d1.held["staff"].version, d1.held["recalled_lots"].version

            # the retained status follows the versions applied after the connect
            for name, want in (
                ("desk-1", {"staff", "recalled_lots"}),
                ("desk-2", {"recalled_lots"}),
            ):
                for _ in range(60):
                    if set(await retained_versions(broker.port, name)) == want:
                        break
                    await asyncio.sleep(0.2)
                assert set(await retained_versions(broker.port, name)) == want

            st = run_cli("refdata", "status", "--port", port, "--wait", "0.5", cwd=tmp_path)
            assert st.returncode == 0, st.stderr
            lines = st.stdout.splitlines()
            assert f"published staff station:toda-1f/desk-1 v{v_staff} (1 rows)" in lines
            assert f"published recalled_lots fleet v{v_lots} (1 rows)" in lines
            states = [" ".join(x.split()[:3] + x.split()[-1:]) for x in lines if "age" in x]
            assert states == [
                f"toda-1f/desk-1 recalled_lots v{v_lots} current",
                f"toda-1f/desk-1 staff v{v_staff} current",
                f"toda-1f/desk-2 recalled_lots v{v_lots} current",
            ]
            js = run_cli("refdata", "status", "--json", "--port", port, "--wait", "0.5",
                      cwd=tmp_path)  # fmt: skip
            rows = [json.loads(x) for x in js.stdout.splitlines()]
            assert {(r["station"], r["kind"], r["state"]) for r in rows} == {
                ("toda-1f/desk-1", "recalled_lots", "current"),
                ("toda-1f/desk-1", "staff", "current"),
                ("toda-1f/desk-2", "recalled_lots", "current"),
            }

            # a badge tap no staff list names: `unknown_staff` from the version held, stored
            from agent.contract.records import Read

            stranger = Read(device="ticket-scanner", kind="card", data={"uid": "deadbeef01"})
            at_1 = await s1.station.station.accept(stranger)
            assert at_1.accepted and at_1.record is not None
            assert at_1.reference == {
                "verdict": "unknown_staff",
                "dataset": "staff",
                "version": v_staff,
                "stale": False,
            }
            at_2 = await s2.station.station.accept(stranger)  # desk-2 holds no staff list
            assert at_2.accepted and at_2.reference is None
            known = Read(device="ticket-scanner", kind="card", data={"uid": "01010601CB095703"})
            tap = await s1.station.station.accept(known)
            assert tap.reference is None and tap.record is not None
            assert tap.record.operator == "staff-014"
    finally:
        p1.close()
        p2.close()
