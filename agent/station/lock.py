"""One agent per data_dir, and a data_dir only its agent can read.

Two agents on one outbox (a technician's `madoguchi run` beside the service)
fight over the MQTT client id and the seq counter; an exclusive `flock` on
`{data_dir}/agent.lock` for the life of the process makes the second one
refuse at once, naming the pid that holds it. The kernel drops the lock when
the holder dies (kill -9 included), so there is no stale lock to clean up.

The outbox holds barcode texts and card UIDs: the directory is 0700 and every
file in it 0600 whatever the umask the agent was started with (systemd sets
UMask=0077; a shell usually 022).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from agent.errors import DataDirLocked, MadoguchiError

LOCK_NAME = "agent.lock"
PRIVATE_UMASK = 0o077


class DataDirLock:
    """An exclusive, non-blocking flock on `{data_dir}/agent.lock`; `with` holds it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise `DataDirLocked` naming the holder's pid."""
        make_private_dir(self.data_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise MadoguchiError(f"{self.path}: cannot open the lock file: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder is not None else "another process"
                raise DataDirLocked(
                    f"{self.data_dir}: agent.data_dir is in use by {who} (lock {self.path})",
                    holder,
                ) from None
            raise MadoguchiError(f"{self.path}: cannot lock: {e.strerror}") from e
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (unlinking it would race)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() and len(text) <= 10 else None
    except OSError:
        return None


def make_private_dir(data_dir: Path) -> None:
    """Create `data_dir` 0700 (or tighten it to 0700 if it exists and is ours)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = data_dir.stat()
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
            data_dir.chmod(0o700)
    except OSError as e:
        raise MadoguchiError(f"{data_dir}: agent.data_dir: {e.strerror}") from e


def make_private(data_dir: Path) -> int:
    """chmod 0700 every directory and 0600 every regular file under `data_dir` that is ours
    (outbox, WAL, SHM, side files, keys, token, blobs); sockets keep their mode. Returns how
    many modes changed."""
    changed = 0
    uid = os.geteuid()
    for root, dirs, files in os.walk(data_dir):
        for name, want, kind in [(d, 0o700, stat.S_ISDIR) for d in dirs] + [
            (f, 0o600, stat.S_ISREG) for f in files
        ]:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
                if kind(st.st_mode) and st.st_uid == uid and stat.S_IMODE(st.st_mode) != want:
                    os.chmod(p, want)
                    changed += 1
            except OSError:
                continue  # gone meanwhile, or not ours to change
    return changed
