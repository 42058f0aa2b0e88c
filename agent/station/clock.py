"""Is the wall clock synchronized? A Raspberry Pi has no RTC.

After a power cut a Pi boots with the time of its last shutdown (fake-hwclock)
or 1970 until NTP answers. Every record carries `clock_synced` next to
`captured_at`, so the registry can tell a real timestamp from a guess.

The kernel knows: NTP daemons (systemd-timesyncd, chrony, ntpd) clear
`STA_UNSYNC` in the kernel's time status once they discipline the clock, and
`adjtimex()` then no longer returns `TIME_ERROR`. That is what `timedatectl`
shows as "System clock synchronized". A read-only `adjtimex` (modes = 0) needs
no privilege and no subprocess, so it is cheap enough to call for every record.

Under systemd, `ProtectClock=yes` denies the whole `@clock` syscall group,
read-only calls included, so the unit allows `adjtimex` explicitly and keeps
the clock safe by having no CAP_SYS_TIME instead (see systemd/madoguchi.service).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

STA_UNSYNC = 0x0040
STA_NANO = 0x2000  # `time_usec` holds nanoseconds (chrony and ntpd may switch it on)
TIME_ERROR = 5


class Timex(ctypes.Structure):
    """glibc's `struct timex` (the legacy, `long`-based layout of the `adjtimex` symbol)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


def _load_adjtimex() -> Callable[[ctypes._Pointer[Timex]], int] | None:
    # the process's own symbols include libc's: no ctypes.util.find_library, which runs
    # ldconfig and loads tempfile and shutil into every station (issue #18)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for symbol in ("adjtimex", "ntp_adjtime"):
        fn = getattr(libc, symbol, None)
        if fn is not None:
            fn.argtypes = [ctypes.POINTER(Timex)]
            fn.restype = ctypes.c_int
            return fn  # type: ignore[no-any-return]
    return None


_adjtimex = _load_adjtimex()
_warned = False


def read_timex() -> tuple[int, Timex] | None:
    """(clock state, struct timex) of a read-only adjtimex, or None if it is not available."""
    global _warned
    if _adjtimex is None:
        return None
    tx = Timex()  # modes = 0: read only
    state = _adjtimex(ctypes.pointer(tx))
    if state < 0:
        if not _warned:
            errno = ctypes.get_errno()
            log.warning("adjtimex failed (errno %d): clock_synced is unknown", errno)
            _warned = True
        return None
    return state, tx


def clock_synced() -> bool | None:
    """True if an NTP daemon has synchronized the clock, False if not, None if unknown."""
    got = read_timex()
    if got is None:
        return None
    state, tx = got
    return synced(state, tx.status)


def synced(state: int, status: int) -> bool:
    """The kernel's verdict, as glibc's `ntp_gettime` and timedated read it."""
    return state != TIME_ERROR and not status & STA_UNSYNC
