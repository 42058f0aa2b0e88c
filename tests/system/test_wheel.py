"""The wheel is the product: built, installed into a fresh venv outside the checkout,
and run from a directory outside it, it finds its profiles and runs the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support.bundle import ROOT, isolated_pip_env, x86_64_bundle

pytestmark = [pytest.mark.slow, pytest.mark.broker]

CONFIG = """
[agent]
site = "toda-city-hall-1f"
name = "station-03"

[mqtt]
host = "127.0.0.1"

[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
port = "/dev/ttyUSB0"
"""


def run(cmd: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a venv (no system site-packages) holding the wheel and its deps only."""
    work = tmp_path_factory.mktemp("wheel")
    env = isolated_pip_env()
    r = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work), str(ROOT)],
        work,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = work.glob("madoguchi-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    profiles = sorted(p.name for p in (ROOT / "device_profiles").glob("*.toml"))
    assert (
        sorted(n.split("/")[-1] for n in names if n.startswith("agent/device_profiles/"))
        == profiles
    )
    assert "agent/station/kiosk/static/index.html" in names
    assert "agent/station/kiosk/static/app.js" in names
    assert "agent/central/dashboard_static/index.html" in names
    assert "SPDX" not in r.stderr and "deprecat" not in r.stderr.lower()

    # Dependencies from the offline bundle's wheels: no index at all.
    with tarfile.open(x86_64_bundle(tmp_path_factory)) as t:
        t.extractall(work / "bundle", filter="data")
    (wheels,) = (work / "bundle").glob("madoguchi-bundle-*/wheels/x86_64")
    venv = work / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)], work).returncode == 0
    r = run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-index",
         "--find-links", str(wheels), f"{wheel}[serial,interpret]"],
        work, env=isolated_pip_env(PIP_NO_INDEX="1"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return venv / "bin"


def test_the_installed_wheel_is_not_the_checkout(installed: Path) -> None:
    r = run(
        [
            str(installed / "python"),
            "-c",
            "import agent.config as c; print(c.__file__); print(c.BUNDLED_PROFILE_DIR)",
        ],
        installed,
    )
    module, profiles = r.stdout.split()
    assert "site-packages" in module and not module.startswith(str(ROOT))
    assert Path(profiles) == Path(module).parent / "device_profiles"
    assert (Path(profiles) / "generic-serial-scanner.toml").is_file()


def test_check_config_with_a_bundled_profile(installed: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"  # no device_profiles/ beside it
    cfg.write_text(CONFIG)
    r = run([str(installed / "madoguchi"), "check-config", str(cfg)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ticket-scanner: driver serial, profile generic-serial-scanner" in r.stdout


def test_decode(installed: Path, tmp_path: Path) -> None:
    r = run([str(installed / "madoguchi"), "decode", "111122410000012345"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "Traceback" not in r.stderr


def test_demo(installed: Path, tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is missing: run `make setup`")
    env = isolated_pip_env(PATH=f"{installed}:/usr/sbin:/usr/bin:/bin")
    r = run([str(installed / "madoguchi"), "demo", "--scans", "3"], tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 scans, every one stored by the registry once (outbox unconfirmed: 0)" in r.stdout
    assert "Traceback" not in r.stderr
