"""How every long-running command runs: logging set up once, a stop event set by
SIGTERM / SIGINT, and the project's errors as one line and exit status 1."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from agent import logsetup
from agent.errors import MadoguchiError
from agent.logsetup import LogFormat

log = logging.getLogger("agent")


def setup_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Priority prefixes under systemd, JSON when asked (agent/logsetup.py)."""
    logsetup.setup_logging(level, fmt)


def run_until_signal(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `body(stop)`; SIGTERM / SIGINT set `stop` so it can finish cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    asyncio.run(main())
    return 0


def run_service(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """`run_until_signal`, with the project's errors logged (they name file, key or
    device) and exit status 1 instead of a traceback."""
    failed = False
    try:
        run_until_signal(body)
    except* MadoguchiError as group:  # (no `return` is allowed inside except*)
        failed = True
        for e in group.exceptions:
            log.error("%s", " ".join(str(e).split()))  # one line, even from a library
    return 1 if failed else 0
