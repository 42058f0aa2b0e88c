"""Bounds on the local API's connections, so no client can jam the kiosk's own requests.

uvicorn alone has neither a header timeout nor a connection cap that spares the
kiosk: 70 idle sockets filled `limit_concurrency` (the kiosk got 503), and 1,100
slow-header sockets exhausted the process's descriptors (the uplink could not
reconnect). Here, per connection:

- a request's header must be complete within `header_timeout_s` of the
  connection waiting for it (new, or after the previous response), and its body
  within `body_timeout_s` of the header; else the connection is closed;
- at `max_connections` a new connection closes the oldest one that has no
  request in flight (idle, or still sending a header), so the kiosk's next
  request always gets in; only when every connection is busy is the new one
  closed;
- the cap is brought under the process's descriptor limit at start (what
  LimitNOFILE= allows, minus the rest of the agent and one accept burst), so the
  cap closes connections before accept() can fail;
- the cap alone cannot bound descriptors: asyncio accepts a whole burst before
  any connection is counted, and a closed connection's descriptor is released a
  loop turn later. So when the process comes within one burst of the limit,
  accepting is paused (the listening sockets leave the selector; new clients wait
  in the kernel's backlog) and idle connections are closed until a burst fits
  again; it resumes when one closes, or within a second at the latest;
- if accept() fails anyway (EMFILE / ENFILE: descriptors taken elsewhere), the
  oldest idle connection is closed so that the retry gets in, and it is logged
  once when it starts and once when it ends, with the count, never a line per try.

The protocol is uvicorn's own h11 one with these hooks; `BoundedHttp.protocol_class()`
is handed to uvicorn as its `http` class.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.config import ApiSection

log = logging.getLogger(__name__)

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: the most connections one accept burst takes: asyncio on 3.11 accepts up to its `backlog`
#: per wake-up, before any of them is counted here, and on EMFILE goes on trying (and
#: reporting) for the rest of the burst (uvicorn's default of 2048 made that thousands of
#: log lines). Small, so that pausing near the descriptor limit has little to outrun.
ACCEPT_BACKLOG = 16
#: the kernel's queue of connections waiting for accept() (set after asyncio's listen())
LISTEN_QUEUE = 64
#: descriptors the rest of the agent may hold: outbox (db, WAL, SHM, side files), the MQTT
#: socket, devices, blobs, the event loop's own, logging, pcscd, udev
RESERVED_FDS = 64
#: kept free under the limit by the cap fitted at start: the loop can take a second burst
#: before the first one's connections are counted, and closed connections release their
#: descriptors a loop turn later (the 128 is from when bursts were 64; kept as headroom)
BURST_RESERVE = 128
#: accepting pauses when no more than this many descriptors are left (two bursts and a
#: margin) and resumes above it; while paused, idle connections are closed to make
#: _EVICT_TO_ROOM
_PAUSE_ROOM = 2 * ACCEPT_BACKLOG + 16
_EVICT_TO_ROOM = _PAUSE_ROOM + 16


def _fds_in_use() -> int:
    """Descriptors this process holds now (0 where /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class BoundedHttp:
    """The shared state of one server's connections: who is open, what was closed and why."""

    def __init__(self, config: ApiSection) -> None:
        self.max_connections = config.max_connections
        self.header_timeout_s = config.header_timeout_s
        self.body_timeout_s = config.body_timeout_s
        self.open: dict[BoundedH11Protocol, None] = {}  # insertion order: oldest first
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self.resource_errors = 0  # accept() failing for want of descriptors, in all
        self.resource_episodes = 0  # runs of those errors (each logged once when it began)
        self._resource_since: int | None = None  # resource_errors when this episode began
        self._resource_last = 0.0  # monotonic time of the last one
        self.pauses = 0  # times accepting was paused near the descriptor limit
        self._fd_limit: int | None = None  # RLIMIT_NOFILE's soft limit, when finite
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[int] = []
        self._paused: dict[int, tuple[Callable[..., object], tuple[Any, ...]]] = {}
        # listening fd -> its accept callback and arguments, while paused
        self._resume_timer: asyncio.TimerHandle | None = None

    def protocol_class(self) -> type[BoundedH11Protocol]:
        """A protocol class bound to this state, for uvicorn's `http=`."""
        return type("BoundedH11Protocol", (BoundedH11Protocol,), {"bounds": self})

    def describe(self) -> dict[str, Any]:
        return {
            "open": len(self.open),
            "max_connections": self.max_connections,
            "evicted": self.evicted,
            "refused": self.refused,
            "timed_out": self.timed_out,
            "resource_errors": self.resource_errors,
            "resource_episodes": self.resource_episodes,
            "out_of_descriptors": self._resource_since is not None,
            "accept_paused": bool(self._paused),
            "accept_pauses": self.pauses,
        }

    # -- the connections -----------------------------------------------------------

    def admit(self, proto: BoundedH11Protocol) -> bool:
        """Make room for `proto`; False if every other connection is busy (it is closed)."""
        if self._resource_since is not None and time.monotonic() - self._resource_last > 2.0:
            n = self.resource_errors - self._resource_since
            log.warning("api: accepting connections again after %d descriptor error(s)", n)
            self._resource_since = None
        if len(self.open) >= self.max_connections:
            victim = next((p for p in self.open if not p.busy), None)
            if victim is None:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning(
                        "api: %d connections, all busy: new one closed (%d so far)",
                        len(self.open),
                        self.refused,
                    )
                return False
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 1000 == 0:
                log.warning(
                    "api: at max_connections=%d: closed the oldest idle connection "
                    "(%d so far; see api.max_connections)",
                    self.max_connections,
                    self.evicted,
                )
            self.close(victim)
        self.open[proto] = None
        self._guard_descriptors()
        return True

    def close(self, proto: BoundedH11Protocol) -> None:
        self.open.pop(proto, None)
        proto.close_now()

    def gone(self, proto: BoundedH11Protocol) -> None:
        self.open.pop(proto, None)
        if self._paused:
            self._try_resume()

    def timeout(self, proto: BoundedH11Protocol, phase: str) -> None:
        self.timed_out += 1
        log.debug("api: closed a connection that sent no complete %s in time", phase)
        self.close(proto)

    # -- descriptors -------------------------------------------------------------------

    def fit_descriptors(self) -> None:
        """Bring the cap under the process's descriptor limit (RLIMIT_NOFILE, systemd's
        LimitNOFILE=), leaving room for the rest of the agent and one accept burst, so that
        connections are closed by the cap before accept() can fail for want of descriptors."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        fits = max(4, soft - max(RESERVED_FDS, _fds_in_use() + 16) - BURST_RESERVE)
        if fits < self.max_connections:
            log.warning(
                "api: max_connections=%d does not fit the descriptor limit %d; using %d "
                "(raise LimitNOFILE= to allow more)",
                self.max_connections,
                soft,
                fits,
            )
            self.max_connections = fits

    # -- pausing accept() near the limit ----------------------------------------------

    def watch_listeners(self, loop: asyncio.AbstractEventLoop, sockets: list[Any]) -> None:
        """Let the server pause these listening sockets near the descriptor limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._fd_limit = None if soft == resource.RLIM_INFINITY else soft
        self._loop = loop
        self._listeners = [s.fileno() for s in sockets]

    def _room(self) -> int:
        """Descriptors left under the limit (a large number where there is no limit)."""
        if self._fd_limit is None:
            return 1 << 30
        return self._fd_limit - _fds_in_use()

    def _guard_descriptors(self) -> None:
        """Within one accept burst (and a margin) of the limit: stop accepting."""
        if self._paused or self._loop is None or self._fd_limit is None:
            return
        if self._room() > _PAUSE_ROOM:
            return
        selector = getattr(self._loop, "_selector", None)  # asyncio's selector loops
        if selector is None:
            return  # another loop: the cap and the EMFILE handler below still hold
        for fd in self._listeners:
            try:
                handle = selector.get_key(fd).data[0]
                # copied before remove_reader(), which cancels the handle and clears them
                callback, args = handle._callback, handle._args
            except (KeyError, ValueError, IndexError, AttributeError):
                continue
            if callback is None or not self._loop.remove_reader(fd):
                continue
            self._paused[fd] = (callback, args)
        if not self._paused:
            return
        self.pauses += 1
        if self.pauses == 1 or self.pauses % 1000 == 0:
            log.warning(
                "api: near the descriptor limit %d with %d connections: accepting paused "
                "(%d time(s) so far; see LimitNOFILE= and api.max_connections)",
                self._fd_limit,
                len(self.open),
                self.pauses,
            )
        self._try_resume()

    def _try_resume(self) -> None:
        """Accept again once a burst fits; until then close idle connections (the
        oldest first, never the newest) and look again when one is gone, or in a
        second. Where closing cannot make room (descriptors held elsewhere), accept
        again as soon as one burst fits: a deaf kiosk is worse than a short one."""
        if self._loop is None or not self._paused:
            return
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        room = self._room()
        idle = [p for p in self.open if not p.busy][:-1]
        if room > _PAUSE_ROOM or (room > 2 * ACCEPT_BACKLOG and not idle):
            for fd, (callback, args) in self._paused.items():
                with contextlib.suppress(OSError, ValueError):  # closed while paused
                    self._loop.add_reader(fd, callback, *args)
            self._paused.clear()
            return
        for victim in idle[: _EVICT_TO_ROOM - room]:
            self.evicted += 1
            self.close(victim)
        self._resume_timer = self._loop.call_later(1.0, self._try_resume)

    def stop_watching(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        self._paused.clear()  # the listening sockets are being closed
        self._loop = None

    def exception_handler(
        self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
    ) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]:
        """A loop exception handler that counts accept()'s resource errors (asyncio would log
        each one, and retries every second) and passes everything else on."""

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> object:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
                self.resource_errors += 1
                self._resource_last = time.monotonic()
                if self._resource_since is None:
                    self._resource_since = self.resource_errors - 1
                    self.resource_episodes += 1
                    log.error(
                        "api: cannot accept connections: %s (%d open connections, "
                        "api.max_connections=%d); retrying each second",
                        exc.strerror or exc,
                        len(self.open),
                        self.max_connections,
                    )
                # free a descriptor for the retry (asyncio accepts again in a second)
                victim = next((p for p in self.open if not p.busy), None)
                if victim is not None:
                    self.evicted += 1
                    self.close(victim)
                return None
            if previous is not None:
                return previous(loop, context)
            loop.default_exception_handler(context)
            return None

        return handle


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's header and body."""

    bounds: BoundedHttp  # set by BoundedHttp.protocol_class()

    _deadline: asyncio.TimerHandle | None = None
    _phase: str | None = None

    @property
    def busy(self) -> bool:
        """A request is in flight (being answered, or its body being read)."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.bounds.admit(self):
            self.close_now()
            return
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.bounds.gone(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def close_now(self) -> None:
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- deadlines ---------------------------------------------------------------------

    def _follow(self) -> None:
        """Arm the deadline of the phase the client is in; a phase is timed from its start."""
        state = self.conn.their_state
        if state is h11.IDLE and not self.busy:
            phase: str | None = "header"
        elif state is h11.SEND_BODY:
            phase = "body"
        else:
            phase = None  # the request is complete: the answer (or an event stream) is ours
        if phase == self._phase:
            return
        self._disarm()
        self._phase = phase
        if phase is not None and self.transport is not None and not self.transport.is_closing():
            b = self.bounds
            delay = b.header_timeout_s if phase == "header" else b.body_timeout_s
            self._deadline = self.loop.call_later(delay, self.bounds.timeout, self, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = None
