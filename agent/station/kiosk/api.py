"""The kiosk's local HTTP API, served inside the agent's event loop.

Starlette + uvicorn (h11, pure Python): about half the memory and disk of
aiohttp and no compiled wheels to find for an armv7 Pi (docs/kiosk.md).
uvicorn's `serve()` would install its own signal handlers and tick every
100 ms; the agent owns signals and the loop, so the server is started and
stopped on sockets bound here, and a bind failure is logged and retried
rather than ending the station: scans are stored whether or not a kiosk
page is listening.

This module only listens and assembles: the guard (guard.py), live events
(events.py), the routes (routes.py) and the OpenAPI document (openapi.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import stat
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from agent._aio import Backoff, asgi_server
from agent.config import ApiSection
from agent.errors import ApiError, MadoguchiError
from agent.station.kiosk.bounded import ACCEPT_BACKLOG, LISTEN_QUEUE, BoundedHttp
from agent.station.kiosk.events import EventHub
from agent.station.kiosk.guard import Guard, GuardMiddleware, error_response, load_token
from agent.station.kiosk.openapi import openapi_document
from agent.station.kiosk.routes import KioskStation, Routes

log = logging.getLogger(__name__)


class LocalApi:
    """Serves the kiosk API for one station until `stop` is set."""

    def __init__(self, station: KioskStation) -> None:
        cfg = station.config.api
        if cfg is None:
            raise MadoguchiError("api: no [api] section in the configuration")
        self.station = station
        self.config: ApiSection = cfg
        self.hub = EventHub(cfg.event_buffer)
        self.ready = asyncio.Event()
        self.guard = Guard(cfg)
        self.bounds = BoundedHttp(cfg)
        self.routes = Routes(
            station, cfg, self.hub, openapi_document, connections=self.bounds.describe
        )
        self.app = self._build_app()
        station.subscribe(self.hub.publish)

    @property
    def token(self) -> str:
        return self.guard.token

    @property
    def origin(self) -> str:
        return self.guard.origin

    @property
    def token_path(self) -> Path:
        p = self.config.token_file or Path("api-token")
        return p if p.is_absolute() else self.station.config.agent.data_dir / p

    # -- running ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            self.guard.token = load_token(self.token_path)
        except MadoguchiError as e:
            log.error("api: not serving: %s", e)
            return
        backoff = Backoff(first=1.0, cap=30.0)
        while not stop.is_set():
            try:
                sockets = self._bind()
            except MadoguchiError as e:
                log.error("api: %s; retrying", e)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next()):
                        await stop.wait()
                continue
            await self._serve(sockets, stop)
            return

    def _bind(self) -> list[socket.socket]:
        cfg = self.config
        sockets: list[socket.socket] = []
        try:
            infos = socket.getaddrinfo(
                cfg.host.strip("[]"), cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, addr = infos[0]
            tcp = socket.socket(family, kind, proto)
            sockets.append(tcp)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(addr)
            if cfg.unix_socket is not None:
                path = cfg.unix_socket
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()  # a stale socket from a previous run
                unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sockets.append(unix)
                unix.bind(str(path))
                path.chmod(0o660)
        except OSError as e:
            for s in sockets:
                s.close()
            where = f"{cfg.host}:{cfg.port}"
            if cfg.unix_socket is not None:
                where += f" / {cfg.unix_socket}"
            raise MadoguchiError(f"cannot listen on {where}: {e.strerror or e}") from e
        return sockets

    async def _serve(self, sockets: list[socket.socket], stop: asyncio.Event) -> None:
        # bounded.py: connection cap, header/body deadlines, descriptor errors logged once
        cfg = self.config
        self.bounds.fit_descriptors()
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(self.bounds.exception_handler(previous))
        try:
            async with asgi_server(
                self.app,
                sockets,
                http=self.bounds.protocol_class(),
                backlog=ACCEPT_BACKLOG,
                limit_concurrency=self.bounds.max_connections + 16,  # ours closes idle first
                timeout_keep_alive=cfg.idle_timeout_s,
                timeout_graceful_shutdown=2,  # SIGTERM ends within 5 s (issue #15)
            ):
                for s in sockets:
                    s.listen(LISTEN_QUEUE)  # a longer kernel queue than one accept burst
                self.bounds.watch_listeners(loop, sockets)
                log.info("api: serving the kiosk on %s", self.origin)
                self.ready.set()
                await stop.wait()
        finally:
            self.bounds.stop_watching()
            loop.set_exception_handler(previous)
            self.hub.close()
            for s in sockets:
                s.close()
            if self.config.unix_socket is not None:
                with contextlib.suppress(OSError):
                    self.config.unix_socket.unlink()

    # -- the application --------------------------------------------------------------

    def _build_app(self) -> Starlette:
        async def on_api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return error_response(exc)

        async def on_http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
            return error_response(ApiError(exc.status_code, code, str(exc.detail)))

        async def on_crash(request: Request, exc: Exception) -> Response:
            log.error("api: %s %s failed: %s", request.method, request.url.path, type(exc).__name__)
            return error_response(
                ApiError(500, "internal_error", "the agent could not answer this")
            )

        return Starlette(
            routes=self.routes.table(),
            middleware=[Middleware(GuardMiddleware, guard=self.guard)],
            exception_handlers={
                ApiError: on_api_error,
                HTTPException: on_http_error,
                Exception: on_crash,
            },
        )
