"""The kiosk's local HTTP API, served inside the agent's event loop.

The touchscreen page on the same Pi talks to the station through it: live
events (Server-Sent Events, resumable by `Last-Event-ID`), manual entry
(answered only after the record is durable), PIN card reads and photos
(through a driver capability, agent/drivers/capabilities.py, and the station's
`capture_photo`), and status.

Starlette + uvicorn (h11, pure Python): about half the memory and disk of
aiohttp and no compiled wheels to find for an armv7 Pi (docs/kiosk.md).
uvicorn's `serve()` would install its own signal handlers and tick every
100 ms; the agent owns signals and the loop, so the server is started and
stopped on sockets bound here, and a bind failure is logged and retried
rather than ending the station: scans are stored whether or not a kiosk
page is listening.

Browser rules: loopback only (config), an exact `Origin` match, no CORS
wildcard, a `Host` check against DNS rebinding, and a bearer token on every
`/v1/` call. The page itself is public and carries no secret: the kiosk
launcher hands the token to it in the URL fragment, which never travels in
an HTTP request (docs/kiosk.md). The PIN and card contents are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import os
import secrets
import socket
import stat
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent._aio import Backoff, asgi_server
from agent.config import DEVICE_NAME_PATTERN, ApiSection
from agent.contract.records import Read, iso_ms, utc_now
from agent.drivers import DRIVERS
from agent.drivers.capabilities import CardInfoProvider
from agent.errors import CardError, DeviceUnavailable, MadoguchiError, OutboxError, PinRefused

if TYPE_CHECKING:
    from agent.station.station import Outcome, Station

log = logging.getLogger(__name__)

KIOSK_DIR = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 15.0
CLIENT_QUEUE = 1000  # events a slow SSE client may lag before it is cut off (it resumes)
MIN_TOKEN_CHARS = 32


class ApiError(MadoguchiError):
    """An answer other than 2xx, with a stable machine code for the page."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.code, "detail": self.detail, **self.extra}, status_code=self.status
        )


# -- request bodies (also the OpenAPI schemas) --------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManualEntry(_Body):
    """A barcode typed by staff because the printed one would not scan."""

    device: str = Field(
        pattern=DEVICE_NAME_PATTERN,
        max_length=64,
        description="Device the entry is stored under, as if it had scanned it.",
    )
    text: str = Field(
        min_length=1,
        max_length=4096,
        description="The barcode text; printable characters and GS (0x1D) only.",
    )


class CardInfoRequest(_Body):
    """The resident's PIN for the card's 4 attributes (券面事項入力補助AP)."""

    pin: str = Field(description="Exactly 4 ASCII digits. Never logged, never stored.")


class PhotoRequest(_Body):
    """Which camera takes the ID photo."""

    camera: str = Field(pattern=DEVICE_NAME_PATTERN, max_length=64, description="Device name.")


# -- verdicts: what the kiosk page shows for a read ---------------------------------

VERDICTS = {
    "ok": "stored and valid",
    "invalid_ticket": "a vaccination ticket whose number is wrong",
    "invalid_code": "a barcode that failed its check (check digit, length, separator)",
    "expired": "an expired vaccine lot: a safety problem",
    "unexpected": "a kind of code this station does not take",
    "read_error": "the device could not read it: scan again",
    "not_stored": "the record could not be stored: call staff",
}


def verdict(interpretation: dict[str, Any] | None) -> str:
    """One code per read for the page's big message (the page maps codes to Japanese)."""
    if interpretation is None:
        return "ok"
    problems = set(interpretation.get("problems") or [])
    if "expired" in problems:
        return "expired"
    if "unexpected_type" in problems:
        return "unexpected"
    if not interpretation.get("valid", True) or problems:
        kind = str(interpretation.get("type", ""))
        return "invalid_ticket" if kind.startswith("vaccination_ticket") else "invalid_code"
    return "ok"


def _event_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != "personal"}
    if kind == "read_accepted":
        out["verdict"] = verdict(body.get("interpretation"))
    elif kind == "read_rejected":
        out["verdict"] = "not_stored" if body.get("reason") == "not_stored" else "read_error"
    out["at"] = iso_ms(utc_now())
    return out


# -- events: a bounded ring buffer and the clients following it ----------------------


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
        data = json.dumps(_event_body(kind, body), ensure_ascii=False, separators=(",", ":"))
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


def _frame(kind: str, data: str, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n".encode()


# -- the guard: host, origin, token, headers ---------------------------------------


def _public(path: str) -> bool:
    """The page and its files; everything else needs the token (deny by default)."""
    return path == "/" or (path.startswith("/kiosk/") and ".." not in path)


class _Guard:
    """Pure ASGI middleware: every request passes here before any route."""

    def __init__(self, app: ASGIApp, api: LocalApi) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets, lifespan is off
        api = self.api
        headers = Headers(scope=scope)
        server = scope.get("server")
        via_unix = server is not None and server[1] is None
        origin = headers.get("origin")
        answer: Response | None = None
        if not via_unix and not api.host_allowed(headers.get("host")):
            answer = ApiError(421, "wrong_host", "Host is not this agent").response()
        elif origin is not None and origin != api.origin:
            answer = ApiError(
                403, "origin_not_allowed", "requests from this origin are refused"
            ).response()
        elif scope["method"] == "OPTIONS":
            answer = Response(status_code=204)
            answer.headers["Access-Control-Allow-Methods"] = "GET, POST"
            answer.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, Last-Event-ID"
            )
            answer.headers["Access-Control-Max-Age"] = "600"
        elif not _public(scope["path"]) and not api.authorized(headers.get("authorization")):
            answer = ApiError(401, "unauthorized", "a valid bearer token is required").response()
            answer.headers["WWW-Authenticate"] = 'Bearer realm="madoguchi"'

        extra = api.response_headers(origin)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                names = {k.lower() for k, _ in message["headers"]}
                message["headers"] += [(k, v) for k, v in extra if k not in names]
            await send(message)

        if answer is not None:
            await answer(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


# -- the API -------------------------------------------------------------------------


class LocalApi:
    """Serves the kiosk API for one station until `stop` is set."""

    def __init__(self, station: Station) -> None:
        cfg = station.config.api
        if cfg is None:
            raise MadoguchiError("api: no [api] section in the configuration")
        self.station = station
        self.config: ApiSection = cfg
        self.hub = EventHub(cfg.event_buffer)
        self.ready = asyncio.Event()
        self.token = ""
        host = cfg.host.strip("[]")
        self.url_host = f"[{host}]" if ":" in host else host
        self.origin = cfg.allowed_origin or f"http://{self.url_host}:{cfg.port}"
        self._hosts = {
            f"{h}:{cfg.port}" for h in ("127.0.0.1", "localhost", "[::1]", self.url_host)
        }
        self._hosts.add(urlsplit(self.origin).netloc.lower())
        self._card_locks: dict[str, asyncio.Lock] = {}
        self.app = self._build_app()
        station.subscribe(self.hub.publish)
        station.api = self

    @property
    def token_path(self) -> Path:
        p = self.config.token_file or Path("api-token")
        return p if p.is_absolute() else self.station.config.agent.data_dir / p

    # -- running ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            self.token = load_token(self.token_path)
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
        try:
            async with asgi_server(self.app, sockets, limit_concurrency=64):
                log.info("api: serving the kiosk on %s", self.origin)
                self.ready.set()
                await stop.wait()
        finally:
            self.hub.close()
            for s in sockets:
                s.close()
            if self.config.unix_socket is not None:
                with contextlib.suppress(OSError):
                    self.config.unix_socket.unlink()

    # -- checks the guard uses ----------------------------------------------------

    def host_allowed(self, host: str | None) -> bool:
        if self.config.allow_remote:
            return True
        return host is not None and host.lower() in self._hosts

    def authorized(self, header: str | None) -> bool:
        if header is None or not self.token:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def response_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        out = [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cache-control", b"no-store"),
            (
                b"content-security-policy",
                f"default-src 'self'; connect-src 'self' {self.origin}; img-src 'self' data:; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'".encode(),
            ),
        ]
        if origin is not None and origin == self.origin:
            out += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        return out

    # -- the application --------------------------------------------------------------

    def _build_app(self) -> Starlette:
        async def on_api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return exc.response()

        async def on_http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
            return ApiError(exc.status_code, code, str(exc.detail)).response()

        async def on_crash(request: Request, exc: Exception) -> Response:
            log.error("api: %s %s failed: %s", request.method, request.url.path, type(exc).__name__)
            return ApiError(500, "internal_error", "the agent could not answer this").response()

        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/v1/events", self.events, methods=["GET"]),
            Route("/v1/manual", self.manual, methods=["POST"]),
            Route("/v1/cards/{reader}/info", self.card_info, methods=["POST"]),
            Route("/v1/photos", self.photos, methods=["POST"]),
            Route("/v1/status", self.status, methods=["GET"]),
            Route("/v1/openapi.json", self.openapi, methods=["GET"]),
            Mount("/kiosk", app=StaticFiles(directory=KIOSK_DIR), name="kiosk"),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(_Guard, api=self)],
            exception_handlers={
                ApiError: on_api_error,
                HTTPException: on_http_error,
                Exception: on_crash,
            },
        )

    async def page(self, request: Request) -> Response:
        """The kiosk page: public, and holds no secret."""
        return FileResponse(KIOSK_DIR / "index.html", media_type="text/html; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def status(self, request: Request) -> Response:
        return JSONResponse(await self.status_body())

    async def status_body(self) -> dict[str, Any]:
        st = self.station
        body = st.describe()
        outbox: dict[str, Any] = {}
        if st.outbox is not None:
            stats = (await st.outbox.stats()).as_dict()
            outbox = {**stats, "full": stats["db_bytes"] >= stats["max_bytes"]}
        uplink = st.uplink.describe() if st.uplink is not None else {"connected": False}
        return {
            **body,
            "online": bool(uplink.get("connected")),
            "uplink": uplink,
            "outbox": outbox,
            "manual_device": self.manual_device,
            "card_readers": sorted(
                n for n, d in st.running_drivers().items() if isinstance(d, CardInfoProvider)
            ),
            "cameras": self._cameras(),
            "events": {"run": self.hub.run, "last_id": self.hub.event_id(self.hub.last)},
        }

    @property
    def manual_device(self) -> str | None:
        if self.config.manual_device is not None:
            return self.config.manual_device
        devices = self.station.config.devices
        return devices[0].name if devices else None

    # -- events ----------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        """Server-Sent Events; `Last-Event-ID` resumes from the ring buffer."""
        hub = self.hub
        client, backlog, reset = hub.attach(request.headers.get("last-event-id"))

        async def stream() -> AsyncIterator[bytes]:
            try:
                hello = {"run": hub.run, "missed": len(backlog), "reset": reset}
                resumed_from = request.headers.get("last-event-id")
                first_id = None if (resumed_from and reset is None) else hub.event_id(hub.last)
                yield b"retry: 2000\n" + _frame("hello", json.dumps(hello), first_id)
                for ev in backlog:
                    yield _frame(ev.kind, ev.data, hub.event_id(ev.n))
                while True:
                    while client.queue:
                        ev = client.queue.popleft()
                        yield _frame(ev.kind, ev.data, hub.event_id(ev.n))
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

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    # -- manual entry ------------------------------------------------------------------

    async def manual(self, request: Request) -> Response:
        """Stored like a scan with source "manual"; answered after the commit."""
        body = _parse(ManualEntry, await self._json(request))
        if any((ord(c) < 0x20 and c != "\x1d") or ord(c) == 0x7F for c in body.text):
            raise ApiError(422, "invalid", "text: control characters other than GS (0x1D)")
        if body.device not in self.station.devices:
            raise ApiError(404, "unknown_device", f"no device named {body.device}")
        outcome = await self.station.accept(
            Read(device=body.device, kind="barcode", data={"text": body.text}, source="manual")
        )
        return _outcome_response(body.device, outcome)

    # -- card info ---------------------------------------------------------------------

    async def card_info(self, request: Request) -> Response:
        """The card's 4 attributes with the resident's PIN. One attempt at a time."""
        reader = request.path_params["reader"]
        body = _parse(CardInfoRequest, await self._json(request))
        if len(body.pin) != 4 or not all("0" <= c <= "9" for c in body.pin):
            raise ApiError(422, "bad_pin_format", "the PIN is 4 digits")
        driver = self.station.running_drivers().get(reader)
        if not isinstance(driver, CardInfoProvider):
            if driver is None and _driver_can(self.station, reader, "read_card_info"):
                raise ApiError(503, "reader_unavailable", f"card reader {reader} is not connected")
            raise ApiError(404, "no_card_reader", f"no card reader named {reader}")
        lock = self._card_locks.setdefault(reader, asyncio.Lock())
        if lock.locked():
            raise ApiError(409, "busy", f"{reader} is already reading a card")
        async with lock:
            try:
                info = await driver.read_card_info(reader, body.pin)
            except PinRefused as e:
                raise ApiError(
                    403,
                    "pin_refused",
                    e.reason,
                    tries_left=e.tries_left,
                    locked=e.tries_left == 0,
                ) from None
            except DeviceUnavailable as e:
                raise ApiError(503, "reader_unavailable", e.reason) from None
            except CardError as e:
                raise ApiError(409, "card_error", e.reason) from None
        return JSONResponse({"reader": reader, "info": info})

    # -- photos ------------------------------------------------------------------------

    async def photos(self, request: Request) -> Response:
        """An ID photo through `Station.capture_photo` (sealed blob + record, camera branch)."""
        body = _parse(PhotoRequest, await self._json(request))
        take: Callable[[str], Awaitable[dict[str, Any]]] | None = getattr(
            self.station, "capture_photo", None
        )
        cameras = self._cameras()
        configured = any(
            _driver_can(self.station, d.name, "capture_photo") for d in self.station.config.devices
        )
        if take is None or not (cameras or configured):
            raise ApiError(501, "no_camera", "this station has no camera")
        if body.camera not in cameras:
            if _driver_can(self.station, body.camera, "capture_photo"):
                raise ApiError(503, "camera_unavailable", f"camera {body.camera} is not connected")
            raise ApiError(404, "no_camera", f"no camera named {body.camera}")
        try:
            result = await take(body.camera)
        except DeviceUnavailable as e:
            raise ApiError(503, "camera_unavailable", e.reason) from None
        except OutboxError:
            raise ApiError(
                503, "not_stored", "the photo could not be stored; nothing was kept"
            ) from None
        except MadoguchiError as e:
            raise ApiError(409, "capture_failed", str(e)) from None
        return JSONResponse(result, status_code=201)

    def _cameras(self) -> list[str]:
        drivers = self.station.running_drivers()
        return sorted(n for n, d in drivers.items() if callable(getattr(d, "capture_photo", None)))

    # -- bodies ------------------------------------------------------------------------

    async def _json(self, request: Request) -> Any:
        """The body as JSON: 415 unless JSON, 413 past max_body_bytes, 400 if malformed."""
        limit = self.config.max_body_bytes
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, "too_large", f"bodies are limited to {limit} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, "too_large", f"bodies are limited to {limit} bytes")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None


def _driver_can(station: Station, device: str, method: str) -> bool:
    """Whether the configured driver of `device` has `method`, even while it is unplugged."""
    try:
        target = DRIVERS[station.config.device(device).driver]
    except KeyError:
        return False
    module, _, name = target.partition(":")
    try:  # driver modules import their hardware library lazily: this is cheap and safe
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return callable(getattr(cls, method, None))


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], value: Any) -> M:
    if not isinstance(value, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        # loc and message only: pydantic's `input` would echo a PIN back
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}"
            for err in e.errors(include_input=False, include_url=False)
        ]
        raise ApiError(422, "invalid", "; ".join(problems), problems=problems) from None


def _outcome_response(device: str, outcome: Outcome) -> JSONResponse:
    interp = outcome.interpretation
    if outcome.record is None and not outcome.duplicate:
        return ApiError(
            503,
            "not_stored",
            "the record could not be stored; nothing was kept",
            verdict="not_stored",
        ).response()
    body: dict[str, Any] = {
        "device": device,
        "accepted": outcome.accepted,
        "duplicate": outcome.duplicate,
        "interpretation": interp,
        "verdict": verdict(interp),
    }
    if outcome.record is not None:
        body |= {"seq": outcome.record.seq, "id": outcome.record.id}
        body["source"] = outcome.record.source
    return JSONResponse(body, status_code=201 if outcome.record is not None else 200)


# -- the token ---------------------------------------------------------------------------


def load_token(path: Path) -> str:
    """The bearer token; a missing file is created with a random one, mode 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise MadoguchiError(f"{path}: api.token_file: cannot create: {e.strerror}") from e
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.info("api: created a new token in %s", path)
    try:
        mode = path.stat().st_mode
        lines = path.read_text().strip().splitlines()
    except OSError as e:
        raise MadoguchiError(f"{path}: api.token_file: {e.strerror}") from e
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise MadoguchiError(f"{path}: api.token_file: token shorter than {MIN_TOKEN_CHARS}")
    if mode & stat.S_IROTH:
        log.warning("api: %s is readable by every user; chmod o-r it", path)
    return token


# -- OpenAPI -----------------------------------------------------------------------------


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json_body(name: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
    }


def openapi_document() -> dict[str, Any]:
    """The API as OpenAPI 3.1 (served at /v1/openapi.json, copied to docs/openapi.json)."""
    ref = "#/components/schemas/{model}"
    schemas: dict[str, Any] = {
        m.__name__: m.model_json_schema(ref_template=ref)
        for m in (ManualEntry, CardInfoRequest, PhotoRequest)
    }
    schemas["CardInfoRequest"]["properties"]["pin"]["pattern"] = "^[0-9]{4}$"
    schemas["Error"] = {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "Stable machine code."},
            "detail": {"type": "string", "description": "Human explanation (English)."},
            "tries_left": {"type": ["integer", "null"], "description": "pin_refused only."},
            "locked": {"type": "boolean", "description": "pin_refused only: card is locked."},
            "verdict": {"type": "string", "description": "not_stored only."},
        },
    }
    schemas["StoredRead"] = {
        "type": "object",
        "required": ["device", "accepted", "duplicate", "verdict"],
        "properties": {
            "device": {"type": "string"},
            "accepted": {
                "type": "boolean",
                "description": "false when the device NAKs invalid reads (nak_invalid)",
            },
            "duplicate": {
                "type": "boolean",
                "description": "the same text within repeat_window_s: stored once, earlier",
            },
            "seq": {"type": "integer"},
            "id": {"type": "string", "description": "UUIDv7 of the record"},
            "source": {"type": "string", "enum": ["manual", "device"]},
            "interpretation": {"type": ["object", "null"]},
            "verdict": {"type": "string", "enum": list(VERDICTS)},
        },
    }
    schemas["Photo"] = {
        "type": "object",
        "description": "The stored photo's record (no pixels): the JPEG is a sealed blob "
        "beside the outbox, sent to the registry in chunks (docs/CONTRACT.md).",
        "properties": {
            "device": {"type": "string"},
            "record_id": {"type": "string"},
            "seq": {"type": "integer"},
            "sha256": {"type": "string"},
            "bytes": {"type": "integer"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "content_type": {"type": "string"},
        },
    }
    common = {
        "401": _err("No or wrong bearer token."),
        "403": _err("Origin header other than the kiosk's origin."),
        "421": _err("Host header is not this agent (DNS rebinding guard)."),
    }
    body_errors = {
        "400": _err("Malformed JSON, or not an object."),
        "413": _err("Body larger than api.max_body_bytes."),
        "415": _err("Content-Type is not application/json."),
        "422": _err("Fields missing, unknown or invalid."),
    }
    stored = {
        "description": "Durable: committed to the outbox before this answer.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StoredRead"}}},
    }
    kinds = (
        "hello, read_accepted, read_rejected, device_state, uplink, outbox_full, "
        "card_inserted, card_removed, operator_session"
    )
    paths: dict[str, Any] = {
        "/v1/events": {
            "get": {
                "summary": "Live station events (Server-Sent Events)",
                "description": f"Event kinds: {kinds}. Each has an id `<run>-<n>`; reconnect "
                "with `Last-Event-ID` to get what was missed from a bounded buffer. `hello` "
                "comes first; `reset` in it (restarted | gap) means events were lost: re-read "
                "/v1/status.",
                "parameters": [
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "text/event-stream"}, **common},
            }
        },
        "/v1/manual": {
            "post": {
                "summary": "Manual entry, stored like a scan with source manual",
                "requestBody": _json_body("ManualEntry"),
                "responses": {
                    "201": stored,
                    "200": {**stored, "description": "A repeat within repeat_window_s."},
                    "404": _err("No device of that name."),
                    "503": _err("Not stored (outbox full or failing): nothing was kept."),
                    **common,
                    **body_errors,
                },
            }
        },
        "/v1/cards/{reader}/info": {
            "post": {
                "summary": "The card's 4 attributes, with the resident's 4-digit PIN",
                "description": "Reads the retry counter first; refuses without trying when "
                "fewer than 2 tries are left; tries once, never retries. The PIN is never "
                "logged or stored.",
                "parameters": [
                    {"name": "reader", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": _json_body("CardInfoRequest"),
                "responses": {
                    "200": {"description": "{reader, info: {name, address, birth_date, sex}}"},
                    "403": _err("pin_refused: wrong PIN or not tried; tries_left, locked."),
                    "404": _err("No card reader of that name."),
                    "409": _err("busy (another read in progress) or card_error (no card ...)."),
                    "503": _err("The reader is not connected."),
                    **{k: v for k, v in common.items() if k != "403"},
                    **body_errors,
                },
            }
        },
        "/v1/photos": {
            "post": {
                "summary": "Take an ID photo with a camera, stored as a record",
                "requestBody": _json_body("PhotoRequest"),
                "responses": {
                    "201": {
                        "description": "Durable: blob sealed and record committed.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Photo"}}
                        },
                    },
                    "409": _err("capture_failed: the camera could not take it."),
                    "404": _err("No camera of that name."),
                    "501": _err("This station has no camera."),
                    "503": _err("Camera not connected, or the record was not stored."),
                    **common,
                    **body_errors,
                },
            }
        },
        "/v1/status": {
            "get": {
                "summary": "Agent, devices, uplink and outbox health",
                "responses": {"200": {"description": "status object"}, **common},
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1"}, **common},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "madoguchi local kiosk API",
            "version": "1",
            "description": "Loopback only. Every /v1/ call needs `Authorization: Bearer "
            "<token>`; requests with an Origin other than the kiosk's are refused.",
        },
        "servers": [{"url": "http://127.0.0.1:8765"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def write_openapi(path: Path) -> None:
    path.write_text(json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n")
