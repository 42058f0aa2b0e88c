"""provisioning/install.sh into a temporary root: complete, idempotent, host untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "provisioning" / "install.sh"

STATION = """
[agent]
site = "toda-city-hall-1f"
name = "station-03"

[mqtt]
host = "broker.example"
port = 8883
tls_ca = "/etc/madoguchi/ca.crt"
tls_cert = "/run/credentials/madoguchi.service/tls.crt"
tls_key = "/run/credentials/madoguchi.service/tls.key"

[outbox]
key_file = "/run/credentials/madoguchi.service/data.key"

[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
usb_id = "0c2e:0b61"
port = "/dev/madoguchi/ticket-scanner"

[[devices]]
name = "desk-2.scanner"
profile = "model-x"
port = "/dev/madoguchi/desk-2.scanner"

[[devices]]
name = "spare"
profile = "generic-serial-scanner"
port = "/dev/ttyUSB9"
"""

MODEL_X = 'driver = "serial"\nusb_id = "05e0:1200"\nbaudrate = 115200\n'


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (mode, uid, gid, content hash or link target) for everything below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = "dir"
            out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    return out


def install(root: Path, *args: str) -> str:
    r = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def station(tmp_path: Path) -> Path:
    """A station's agent.toml with its own profile for the model-x scanner beside it."""
    cfg = tmp_path / "station" / "agent.toml"
    (cfg.parent / "device_profiles").mkdir(parents=True)
    cfg.write_text(STATION)
    (cfg.parent / "device_profiles" / "model-x.toml").write_text(MODEL_X)
    return cfg


def test_install_into_root_twice_gives_the_same_tree(tmp_path: Path, station: Path) -> None:
    root = tmp_path / "root"
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n(test)\n-----END CERTIFICATE-----\n")
    first_out = install(root, "--config", str(station), "--ca", str(ca))
    first = snapshot(root)
    second_out = install(root, "--config", str(station), "--ca", str(ca))
    assert snapshot(root) == first
    assert "made a new data key" in first_out
    assert "made a new data key" not in second_out  # the key is kept, never replaced
    # What a root install would have done to the host is said, not done.
    for cmd in ("apt-get install", "useradd --system", "systemctl enable", "udevadm trigger"):
        assert f"would run: {cmd.split()[0]}" in first_out, cmd
    assert "pip install" in first_out


def test_files_modes_and_contents(tmp_path: Path, station: Path) -> None:
    root = tmp_path / "root"
    install(root, "--config", str(station))
    snap = snapshot(root)

    def mode(rel: str) -> int:
        return snap[rel][0]

    assert mode("etc/madoguchi") == 0o755
    assert mode("etc/madoguchi/agent.toml") == 0o640
    assert mode("etc/madoguchi/credentials") == 0o700
    assert mode("etc/madoguchi/credentials/data.key") == 0o600
    assert (root / "etc/madoguchi/credentials/data.key").stat().st_size == 32
    assert (root / "etc/madoguchi/agent.toml").read_text() == STATION
    unit = root / "etc/systemd/system/madoguchi.service"
    assert unit.read_bytes() == (ROOT / "systemd/madoguchi.service").read_bytes()
    assert mode("etc/systemd/system/madoguchi.service") == 0o644
    assert (root / "etc/madoguchi/device_profiles/model-x.toml").read_text() == MODEL_X
    assert (root / "opt/madoguchi/src/agent/cli/main.py").is_file()
    assert not any("__pycache__" in p for p in snap)
    uid, gid = os.getuid(), os.getgid()
    assert all(v[1:3] == (uid, gid) for v in snap.values())

    rules = (root / "etc/udev/rules.d/70-madoguchi.rules").read_text().splitlines()
    active = [r for r in rules if r and not r.startswith("#")]
    assert active == [
        'ACTION=="add|change", SUBSYSTEM=="tty", ATTRS{idVendor}=="0c2e", '
        'ATTRS{idProduct}=="0b61", GROUP="madoguchi", MODE="0660", '
        'SYMLINK+="madoguchi/ticket-scanner"',
        'ACTION=="add|change", SUBSYSTEM=="tty", ATTRS{idVendor}=="05e0", '
        'ATTRS{idProduct}=="1200", GROUP="madoguchi", MODE="0660", '
        'SYMLINK+="madoguchi/desk-2.scanner"',
    ]  # "spare" has no usb_id: it gets no access and no link


def test_existing_config_and_keys_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root)  # no --config: the example is installed once
    agent_toml = root / "etc/madoguchi/agent.toml"
    assert "station-03" in agent_toml.read_text()
    agent_toml.write_text(agent_toml.read_text().replace("station-03", "station-07"))
    tls_key = root / "etc/madoguchi/credentials/tls.key"
    tls_key.write_text("key made by madoguchi enroll\n")
    tls_key.chmod(0o644)
    key = (root / "etc/madoguchi/credentials/data.key").read_bytes()
    out = install(root)
    assert "station-07" in agent_toml.read_text()
    assert (root / "etc/madoguchi/credentials/data.key").read_bytes() == key
    assert tls_key.read_text() == "key made by madoguchi enroll\n"
    assert stat.S_IMODE(tls_key.stat().st_mode) == 0o600  # tightened again
    assert "systemctl start madoguchi" in out  # no certificate yet: told what to do


def test_the_host_is_not_touched(tmp_path: Path, station: Path) -> None:
    assert not Path("/etc/systemd/system/madoguchi.service").exists()
    install(tmp_path / "root", "--config", str(station))
    assert not Path("/etc/systemd/system/madoguchi.service").exists()
    assert not Path("/etc/madoguchi/agent.toml").exists()
    assert not Path("/etc/udev/rules.d/70-madoguchi.rules").exists()
    r = subprocess.run(["getent", "passwd", "madoguchi"], capture_output=True, check=False)
    assert r.returncode != 0


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "provisioning" / "agent.example.toml")
    assert cfg.mqtt.tls_key == Path("/run/credentials/madoguchi.service/tls.key")
    assert cfg.devices[0].usb_id is not None


def test_udev_rules_refuse_a_bad_usb_id(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(STATION.replace('usb_id = "0c2e:0b61"', 'usb_id = "0C2E:0B61\\" RUN+=\\"x"'))
    (tmp_path / "device_profiles").mkdir()
    (tmp_path / "device_profiles/model-x.toml").write_text(MODEL_X)
    r = subprocess.run(
        [
            "python3",
            str(ROOT / "provisioning/udev_rules.py"),
            "--config",
            str(cfg),
            "--profile-dir",
            str(ROOT / "device_profiles"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0
    assert "usb_id" in r.stderr
    assert r.stdout == ""


def test_shellcheck_clean() -> None:
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.fail("shellcheck is missing: run `make setup` (Debian package shellcheck)")
    r = subprocess.run([tool, str(INSTALL)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout
