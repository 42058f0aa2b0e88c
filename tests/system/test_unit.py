"""The systemd units: valid for systemd, hardened to an exposure of at most 2.0.

The station's agent (madoguchi.service) and the central side's registry and
dashboard (madoguchi-registry.service, madoguchi-dashboard.service).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "madoguchi.service"
REGISTRY_UNIT = ROOT / "systemd" / "madoguchi-registry.service"
DASHBOARD_UNIT = ROOT / "systemd" / "madoguchi-dashboard.service"
UNITS = [UNIT, REGISTRY_UNIT, DASHBOARD_UNIT]
CENTRAL_UNITS = [REGISTRY_UNIT, DASHBOARD_UNIT]
EXEC = "/opt/madoguchi/venv/bin/madoguchi"


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: run `make setup` (Debian package systemd)")
    return tool


def settings(unit: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(tmp_path: Path, unit: Path) -> None:
    # verify also checks that ExecStart exists; point it at a real stand-in.
    stub = tmp_path / "madoguchi"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(EXEC, str(stub)))
    r = subprocess.run(
        [analyze(), "verify", str(copy)], check=False, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # unknown keys and bad values are only warnings


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_security_exposure_at_most_2(unit: Path) -> None:
    r = subprocess.run(
        [analyze(), "security", "--offline=true", "--threshold=20", str(unit)],
        check=False,
        capture_output=True,
        text=True,
    )
    m = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d)", r.stdout)
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
    assert r.returncode == 0, r.stdout


def test_notify_watchdog_and_device_access_as_designed() -> None:
    s = settings()
    assert s["Type"] == ["notify"]
    # The supervisor from the base install runs the agent of releases/current as its
    # child (docs/fleet.md): the child's READY/WATCHDOG must count, only the supervisor
    # gets the stop signal, and a fleet update can install beside.
    assert s["NotifyAccess"] == ["all"]
    assert s["KillMode"] == ["mixed"]
    assert s["WatchdogSec"] and s["Restart"] == ["always"]
    assert s["ExecStart"] == [
        f"{EXEC} supervise --releases /opt/madoguchi/releases -- "
        "run --config /etc/madoguchi/agent.toml"
    ]
    assert s["ReadWritePaths"] == ["/opt/madoguchi/releases"]
    assert s["StateDirectory"] == ["madoguchi"]  # /var/lib/madoguchi/config/agent.toml
    # Hot-plugged scanners must stay reachable: no private /dev, no user namespace.
    assert "PrivateDevices" not in s
    assert "PrivateUsers" not in s
    assert s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert allowed == {
        "char-input",
        "char-ttyACM",
        "char-ttyUSB",
        "char-video4linux",
        "char-media",
        "char-dma_heap",
    }
    assert s["SupplementaryGroups"] == ["input dialout video"]
    creds = {v.split(":")[0] for v in s["LoadCredential"]}
    assert {"tls.key", "data.key"} <= creds
    # adjtimex (clock_synced) must survive the syscall filter.
    assert any("adjtimex" in v for v in s["SystemCallFilter"])
    assert s.get("ProtectClock", ["no"]) == ["no"]


@pytest.mark.parametrize(
    ("unit", "command"), [(REGISTRY_UNIT, "registry"), (DASHBOARD_UNIT, "dashboard")]
)
def test_central_units_run_their_command_from_central_toml(unit: Path, command: str) -> None:
    s = settings(unit)
    assert s["ExecStart"] == [f"{EXEC} {command} --config /etc/madoguchi/central.toml"]
    assert s["Restart"] == ["always"]
    # one user per service: a dashboard (HTTP-facing) cannot read the registry's key
    assert s["User"] == [f"madoguchi-{command}"]
    assert s["StateDirectory"] == [f"madoguchi-{command}"]
    assert s["StateDirectoryMode"] == ["0700"] and s["UMask"] == ["0077"]
    # the identity the broker sees (CN -> user name -> client id) comes in as credentials
    creds = dict(v.split(":", 1) for v in s["LoadCredential"])
    assert creds == {
        "tls.crt": f"/etc/madoguchi/credentials/{command}.crt",
        "tls.key": f"/etc/madoguchi/credentials/{command}.key",
    }
    # network and the PostgreSQL unix socket: nothing more; no devices at all
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["PrivateDevices"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert not any(k in s for k in ("InaccessiblePaths", "TemporaryFileSystem", "PrivateNetwork"))
    assert s["CapabilityBoundingSet"] == [""]  # the dashboard's port is not privileged
