"""sd_notify: tell systemd we are ready, how we are, that we are alive, that we stop.

The protocol is one datagram of `KEY=value` lines to the unix socket named by
`$NOTIFY_SOCKET` (a leading `@` means the abstract namespace). It is a few
lines, so it is written here rather than taken from a library.

The watchdog ping is sent by a task on the agent's own event loop: if the loop
is blocked or stuck, no ping goes out and systemd restarts the agent after
`WatchdogSec=`. That is the point; do not move the ping to a thread.

Without `$NOTIFY_SOCKET` (run by hand, in tests, in a container) every method
is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings: half of `$WATCHDOG_USEC`, if the watchdog is meant for us."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # inherited from a parent that is the watched process
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 2_000_000


class Notifier:
    """Sends service state to systemd. A no-op when `$NOTIFY_SOCKET` is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        name = env.get("NOTIFY_SOCKET") or None
        self.address: str | bytes | None = _address(name) if name else None
        self.interval = watchdog_interval(env) if self.address is not None else None
        self._sock: socket.socket | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a full receive queue: a lost
                # STATUS does not matter, a lost ping is repeated next period.
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as e:
            log.warning("sd_notify to %r failed: %s", self.address, e)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """`READY=1`: the outbox is open and the devices are started."""
        if status is None:
            return self._send("READY=1")
        return self._send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """`STATUS=`: what `systemctl status` shows, e.g. the outbox depth."""
        return self._send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """`STOPPING=1`: shutdown has begun (systemd then waits up to TimeoutStopSec)."""
        if status is None:
            return self._send("STOPPING=1")
        return self._send("STOPPING=1", f"STATUS={_one_line(status)}")

    def reloading(self, status: str | None = None) -> bool:
        """`RELOADING=1`: the loop restarts in this process (a remote configuration
        applied or rolled back); the next `READY=1` ends it. Not STOPPING=1: the service
        is not going away."""
        mono = f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        if status is None:
            return self._send("RELOADING=1", mono)
        return self._send("RELOADING=1", mono, f"STATUS={_one_line(status)}")

    def ping(self) -> bool:
        return self._send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping every half `WATCHDOG_USEC` from this event loop; returns at once if unwatched."""
        if self.interval is None:
            return
        while True:
            self.ping()
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
