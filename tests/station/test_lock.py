"""One agent per data_dir (agent/station/lock.py): the flock, its message, kill -9, modes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import DataDirLocked
from agent.station.lock import LOCK_NAME, DataDirLock, make_private

HOLD = """
import sys, time
from pathlib import Path
from agent.station.lock import DataDirLock
lock = DataDirLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(data_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_lock_names_the_holders_pid_and_kill9_frees_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = _holder(data)
    try:
        with pytest.raises(DataDirLocked) as err:
            DataDirLock(data).acquire()
        assert err.value.pid == proc.pid
        assert f"pid {proc.pid}" in str(err.value) and "\n" not in str(err.value)
        assert str(data) in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel dropped the lock with the process: no stale lock to clean up
    with DataDirLock(data) as lock:
        assert (data / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(DataDirLocked):
            DataDirLock(data).acquire()  # flock is per open file: this process too
    assert lock._fd is None
    DataDirLock(data).acquire()


def test_a_garbage_lock_file_still_locks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / LOCK_NAME).write_bytes(b"\xff" * 100 + b"not a pid")
    with DataDirLock(data):
        with pytest.raises(DataDirLocked) as err:
            DataDirLock(data).acquire()
        assert err.value.pid == os.getpid()


def test_make_private_tightens_what_umask_022_made(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "blobs").mkdir(parents=True, mode=0o755)
    data.chmod(0o755)
    (data / "blobs").chmod(0o755)
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm", "api-token", "blobs/a.blob"):
        (data / name).write_text("x")
        (data / name).chmod(0o644)
    with DataDirLock(data):
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert make_private(data) == 6  # five files and blobs/
        assert make_private(data) == 0
    for p in [data / "blobs", *data.rglob("*")]:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_an_unwritable_data_dir_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        data = blocker / "data"  # a path through a regular file: ENOTDIR even for root
    else:
        tmp_path.chmod(0o500)
        data = tmp_path / "data"
    from agent.errors import MadoguchiError

    with pytest.raises(MadoguchiError) as err:
        DataDirLock(data).acquire()
    assert str(data) in str(err.value) and "\n" not in str(err.value)


def test_lock_on_a_full_disk_still_excludes(tmp_path: Path) -> None:
    """ENOSPC (a real small tmpfs, filled): the pid cannot be written, the lock still holds."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        check=False,
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        data = mnt / "data"
        data.mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        assert full.value.errno == 28  # ENOSPC
        with DataDirLock(data):
            with pytest.raises(DataDirLocked) as err:
                DataDirLock(data).acquire()
            assert "in use by" in str(err.value)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
