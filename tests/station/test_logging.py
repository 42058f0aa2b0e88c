"""Logging under systemd and for collectors, and retries logged once per state change."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.drivers.hid import HidDriver
from agent.logrepeat import Repeats, span
from agent.logsetup import HANDLER_NAME, priority, setup_logging, under_journald
from agent.station.app import StationApp
from agent.testing import FakeBackend, FakeInputDevice


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for h in list(root.handlers):
        if h.get_name() == HANDLER_NAME:
            root.removeHandler(h)
    root.setLevel(level)
    assert all(h in root.handlers for h in handlers)


def journal_file(tmp_path: Path) -> tuple[io.TextIOWrapper, dict[str, str]]:
    """A stream and the JOURNAL_STREAM that names it, as systemd sets it."""
    f = (tmp_path / "journal").open("w+")
    st = os.fstat(f.fileno())
    return f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_priorities_follow_syslog() -> None:
    assert [priority(x) for x in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    assert priority(25) == 6 and priority(5) == 7


def test_under_systemd_lines_carry_priority_and_no_timestamp(
    tmp_path: Path, restore_root: None
) -> None:
    stream, env = journal_file(tmp_path)
    assert under_journald(stream, env)
    setup_logging("DEBUG", "text", stream=stream, environ=env)
    log = logging.getLogger("agent.test")
    log.warning("camera-1: unavailable")
    log.error("two\nlines")
    log.debug("detail")
    stream.seek(0)
    assert stream.read().splitlines() == [
        "<4>agent.test: camera-1: unavailable",
        "<3>agent.test: two",
        "<3>lines",
        "<7>agent.test: detail",
    ]


def test_journal_stream_of_another_file_is_not_ours(tmp_path: Path, restore_root: None) -> None:
    _, env = journal_file(tmp_path)
    other = (tmp_path / "other").open("w+")
    assert not under_journald(other, env)
    setup_logging("INFO", "text", stream=other, environ=env)
    logging.getLogger("agent.test").info("hello")
    other.seek(0)
    line = other.read().strip()
    assert not line.startswith("<") and line.endswith("INFO agent.test: hello")
    assert line[:4].isdigit()  # a terminal gets its own timestamp


def test_json_lines_for_collectors(tmp_path: Path, restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out, environ={})
    log = logging.getLogger("agent.test")
    log.warning("外部 %s", "broker")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(x) for x in out.getvalue().splitlines())
    assert first["message"] == "外部 broker"
    assert (first["level"], first["priority"], first["logger"]) == ("WARNING", 4, "agent.test")
    assert first["time"].endswith("+00:00")
    assert "ValueError: boom" in second["exception"]
    stream, env = journal_file(tmp_path)
    setup_logging("INFO", "json", stream=stream, environ=env)
    log.info("x")
    stream.seek(0)
    line = stream.read().strip()
    assert line.startswith("<6>{") and json.loads(line[3:])["message"] == "x"


def test_setup_twice_keeps_one_handler_and_quietens_linuxpy(restore_root: None) -> None:
    setup_logging("INFO", stream=io.StringIO(), environ={})
    setup_logging("DEBUG", stream=io.StringIO(), environ={})
    ours = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 1
    assert logging.getLogger("linuxpy.device").getEffectiveLevel() == logging.WARNING


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeating_failure_is_logged_once_then_summarised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    rep = Repeats(logging.getLogger("agent.station"), "camera-1", 600, clock=clock)
    caplog.set_level(logging.INFO, "agent.station")
    detail = "cannot open /dev/v4l/by-id/usb-cam-video-index0: No such device"
    for _ in range(46):  # every 3-5 s for 10 minutes
        rep.failed("unavailable", detail)
        clock.now += 13
    assert [r.getMessage() for r in caplog.records] == [f"camera-1: {detail}"]
    clock.now = 1000.0 + 600
    rep.failed("unavailable", detail)
    assert caplog.records[-1].getMessage() == "camera-1: still unavailable (47 attempts in 10 min)"
    assert caplog.records[-1].levelno == logging.WARNING
    rep.failed("unavailable", detail)
    assert len(caplog.records) == 2
    rep.failed("failing", "not an input device", logging.ERROR)  # a new state: at once
    assert caplog.records[-1].getMessage() == "camera-1: not an input device"
    assert caplog.records[-1].levelno == logging.ERROR
    assert rep.ok("connected")
    assert caplog.records[-1].getMessage().startswith("camera-1: connected after 1 failed")
    assert not rep.ok()  # working stays quiet
    assert len(caplog.records) == 4


def test_spans_read_like_a_person_says_them() -> None:
    assert [span(s) for s in (5, 89, 600, 5399, 5400, 36000)] == [
        "5 s",
        "89 s",
        "10 min",
        "90 min",
        "1.5 h",
        "10.0 h",
    ]


def test_a_missing_camera_logs_once_in_the_agent(tmp_path: Path) -> None:
    """The real agent, a camera that is not there, 3 s: one line about it, not one per retry."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nsite = "s"\nname = "a"\ndata_dir = "data"\n'
        '[mqtt]\nhost = "127.0.0.1"\nport = 1\n'
        '[[devices]]\nname = "camera-1"\nprofile = "generic-uvc-webcam"\n'
        f'device = "{tmp_path}/video-gone"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JOURNAL_STREAM": "1:1"},  # not our stderr: plain lines
    )
    try:
        _, err = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    camera = [x for x in err.splitlines() if "camera-1" in x]
    assert len(camera) == 1, err
    assert "video-gone" in camera[0]
    assert not [x for x in err.splitlines() if "opening" in x], err


def test_a_refused_start_under_systemd_is_an_error_line(tmp_path: Path) -> None:
    """`run` that cannot start says why at priority err, so `journalctl -p err` shows it."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nsite = "s"\nname = "a"\n[mqtt]\nhost = "127.0.0.1"\n'
        'tls_ca = "/nonexistent/ca.crt"\n'
    )
    err = tmp_path / "stderr"
    with err.open("w") as f:
        st = os.fstat(f.fileno())
        subprocess.run(
            [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
            stderr=f,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            timeout=30,
            check=False,
        )
    assert err.read_text().splitlines() == [
        f"<3>{cfg}: mqtt.tls_ca: /nonexistent/ca.crt: not found"
    ]


def test_a_flapping_device_is_one_failure_until_it_stays_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    rep = Repeats(logging.getLogger("agent.station"), "camera-1", 600, clock=clock, stable_s=60)
    caplog.set_level(logging.INFO, "agent.station")
    for _ in range(60):  # opens, no frame for 5 s, reopens: for 10 minutes
        rep.failed("unavailable", "no frame for 5 s")
        clock.now += 2
        rep.ok("connected")
        clock.now += 8
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "camera-1: no frame for 5 s",
        "camera-1: connected after 1 failed attempt(s) in 2 s",
    ]
    rep.failed("unavailable", "no frame for 5 s")  # 8 s after the last open: still flapping
    assert caplog.records[-1].getMessage() == "camera-1: still unavailable (61 attempts in 10 min)"
    rep.ok("connected")
    clock.now += 61  # it stayed up: the next failure is news again
    rep.failed("unavailable", "no frame for 5 s")
    assert caplog.records[-1].getMessage() == "camera-1: no frame for 5 s"
    assert rep.attempts == 1
    assert rep.ok("connected")


class NotInputBackend(FakeBackend):
    """A configured path that is there but is no input device (ENOTTY on EVIOCGVERSION)."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0
        self.tried_4_times = threading.Event()

    def open(self, path: str) -> FakeInputDevice:
        self.tries += 1
        if self.tries >= 4:
            self.tried_4_times.set()
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device", path)


async def test_a_hid_path_that_is_no_input_device_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nsite = "s"\nname = "a"\ndata_dir = "data"\n'
        '[mqtt]\nhost = "127.0.0.1"\nport = 9\nbackoff_max_s = 0.5\n'
        '[[devices]]\nname = "desk-hid"\nprofile = "generic-hid-scanner-us"\n'
        'path = "/dev/ttyS0"\n'
    )
    backend = NotInputBackend()
    app = StationApp(
        load_config(cfg), driver_factory=lambda d: HidDriver(d, backend=backend, hotplug=None)
    )
    caplog.set_level(logging.INFO)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(app.run(stop))
        assert await asyncio.to_thread(backend.tried_4_times.wait, 30)
        stop.set()
    assert backend.tries >= 4
    about = [r for r in caplog.records if "desk-hid" in r.getMessage()]
    assert len(about) == 1, [r.getMessage() for r in about]
    assert "/dev/ttyS0" in about[0].getMessage() and about[0].levelno == logging.ERROR
    # the broker at port 9 refused every reconnect meanwhile: one line too
    broker = [r.getMessage() for r in caplog.records if "broker 127.0.0.1:9" in r.getMessage()]
    assert broker == ["broker 127.0.0.1:9: [Errno 111] Connection refused"], broker
