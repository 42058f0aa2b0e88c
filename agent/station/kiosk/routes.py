"""The kiosk API's routes: the request bodies and what each call does.

The touchscreen page talks to the station through these: live events
(agent/station/kiosk/events.py), manual entry (answered only after the
record is durable), PIN card reads and photos (through a driver capability,
agent/drivers/capabilities.py, and the station's `capture_photo`), and
status. Every request has passed the guard (guard.py) before it gets here.
The PIN and card contents are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from agent.config import DEVICE_NAME_PATTERN, ApiSection, Config
from agent.contract.records import Read
from agent.contract.text import TYPED_CONTROL, forbidden_controls
from agent.drivers import DRIVERS
from agent.drivers.capabilities import CardInfoProvider, PossessionProver
from agent.errors import (
    ApiError,
    CardError,
    DeviceUnavailable,
    MadoguchiError,
    OutboxError,
    PinRefused,
)
from agent.station.feedback import Outcome, verdict
from agent.station.kiosk import events
from agent.station.kiosk.guard import error_response

if TYPE_CHECKING:
    from agent.drivers import Driver
    from agent.station.outbox import Outbox

log = logging.getLogger(__name__)

KIOSK_DIR = Path(__file__).resolve().parent / "static"

Listener = Callable[[str, dict[str, Any]], None]


class _Describes(Protocol):
    def describe(self) -> dict[str, Any]: ...


class KioskStation(Protocol):
    """What the routes need of the station (agent/station/app.py provides it)."""

    @property
    def config(self) -> Config: ...

    @property
    def devices(self) -> Mapping[str, object]: ...

    @property
    def outbox(self) -> Outbox | None: ...

    @property
    def uplink(self) -> _Describes | None: ...

    def describe(self) -> dict[str, Any]: ...

    def subscribe(self, listener: Listener) -> None: ...

    def running_drivers(self) -> dict[str, Driver]: ...

    async def accept(self, read: Read) -> Outcome: ...


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


class ProveRequest(_Body):
    """The resident's 4-digit JPKI auth PIN (利用者証明用電子証明書) for the possession proof."""

    pin: str = Field(description="Exactly 4 ASCII digits. Never logged, never stored.")


class PhotoRequest(_Body):
    """Which camera takes the ID photo."""

    camera: str = Field(pattern=DEVICE_NAME_PATTERN, max_length=64, description="Device name.")


# -- the routes ------------------------------------------------------------------------


class Routes:
    """The handlers of one kiosk API; `table()` is what the app serves."""

    def __init__(
        self,
        station: KioskStation,
        config: ApiSection,
        hub: events.EventHub,
        document: Callable[[], dict[str, Any]],
        *,
        connections: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.station = station
        self.config = config
        self.hub = hub
        self._document = document
        self._connections = connections  # the server's own counters (bounded.py)
        self._card_locks: dict[str, asyncio.Lock] = {}

    def table(self) -> list[BaseRoute]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/v1/events", self.events, methods=["GET"]),
            Route("/v1/manual", self.manual, methods=["POST"]),
            Route("/v1/cards/{reader}/info", self.card_info, methods=["POST"]),
            Route("/v1/cards/{reader}/prove", self.prove, methods=["POST"]),
            Route("/v1/photos", self.photos, methods=["POST"]),
            Route("/v1/status", self.status, methods=["GET"]),
            Route("/v1/openapi.json", self.openapi, methods=["GET"]),
            Mount("/kiosk", app=StaticFiles(directory=KIOSK_DIR), name="kiosk"),
        ]

    async def page(self, request: Request) -> Response:
        """The kiosk page: public, and holds no secret."""
        return FileResponse(KIOSK_DIR / "index.html", media_type="text/html; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._document())

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
            "api_connections": None if self._connections is None else self._connections(),
            **self._page_fields(outbox),
        }

    def _page_fields(self, outbox: dict[str, Any]) -> dict[str, Any]:
        """What the page shows beside the devices: their labels, the desk's role, the backlog."""
        return {
            "role": self.config.role,
            "labels": {d.name: d.label or d.name for d in self.station.config.devices},
            "waiting": outbox.get("unconfirmed"),
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
        return StreamingResponse(
            events.stream(self.hub, request.headers.get("last-event-id")),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    # -- manual entry ------------------------------------------------------------------

    async def manual(self, request: Request) -> Response:
        """Stored like a scan with source "manual"; answered after the commit."""
        body = _parse(ManualEntry, await self._json(request))
        if forbidden_controls(body.text, TYPED_CONTROL):
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
        _check_pin(body.pin)
        driver = self.station.running_drivers().get(reader)
        if driver is None or not isinstance(driver, CardInfoProvider):
            raise self._no_card_reader(reader, driver, "read_card_info")
        async with self._card_turn(reader):
            info = await driver.read_card_info(body.pin)
        return JSONResponse({"reader": reader, "info": info.attributes()})

    async def prove(self, request: Request) -> Response:
        """Chain check and possession proof (the card signs a station nonce), with the auth
        PIN, on a reader whose profile says `prove_possession`. One attempt at a time."""
        reader = request.path_params["reader"]
        body = _parse(ProveRequest, await self._json(request))
        _check_pin(body.pin)
        driver = self.station.running_drivers().get(reader)
        if driver is None or not isinstance(driver, PossessionProver):
            raise self._no_card_reader(reader, driver, "prove_possession")
        if not getattr(self.station.config.device(reader), "prove_possession", False):
            raise ApiError(403, "not_enabled", f"{reader}: the profile does not ask for it")
        async with self._card_turn(reader):
            result = await driver.prove_possession(body.pin)
        keys = ("verdict", "chain", "generation", "possession", "revocation", "reason")
        return JSONResponse({"reader": reader, **{k: result[k] for k in keys if k in result}})

    def _no_card_reader(self, reader: str, driver: object, method: str) -> ApiError:
        """503 while a reader that could do `method` is not connected, else 404."""
        if driver is None and _driver_can(self.station, reader, method):
            return ApiError(503, "reader_unavailable", f"card reader {reader} is not connected")
        return ApiError(404, "no_card_reader", f"no card reader named {reader}")

    @contextlib.asynccontextmanager
    async def _card_turn(self, reader: str) -> AsyncIterator[None]:
        """One card operation at a time per reader (409 to a second); the card's refusals
        as API answers."""
        lock = self._card_locks.setdefault(reader, asyncio.Lock())
        if lock.locked():
            raise ApiError(409, "busy", f"{reader} is already reading a card")
        async with lock:
            try:
                yield
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


def _driver_can(station: KioskStation, device: str, method: str) -> bool:
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


def _check_pin(pin: str) -> None:
    if len(pin) != 4 or not all("0" <= c <= "9" for c in pin):
        raise ApiError(422, "bad_pin_format", "the PIN is 4 digits")


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
        return error_response(
            ApiError(
                503,
                "not_stored",
                "the record could not be stored; nothing was kept",
                verdict="not_stored",
            )
        )
    body: dict[str, Any] = {
        "device": device,
        "accepted": outcome.accepted,
        "duplicate": outcome.duplicate,
        "interpretation": interp,
        "verdict": verdict(interp, outcome.reference),
        "reference": outcome.reference,
    }
    if outcome.record is not None:
        body |= {"seq": outcome.record.seq, "id": outcome.record.id}
        body["source"] = outcome.record.source
    return JSONResponse(body, status_code=201 if outcome.record is not None else 200)
