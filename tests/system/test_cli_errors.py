"""Every command on every bad input a user can give: one line on stderr, exit 1, no traceback.

Each case runs the real command in its own process. A missing extra (uvicorn, psycopg,
evdev) is made missing for that process only, by a small runner that puts None in
sys.modules for it (what `import` then reports is exactly a missing package's
ModuleNotFoundError), so the dev venv with every extra can test them all.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.testing import free_port

RUNNER = """\
import sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
from agent.cli.main import main
sys.exit(main(sys.argv[2:]))
"""

STATION = """\
[agent]
site = "s"
name = "a"
data_dir = "data"
[mqtt]
host = "127.0.0.1"
port = {port}
"""


@dataclass
class Case:
    """argv (with {dir} for the case's directory), modules made missing, what the line says."""

    id: str
    argv: list[str]
    says: str
    missing: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] = lambda d: None


def station(d: Path, extra: str = "", name: str = "agent.toml") -> None:
    (d / name).write_text(STATION.format(port=free_port()) + extra)


def shift_jis(d: Path) -> None:
    (d / "agent.toml").write_bytes(
        ("# 受付窓口\n" + STATION.format(port=free_port())).encode("cp932")
    )


def junk(d: Path, name: str = "junk.db") -> None:
    (d / name).write_bytes(os.urandom(4096))


def outbox_junk(d: Path) -> None:
    station(d)
    (d / "data").mkdir()
    junk(d / "data", "outbox.db")


HID = '[[devices]]\nname = "desk-hid"\nprofile = "zebra-symbol-hid"\n'
PG = "postgresql://madoguchi@127.0.0.1:{port}/registry?connect_timeout=3"

CASES = [
    Case("check-config-shift-jis", ["check-config", "{dir}/agent.toml"],
         "agent.toml: not UTF-8 (it looks like Shift_JIS): save it as UTF-8", setup=shift_jis),
    Case("check-config-missing-file", ["check-config", "{dir}/nope.toml"],
         "nope.toml: (file): not found"),
    Case("check-config-directory", ["check-config", "{dir}"], "is a directory"),
    Case("check-config-missing-tls-ca", ["check-config", "{dir}/agent.toml"],
         "agent.toml: mqtt.tls_ca: /nonexistent/ca.crt: not found",
         setup=lambda d: station(d, 'tls_ca = "/nonexistent/ca.crt"\n')),
    Case("check-config-missing-extra", ["check-config", "{dir}/agent.toml"],
         "devices[\"desk-hid\"]: driver hid needs Python module 'evdev'", missing=["evdev"],
         setup=lambda d: station(d, HID)),
    Case("run-shift-jis", ["run", "--config", "{dir}/agent.toml"], "(it looks like Shift_JIS)",
         setup=shift_jis),
    Case("run-missing-tls-ca", ["run", "--config", "{dir}/agent.toml"],
         "agent.toml: mqtt.tls_ca: /nonexistent/ca.crt: not found",
         setup=lambda d: station(d, 'tls_ca = "/nonexistent/ca.crt"\n')),
    Case("run-tls-ca-not-pem", ["run", "--config", "{dir}/agent.toml"],
         "ca.crt: not a PEM file",
         setup=lambda d: ((d / "ca.crt").write_text("garbage"),
                          station(d, f'tls_ca = "{d}/ca.crt"\n'))[-1]),
    Case("run-kiosk-without-uvicorn", ["run", "--config", "{dir}/agent.toml"],
         "api: the kiosk API needs Python module 'uvicorn'", missing=["uvicorn"],
         setup=lambda d: station(d, "[api]\n")),
    Case("run-hid-without-evdev", ["run", "--config", "{dir}/agent.toml"],
         "pip install 'madoguchi[hid]'", missing=["evdev"], setup=lambda d: station(d, HID)),
    Case("outbox-stats-not-a-database", ["outbox", "stats", "--config", "{dir}/agent.toml"],
         "outbox.db: cannot read the outbox", setup=outbox_junk),
    Case("outbox-stats-shift-jis", ["outbox", "stats", "--config", "{dir}/agent.toml"],
         "(it looks like Shift_JIS)", setup=shift_jis),
    Case("registry-db-not-a-database", ["registry", "--port", "{free}", "--db", "{dir}/junk.db"],
         "junk.db: not an SQLite database", setup=junk),
    Case("registry-db-unwritable-path",
         ["registry", "--port", "{free}", "--db", "/proc/madoguchi-nope/registry.db"],
         "/proc/madoguchi-nope/registry.db: cannot create its directory"),
    Case("registry-db-unwritable-file", ["registry", "--port", "{free}", "--db", "/proc/version"],
         "/proc/version: not an SQLite database"),
    Case("registry-db-directory", ["registry", "--port", "{free}", "--db", "{dir}"],
         "is a directory, not a database file"),
    Case("registry-pg-without-psycopg", ["registry", "--port", "{free}", "--db", PG],
         "Python module 'psycopg' is not installed: pip install 'madoguchi[central]'",
         missing=["psycopg"]),
    Case("registry-pg-unreachable", ["registry", "--port", "{free}", "--db", PG],
         "PostgreSQL"),
    Case("dashboard-without-uvicorn", ["dashboard", "--port", "{free}", "--http-port", "{free}",
                                       "--token-file", "{dir}/token"],
         "Python module 'uvicorn' is not installed: pip install 'madoguchi[central]'",
         missing=["uvicorn"]),
    Case("dashboard-db-not-a-database",
         ["dashboard", "--port", "{free}", "--http-port", "{free}", "--db", "{dir}/junk.db",
          "--token-file", "{dir}/token"],
         "junk.db: not an SQLite database", setup=junk),
    Case("enroll-bad-out", ["enroll", "--site", "s", "--name", "a", "--out", "/proc/madoguchi-x"],
         "/proc/madoguchi-x"),
    Case("hid-replay-dev-null", ["hid-replay", "--layout", "us", "/dev/null"], "no key events"),
    Case("hid-replay-random-bytes", ["hid-replay", "--layout", "us", "{dir}/junk.db"],
         "no key events", setup=junk),
    Case("hid-watch-missing-device", ["hid-watch", "/dev/input/madoguchi-none"],
         "/dev/input/madoguchi-none"),
    Case("card-info-config-shift-jis", ["card-info", "--config", "{dir}/agent.toml"],
         "(it looks like Shift_JIS)", setup=shift_jis),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_one_line_exit_1_no_traceback(case: Case, tmp_path: Path) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    work = tmp_path / "case"
    work.mkdir()
    case.setup(work)
    (work / "token").write_text("technician " + "t" * 40 + "\n")
    (work / "token").chmod(0o600)
    argv = [
        a.replace("{dir}", str(work))
        .replace("{free}", str(free_port()))
        .replace("{port}", str(free_port()))
        for a in case.argv
    ]
    r = subprocess.run(
        [sys.executable, str(runner), ",".join(case.missing), *argv],
        capture_output=True,
        text=True,
        timeout=40,
        cwd=work,  # whatever a command writes beside itself stays in the case's directory
        check=False,
    )
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert case.says in lines[0], lines[0]
    assert r.returncode == 1, (r.returncode, r.stderr)


def test_demo_stops_its_broker_on_an_error_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo that fails after mosquitto started leaves no mosquitto behind."""
    from agent.cli import demo

    def broken(path: object) -> None:
        raise ConfigError([f"{path}: devices: no profile 'generic-serial-scanner'"])

    before = mosquitto_children()
    monkeypatch.setattr(demo, "load_config", broken)
    assert demo.run_demo(scans=1) == 1
    assert mosquitto_children() == before


def mosquitto_children() -> set[int]:
    """mosquitto processes whose parent is this test process."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if comm == "mosquitto" and ppid == os.getpid():
            out.add(int(entry.name))
    return out


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs filled to the last byte (ENOSPC for every write)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "data").mkdir()
        with (mnt / "fill").open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_run_on_a_full_disk_is_one_line_and_moves_nothing_aside(full_tmpfs: Path) -> None:
    cfg = full_tmpfs.parent / "agent.toml"
    cfg.write_text(STATION.format(port=free_port()).replace('"data"', f'"{full_tmpfs}/data"'))
    for _ in range(2):  # as systemd restarts it
        r = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=40,
            cwd=full_tmpfs.parent,
            check=False,
        )
        assert r.returncode == 1
        assert "Traceback" not in r.stderr, r.stderr
        errors = [x for x in r.stderr.splitlines() if " ERROR " in x]
        assert errors and all("disk full" in x.lower() for x in errors), r.stderr
        assert len(errors) <= 2  # the outbox's DISK FULL alert, then why run stopped
        assert not list((full_tmpfs / "data").glob("*.corrupt-*"))
