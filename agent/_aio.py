"""Small asyncio helpers every side uses: backoff, socket options, cancellation, ASGI serving.

Private to the package; station and central both import it, so it imports
neither (and no third-party library at import time).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

#: Every MQTT client socket of ours. MQTT is request/answer in small packets: with
#: Nagle on, a PUBLISH written while our last PUBACK is unacknowledged waits for the
#: peer's delayed ACK (40 ms on Linux). Measured: registry p50 4 ms -> 31 ms at 100 scans/s.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


class Backoff:
    """Exponential backoff with full jitter, reset after a good connection."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11 `asyncio.wait_for` (inside aiomqtt's publish/subscribe) returns
    normally when the broker's answer lands together with our cancellation; the
    task is then "cancelling" but carries on, and a `while True` loop would go on
    waiting and shutdown would hang.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@asynccontextmanager
async def asgi_server(
    app: Any, sockets: list[socket.socket], **options: Any
) -> AsyncIterator[None]:
    """Serve `app` with uvicorn on sockets we bound, until the block ends.

    Not `uvicorn.Server.serve()`: that installs its own signal handlers and exits the
    process on a bind error, and the process (cli) owns both. `options` override the
    defaults (e.g. `limit_concurrency`, `timeout_graceful_shutdown`).
    """
    import uvicorn

    settings: dict[str, Any] = {
        "lifespan": "off",
        "log_config": None,
        "access_log": False,  # a URL is all it would say; keep the journal for problems
        "server_header": False,
        "date_header": False,
        "proxy_headers": False,
        "ws": "none",
        "timeout_graceful_shutdown": 3,
        **options,
    }
    config = uvicorn.Config(app, **settings)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    server.server_state.default_headers = list(config.encoded_headers)
    await server.startup(sockets=sockets)
    try:
        yield
    finally:
        if getattr(server, "servers", None):
            await server.shutdown(sockets=sockets)
