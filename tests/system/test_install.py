"""provisioning/install.sh into a temporary root: complete, idempotent, host untouched.

Every install here is offline: pip sees no index, only the wheels of an x86_64 bundle
built once per run (tests/support/bundle.py), so these are `slow` but need no network
after that."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.testing import NotifySocket
from tests.support.bundle import isolated_pip_env, x86_64_bundle

pytestmark = pytest.mark.slow

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


_ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def offline_pip(tmp_path_factory: pytest.TempPathFactory) -> None:
    """pip with no index: the bundle's x86_64 wheels only (also for the source-tree path)."""
    tar = x86_64_bundle(tmp_path_factory)
    where = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(tar) as t:
        t.extractall(where, filter="data")
    (wheels,) = where.glob("madoguchi-bundle-*/wheels/x86_64")
    _ENV.update(isolated_pip_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels)))
    _ENV["BUNDLE"] = str(tar)


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, check=False, env=_ENV
    )


def install(root: Path, *args: str, offline: bool = True) -> str:
    bundle = ["--offline", _ENV["BUNDLE"]] if offline else []
    r = run_install("--root", str(root), *bundle, *args)
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
    assert "nothing to change" in second_out
    assert "done: " in first_out
    assert "a new data key" in first_out
    assert "a new data key" not in second_out  # the key is kept, never replaced
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
    # agent.toml is the service's own (remote configuration rewrites it; /etc is
    # read-only to the service), linked from /etc/madoguchi relatively (--root works)
    assert snap["etc/madoguchi/agent.toml"][3] == "-> ../../var/lib/madoguchi/config/agent.toml"
    assert mode("var/lib/madoguchi") == 0o700
    assert mode("var/lib/madoguchi/config") == 0o700
    assert mode("var/lib/madoguchi/config/agent.toml") == 0o600
    # the A/B releases directory: the base venv is the first release, `current` at it
    (info,) = (root / "opt/madoguchi/venv/lib/python3.11/site-packages").glob(
        "madoguchi-*.dist-info"
    )
    version = info.name.removeprefix("madoguchi-").removesuffix(".dist-info")
    assert snap["opt/madoguchi/releases/current"][3] == f"-> {version}"
    assert snap[f"opt/madoguchi/releases/{version}"][3] == "-> ../venv"
    assert os.access(root / "opt/madoguchi/releases/current/bin/madoguchi", os.X_OK)
    assert mode("etc/madoguchi/credentials") == 0o700
    assert mode("etc/madoguchi/credentials/data.key") == 0o600
    assert (root / "etc/madoguchi/credentials/data.key").stat().st_size == 32
    assert (root / "etc/madoguchi/agent.toml").read_text() == STATION
    unit = root / "etc/systemd/system/madoguchi.service"
    assert unit.read_bytes() == (ROOT / "systemd/madoguchi.service").read_bytes()
    assert mode("etc/systemd/system/madoguchi.service") == 0o644
    assert (root / "etc/madoguchi/device_profiles/model-x.toml").read_text() == MODEL_X
    # The wheel, not a copy of the checkout, with the extras the devices need.
    assert not (root / "opt/madoguchi/src").exists()
    site = root / "opt/madoguchi/venv/lib/python3.11/site-packages"
    (dist,) = site.glob("madoguchi-*.dist-info")
    assert (
        not (dist / "direct_url.json").exists()
        or '"editable"' not in (dist / "direct_url.json").read_text()
    )
    assert (site / "agent/device_profiles/generic-serial-scanner.toml").is_file()
    assert (site / "serial").is_dir()  # the serial extra: pyserial
    assert not list(site.glob("uvicorn*"))  # no [api]: no kiosk extra
    r = subprocess.run(
        [str(root / "opt/madoguchi/venv/bin/madoguchi"), "--help"], capture_output=True, check=False
    )
    assert r.returncode == 0
    # The docs where the unit's Documentation= points.
    docs = [
        ln.split("file://")[1]
        for ln in unit.read_text().splitlines()
        if ln.startswith("Documentation=")
    ]
    assert docs and all((root / d.lstrip("/")).is_file() for d in docs)
    uid, gid = os.getuid(), os.getgid()
    assert all(v[1:3] == (uid, gid) for v in snap.values())  # under --root: said, not done
    out = install(root, "--config", str(station))
    for path in ("/var/lib/madoguchi/config/agent.toml", "/opt/madoguchi/releases"):
        assert f"would run: chown madoguchi:madoguchi {path}" in out, out
    assert not any(p.startswith("etc/madoguchi/kiosk") for p in snap)  # only with --kiosk

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
    install(root, offline=False)  # no --config, no bundle: the example, the wheel built here
    agent_toml = root / "etc/madoguchi/agent.toml"
    assert "station-03" in agent_toml.read_text()
    agent_toml.write_text(agent_toml.read_text().replace("station-03", "station-07"))
    tls_key = root / "etc/madoguchi/credentials/tls.key"
    tls_key.write_text("key made by madoguchi enroll\n")
    tls_key.chmod(0o644)
    key = (root / "etc/madoguchi/credentials/data.key").read_bytes()
    out = install(root, offline=False)
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
    launcher = ROOT / "provisioning/kiosk/madoguchi-kiosk"
    r = subprocess.run(
        [tool, str(INSTALL), str(launcher)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout


KIOSK_API = """
[api]
port = 8765
token_file = "/run/credentials/madoguchi.service/api-token"
"""


def test_kiosk_twice(tmp_path: Path, station: Path) -> None:
    station.write_text(STATION + KIOSK_API)
    root = tmp_path / "root"
    first = install(root, "--config", str(station), "--kiosk")
    snap = snapshot(root)
    token = (root / "etc/madoguchi/kiosk/api-token").read_text()
    second = install(root, "--config", str(station), "--kiosk")
    assert snapshot(root) == snap
    assert "nothing to change" in second
    assert (root / "etc/madoguchi/kiosk/api-token").read_text() == token  # never replaced

    # The token: group-readable by the kiosk, outside the agent's 0700 state directory,
    # handed to the agent by systemd where agent.toml's token_file points.
    assert snap["etc/madoguchi/kiosk"][0] == 0o750
    assert snap["etc/madoguchi/kiosk/api-token"][0] == 0o640
    assert len(token.strip()) >= 32 and token.endswith("\n")
    for cmd in (
        "groupadd --system -f madoguchi-kiosk",
        "useradd --create-home --gid madoguchi-kiosk",
        "chgrp madoguchi-kiosk /etc/madoguchi/kiosk/api-token",
    ):
        assert f"would run: {cmd}" in first, cmd
    dropin = (root / "etc/systemd/system/madoguchi.service.d/kiosk.conf").read_text()
    assert "LoadCredential=api-token:/etc/madoguchi/kiosk/api-token" in dropin
    launcher = (root / "usr/local/bin/madoguchi-kiosk").read_text()
    assert snap["usr/local/bin/madoguchi-kiosk"][0] == 0o755
    assert "token_file=/etc/madoguchi/kiosk/api-token" in launcher
    assert "http://127.0.0.1:8765/#token=" in launcher and "@" not in launcher.replace('"$', "")
    desktop = (root / "etc/xdg/autostart/madoguchi-kiosk.desktop").read_text()
    assert "Exec=/usr/local/bin/madoguchi-kiosk" in desktop
    # [api] is there: the kiosk extra (uvicorn) is installed.
    site = root / "opt/madoguchi/venv/lib/python3.11/site-packages"
    assert (site / "uvicorn").is_dir() and (site / "starlette").is_dir()


def test_kiosk_launcher_writes_a_private_redirect(tmp_path: Path) -> None:
    """The launcher as installed, run as the kiosk user with a stand-in chromium."""
    token = tmp_path / "api-token"
    token.write_text("t" * 43 + "\n")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    src = (ROOT / "provisioning/kiosk/madoguchi-kiosk").read_text()
    launcher = tmp_path / "madoguchi-kiosk"
    launcher.write_text(
        src.replace("@USER@", user).replace("@TOKEN@", str(token)).replace("@PORT@", "8799")
    )
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "chromium"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$XDG_RUNTIME_DIR/args"\n')
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "XDG_RUNTIME_DIR": str(run_dir),
        "HOME": str(tmp_path),
    }
    r = subprocess.run(["sh", str(launcher)], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    page = run_dir / "madoguchi-kiosk.html"
    assert f"http://127.0.0.1:8799/#token={'t' * 43}" in page.read_text()
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    args = (run_dir / "args").read_text()
    assert "--kiosk" in args and "t" * 43 not in args  # the token is not on the command line


def test_no_arguments_prints_usage_and_changes_nothing(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    r = subprocess.run(
        ["bash", str(INSTALL)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert r.returncode == 2
    assert "--config FILE" in r.stdout and "--dry-run" in r.stdout
    assert "==>" not in r.stdout + r.stderr
    assert snapshot(tmp_path) == before
    assert not Path("/etc/madoguchi").exists()


def test_dry_run_lists_every_change_and_makes_none(tmp_path: Path, station: Path) -> None:
    root = tmp_path / "root"
    r = run_install(
        "--root", str(root), "--offline", _ENV["BUNDLE"], "--config", str(station), "--dry-run"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not root.exists()
    for change in (
        "would create the venv /opt/madoguchi/venv",
        "would pip install --no-index",
        "would install /var/lib/madoguchi/config/agent.toml (mode 0600)",
        "would link /etc/madoguchi/agent.toml -> ../../var/lib/madoguchi/config/agent.toml",
        "would link /opt/madoguchi/releases/0.1.0 -> ../venv",
        "would point /opt/madoguchi/releases/current at 0.1.0",
        "would make /etc/madoguchi/credentials/data.key",
        "would install /etc/udev/rules.d/70-madoguchi.rules",
        "would install /etc/systemd/system/madoguchi.service",
        "would install /usr/share/doc/madoguchi/provisioning.md",
        "would run: systemctl enable madoguchi.service",
    ):
        assert change in r.stdout, change
    assert "listed, none made" in r.stdout

    # After a real install, a dry run of an edited config lists exactly that change.
    install(root, "--config", str(station))
    snap = snapshot(root)
    station.write_text(STATION.replace("station-03", "station-04"))
    r = run_install(
        "--root", str(root), "--offline", _ENV["BUNDLE"], "--config", str(station), "--dry-run"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert snapshot(root) == snap
    listed = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("    would ")]
    assert listed == ["would install /var/lib/madoguchi/config/agent.toml (mode 0600)"]


def test_a_broken_config_stops_before_any_change(tmp_path: Path, station: Path) -> None:
    station.write_text(
        STATION.replace('profile = "model-x"', 'profile = "no-such-model"').replace(
            "port = 8883", 'port = "eighty"'
        )
    )
    root = tmp_path / "root"
    r = run_install(
        "--root", str(root), "--offline", _ENV["BUNDLE"], "--config", str(station), "--kiosk"
    )
    assert r.returncode == 1
    assert not root.exists()
    assert "no profile 'no-such-model'" in r.stderr  # every problem, not just the first
    assert "mqtt.port" in r.stderr
    assert "api: missing: --kiosk needs the local API" in r.stderr
    assert "nothing was changed" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_files_saved_the_windows_way(tmp_path: Path, station: Path) -> None:
    """Shift_JIS: one line saying so and nothing changed; UTF-8 with a BOM: installs."""
    comment = "# 戸田市役所 1階 受付\n"
    station.write_bytes((comment + STATION).encode("cp932"))
    root = tmp_path / "root"
    r = run_install("--root", str(root), "--offline", _ENV["BUNDLE"], "--config", str(station))
    assert r.returncode == 1
    assert not root.exists()
    assert f"{station}: not UTF-8 (it looks like Shift_JIS): save it as UTF-8" in r.stderr
    assert r.stderr.count("UTF-8") == 2  # that line once, and no second opinion
    assert "Traceback" not in r.stderr
    station.write_bytes(b"\xef\xbb\xbf" + (comment + STATION).encode())
    out = install(root, "--config", str(station))
    rules = (root / "etc/udev/rules.d/70-madoguchi.rules").read_text()
    assert 'ATTRS{idVendor}=="0c2e"' in rules, out


def test_extras_follow_the_devices(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        STATION.split("[[devices]]", maxsplit=1)[0]
        + KIOSK_API
        + '[[devices]]\nname = "a"\nprofile = "generic-hid-scanner-us"\n'
        + '[[devices]]\nname = "b"\nprofile = "sony-rc-s300-p"\n'
        + '[[devices]]\nname = "c"\ndriver = "camera"\nprofile = "x"\n'
    )
    r = subprocess.run(
        ["python3", str(ROOT / "provisioning/station_extras.py"), "--config", str(cfg),
         "--profile-dir", str(ROOT / "device_profiles")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["extras=camera,card,hid,interpret,kiosk", "api_port=8765"]


def test_the_bundle_manifest(tmp_path_factory: pytest.TempPathFactory) -> None:
    tar = x86_64_bundle(tmp_path_factory)
    where = tmp_path_factory.mktemp("manifest")
    with tarfile.open(tar) as t:
        t.extractall(where, filter="data")
    (top,) = where.iterdir()
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["version"] == tar.name.removeprefix("madoguchi-bundle-").removesuffix(".tar.gz")
    assert list(manifest["platforms"]) == ["x86_64"]
    files = {str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((top / rel).read_bytes()).hexdigest() == digest, rel
    wheels = {p.name.split("-")[0].lower() for p in (top / "wheels/x86_64").glob("*.whl")}
    assert {"madoguchi", "pydantic", "evdev", "pyscard", "uvicorn", "zxing_cpp"} <= wheels
    # No PyPI wheels for evdev/pyscard: their sdists travel along, built here for x86_64.
    assert manifest["platforms"]["x86_64"]["no_wheel_on_pypi"] == {
        "evdev": f"built here from {manifest['sdists']['evdev']['sdist']}",
        "pyscard": f"built here from {manifest['sdists']['pyscard']['sdist']}",
    }
    assert (top / "debian-packages.txt").read_text().split() == sorted(manifest["debian_packages"])
    assert (top / "provisioning/install.sh").is_file()


def test_makefile_station_packages_leave_out_the_dev_tools() -> None:
    r = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "print-station-packages"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pkgs = r.stdout.split()
    assert {"pcscd", "libccid", "python3-venv", "chromium", "fonts-ipafont-gothic"} <= set(pkgs)
    assert not {"shellcheck", "postgresql", "vsmartcard-vpcd", "mosquitto"} & set(pkgs)


LINK = -1  # a row whose mode cell says "link"


def _files_table() -> dict[str, int]:
    """docs/provisioning.md "Files, owners and modes": path -> mode (`…/` is /etc/madoguchi/)."""
    text = (ROOT / "docs" / "provisioning.md").read_text()
    table = text.split("### Files, owners and modes", 1)[1].split("\n### ", 1)[0]
    out: dict[str, int] = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        paths = [p.replace("…/", "/etc/madoguchi/") for p in re.findall(r"`([^`]+)`", cells[0])]
        modes = (
            [LINK]
            if cells[2] == "link"
            else [int(m, 8) for m in re.findall(r"\b0[0-7]{3}\b", cells[2])]
        )
        if len(paths) > 1 and len(modes) == 1:
            modes *= len(paths)
        for named, mode in zip(paths, modes, strict=True):
            # `tls.csr` beside `…/credentials/tls.crt`: the first path's directory
            path = named if named.startswith("/") else str(Path(paths[0]).parent / named)
            out[path.rstrip("/")] = mode
    return out


def test_the_files_table_of_the_doc_is_what_install_makes(tmp_path: Path, station: Path) -> None:
    """Every file install.sh --kiosk puts outside the venv, the docs and the profiles is
    in docs/provisioning.md's table with the mode it gets, and every path the table
    promises (but what only enrolment or systemd make) is there."""
    station.write_text(STATION + KIOSK_API)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n(test)\n-----END CERTIFICATE-----\n")
    root = tmp_path / "root"
    install(root, "--config", str(station), "--ca", str(ca), "--kiosk")
    table = _files_table()
    subtrees = (
        "opt/madoguchi/venv/",
        "opt/madoguchi/releases/",
        "usr/share/doc/madoguchi/",
        "etc/madoguchi/device_profiles/",
    )
    for rel, (mode, _, _, what) in snapshot(root).items():
        if what == "dir" or rel.startswith(subtrees):
            continue
        assert "/" + rel in table, f"/{rel} is installed but not in the doc's table"
        if what.startswith("-> "):
            assert table["/" + rel] == LINK, f"/{rel} is a link, the doc says a mode"
            continue
        assert table["/" + rel] == mode, f"/{rel}: mode {mode:o}, the doc says {table['/' + rel]:o}"
    made_later = {"/var/lib/madoguchi"} | {
        p for p in table if p.startswith("/etc/madoguchi/credentials/tls.")
    }
    for path, mode in table.items():
        if path in made_later:
            continue
        p = root / path.lstrip("/")
        assert p.exists(), f"{path}: in the doc's table, not installed"
        if mode == LINK:
            assert p.is_symlink(), f"{path}: the doc says a link"
            continue
        assert stat.S_IMODE(p.stat().st_mode) == mode, f"{path}: {p.stat().st_mode:o} vs {mode:o}"


def test_the_units_command_on_the_installed_tree_reaches_ready(
    tmp_path: Path, station: Path
) -> None:
    """The shipped unit's ExecStart, paths moved into the --root tree: the base venv's
    supervisor starts releases/current (-> VERSION -> ../venv), whose agent reads the
    config through the /etc link and tells $NOTIFY_SOCKET READY=1 (NotifyAccess=all)."""
    root = tmp_path / "root"
    install(root, "--config", str(station))
    cfg = root / "var/lib/madoguchi/config/agent.toml"
    cfg.write_text(
        f'[agent]\nsite = "toda-city-hall-1f"\nname = "station-03"\n'
        f'data_dir = "{tmp_path / "data"}"\n[mqtt]\nhost = "127.0.0.1"\nport = 9\n'
    )
    (line,) = [
        ln.split("=", 1)[1]
        for ln in (root / "etc/systemd/system/madoguchi.service").read_text().splitlines()
        if ln.startswith("ExecStart=")
    ]
    argv = [
        a.replace("/opt/", f"{root}/opt/").replace("/etc/", f"{root}/etc/") for a in line.split()
    ]
    notify = NotifySocket()
    proc = subprocess.Popen(
        argv, env=notify.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert notify.wait_ready(proc, 60), proc.stderr.read().decode() if proc.stderr else ""
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1  # the agent is the supervisor's child
        cmdline = Path(f"/proc/{children[0]}/cmdline").read_bytes().split(b"\0")
        started = str(root / "opt/madoguchi/releases/current/bin/madoguchi").encode()
        assert started in cmdline and b"run" in cmdline, cmdline
    finally:
        proc.terminate()
        proc.wait(30)
        notify.close()
    assert proc.returncode == 0


def test_a_real_bundle_installs_as_a_release_beside_the_running_one(tmp_path: Path) -> None:
    """The fleet update's install step on the real `make bundle` tarball (not the test
    shortcut of tests/support/releases.py): verified against its signed manifest, a new
    venv built offline from the bundle's wheelhouse beside the running release, where
    the base install's `VERSION -> ../venv` link was; the running release untouched."""
    from agent.station.releases import Releases, verify
    from tests.support import releases

    tar = Path(_ENV["BUNDLE"])
    version = tar.name.removeprefix("madoguchi-bundle-").removesuffix(".tar.gz")
    key, pub = releases.keypair(tmp_path)
    m = verify(releases.signed(key, tar, version), pub)
    r = Releases(tmp_path / "releases")
    releases.tree(r.root / "0.0.9", releases.healthy("0.0.9"))
    r.point("0.0.9")
    (r.root / "base-venv").mkdir()
    (r.root / version).symlink_to("base-venv")  # what install.sh makes for its venv
    running = snapshot(r.root / "0.0.9")
    t0 = time.monotonic()
    dest = r.install(m, tar)
    took = time.monotonic() - t0
    assert dest == r.root / version and not dest.is_symlink()
    assert (r.root / "base-venv").is_dir()  # the link was replaced, not followed
    assert snapshot(r.root / "0.0.9") == running and r.current() == "0.0.9"
    out = subprocess.run(
        [str(dest / "bin" / "madoguchi"), "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"madoguchi {version}"
    (cfg := tmp_path / "agent.toml").write_text(
        f'[agent]\nsite = "s"\nname = "a"\ndata_dir = "{tmp_path / "data"}"\n'
        '[mqtt]\nhost = "127.0.0.1"\n'
    )
    r2 = subprocess.run(
        [str(dest / "bin" / "madoguchi"), "check-config", str(cfg)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r2.returncode == 0, r2.stdout + r2.stderr
    print(f"release {version} installed from the bundle's wheelhouse in {took:.1f} s")
