"""Live station events for the kiosk page: a numbered ring buffer and its SSE stream.

Every station event gets an id `<run>-<n>`; a page that reconnects with
`Last-Event-ID` gets what it missed from the buffer, or is told to resync
(`reset`) when the buffer no longer holds it or the agent restarted.
Personal data never enters an event body.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from agent.contract.records import iso_ms, utc_now
from agent.station.feedback import card_verdict, rejected_verdict, verdict

KEEPALIVE_S = 15.0
CLIENT_QUEUE = 1000  # events a slow SSE client may lag before it is cut off (it resumes)


def event_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the page gets of a station event: no personal data, a verdict, a time."""
    out = {k: v for k, v in body.items() if k != "personal"}
    if kind == "read_accepted":
        reference = body.get("verdict")  # the reference-data fact, kept beside the code
        out["reference"] = reference if isinstance(reference, dict) else None
        out["verdict"] = card_verdict(body.get("card_auth")) or verdict(
            body.get("interpretation"), out["reference"]
        )
    elif kind == "read_rejected":
        out["verdict"] = rejected_verdict(body.get("reason"))
    out["at"] = iso_ms(utc_now())
    return out


@dataclass(frozen=True, slots=True)
class Event:
    n: int
    kind: str
    data: str  # compact JSON, one line


@dataclass(slots=True, eq=False)  # hashed by identity: a set of followers
class _Client:
    queue: deque[Event] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    closed: bool = False


class EventHub:
    """Numbers every station event, keeps the last `size`, fans them out.

    Ids are `<run>-<n>`: `run` is new at every start, so a page that resumes
    with an id from before a restart is told to resync instead of silently
    missing what happened in between.
    """

    def __init__(self, size: int) -> None:
        self.run = secrets.token_hex(4)
        self.last = 0
        self._buffer: deque[Event] = deque(maxlen=size)
        self._clients: set[_Client] = set()
        self._closed = False

    def event_id(self, n: int) -> str:
        return f"{self.run}-{n}"

    def publish(self, kind: str, body: dict[str, Any]) -> None:
        if self._closed:
            return
        self.last += 1
        data = json.dumps(event_body(kind, body), ensure_ascii=False, separators=(",", ":"))
        ev = Event(self.last, kind, data)
        self._buffer.append(ev)
        for c in self._clients:
            if len(c.queue) >= CLIENT_QUEUE:
                c.overflowed = True
            else:
                c.queue.append(ev)
            c.wake.set()

    def attach(self, last_event_id: str | None) -> tuple[_Client, list[Event], str | None]:
        """A new follower, the events it missed, and why it must resync (or None)."""
        client = _Client()
        self._clients.add(client)
        if last_event_id is None:
            return client, [], None
        run, _, n_text = last_event_id.strip().rpartition("-")
        if run != self.run or not n_text.isdigit() or int(n_text) > self.last:
            return client, [], "restarted"
        n = int(n_text)
        oldest = self._buffer[0].n if self._buffer else self.last + 1
        if n < oldest - 1:
            return client, [], "gap"
        return client, [e for e in self._buffer if e.n > n], None

    def detach(self, client: _Client) -> None:
        self._clients.discard(client)

    def close(self) -> None:
        """End every stream (shutdown): clients reconnect to the next run."""
        self._closed = True
        for c in self._clients:
            c.closed = True
            c.wake.set()


def frame(kind: str, data: str, event_id: str | None = None) -> bytes:
    """One Server-Sent Events frame."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n".encode()


def stream(hub: EventHub, last_event_id: str | None) -> AsyncIterator[bytes]:
    """The SSE body for one page: `hello`, what it missed, then live events until closed."""
    client, backlog, reset = hub.attach(last_event_id)

    async def frames() -> AsyncIterator[bytes]:
        try:
            hello = {"run": hub.run, "missed": len(backlog), "reset": reset}
            first_id = None if (last_event_id and reset is None) else hub.event_id(hub.last)
            yield b"retry: 2000\n" + frame("hello", json.dumps(hello), first_id)
            for ev in backlog:
                yield frame(ev.kind, ev.data, hub.event_id(ev.n))
            while True:
                while client.queue:
                    ev = client.queue.popleft()
                    yield frame(ev.kind, ev.data, hub.event_id(ev.n))
                if client.closed or client.overflowed:
                    return  # a lagging page reconnects with Last-Event-ID
                client.wake.clear()
                try:
                    async with asyncio.timeout(KEEPALIVE_S):  # not wait_for: see uplink
                        await client.wake.wait()
                except TimeoutError:
                    yield b": keepalive\n\n"
        finally:
            hub.detach(client)

    return frames()
