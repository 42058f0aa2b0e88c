"""The systemd unit: valid for systemd, hardened to an exposure of at most 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "madoguchi.service"
EXEC = "/opt/madoguchi/venv/bin/madoguchi"


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: run `make setup` (Debian package systemd)")
    return tool


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_verifies(tmp_path: Path) -> None:
    # verify also checks that ExecStart exists; point it at a real stand-in.
    stub = tmp_path / "madoguchi"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "madoguchi.service"
    copy.write_text(UNIT.read_text().replace(EXEC, str(stub)))
    r = subprocess.run(
        [analyze(), "verify", str(copy)], check=False, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # unknown keys and bad values are only warnings


def test_security_exposure_at_most_2() -> None:
    r = subprocess.run(
        [analyze(), "security", "--offline=true", "--threshold=20", str(UNIT)],
        check=False,
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for madoguchi.service: (\d+\.\d)", r.stdout)
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
    assert r.returncode == 0, r.stdout


def test_notify_watchdog_and_device_access_as_designed() -> None:
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["Restart"] == ["always"]
    assert s["ExecStart"] == [f"{EXEC} run --config /etc/madoguchi/agent.toml"]
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
