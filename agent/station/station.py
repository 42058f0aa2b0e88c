"""The station loop: devices -> interpretation -> outbox -> operator feedback.

One loop per device, restarted with backoff when the device fails or goes
away. A read is acknowledged to the operator only after `Outbox.append`
returned, i.e. after the commit is on disk; when it could not be stored the
operator gets a NAK and rescans. Nothing between the driver and the outbox
can lose a read that was acknowledged.

This module knows no adapter: not the uplink, the kiosk API or photos. It
offers hooks instead (`on_stored`, `subscribe`), and agent/station/app.py
wires the adapters to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from typing import TYPE_CHECKING, Any

from agent._aio import Backoff
from agent.config import Config, DeviceConfig
from agent.contract.records import Read, ReadFault
from agent.drivers import Driver, create_driver
from agent.drivers.capabilities import CardInfoProvider, TrustAnchorTaker
from agent.drivers.card import CardInfo
from agent.errors import (
    CardError,
    DeviceError,
    DeviceUnavailable,
    DriverMissing,
    OutboxDiskFull,
    OutboxError,
    OutboxFull,
)
from agent.interpret import interpret, split_aim
from agent.logrepeat import Repeats
from agent.station.clock import clock_synced
from agent.station.feedback import Outcome, acknowledged
from agent.station.operators import operator_sessions

if TYPE_CHECKING:
    from agent.station.datasets import DatasetReceiver
    from agent.station.outbox import Outbox

#: dataset verdicts the operator must act on: a NAK on a device with nak_invalid, an alert
ALARM_VERDICTS = frozenset({"already_used", "recalled"})

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DeviceState:
    """What telemetry and status say of one device."""

    state: str = "starting"  # connected | disconnected | error | starting
    reads: int = 0
    errors: int = 0
    naks: int = 0
    duplicates_suppressed: int = 0
    last_error: str | None = None
    last_read_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reads": self.reads,
            "errors": self.errors,
            "naks": self.naks,
            "duplicates_suppressed": self.duplicates_suppressed,
            "last_error": self.last_error,
        }


Listener = Callable[[str, dict[str, Any]], None]


class Station:
    """Runs the configured devices and stores their reads in `outbox` (set by the app)."""

    def __init__(
        self,
        config: Config,
        *,
        driver_factory: Callable[[DeviceConfig], Driver] = create_driver,
        today: Callable[[], date] = date.today,
    ) -> None:
        self.config = config
        self.devices = {d.name: DeviceState() for d in config.devices}
        self.outbox: Outbox | None = None
        #: reference datasets for verdicts (set by the app when [datasets] is configured)
        self.datasets: DatasetReceiver | None = None
        #: called after every commit: new records are in the outbox (the uplink's wake-up)
        self.on_stored: Callable[[], None] | None = None
        self._drivers: dict[str, Driver] = {}
        self._driver_factory = driver_factory
        self._today = today
        self._alerts: list[dict[str, Any]] = []
        self._last_text: dict[str, tuple[str, float]] = {}
        self._listeners: list[Listener] = []
        self._started = time.time()
        self._operators = operator_sessions(config)

    # -- what the uplink, local API and CLI see (through the app) -----------------

    def describe(self) -> dict[str, Any]:
        return {
            "site": self.config.agent.site,
            "agent": self.config.agent.name,
            "started_at": self._started,
            "devices": {
                name: {**st.as_dict(), **self._driver_stats(name)}
                for name, st in self.devices.items()
            },
            "operator": self.operator,
            **({} if self.datasets is None else {"datasets": self.datasets.describe()}),
        }

    async def read_card_info(self, device: str, pin: str) -> CardInfo:
        """The PIN flow on the card in a running card reader (kiosk local API, tests).

        Raises PinRefused / CardError; the PIN goes no further than the card.
        """
        driver = self._drivers.get(device)
        # `None or`: mypy takes isinstance on `Driver | None` for unreachable (and so unchecked)
        if (
            driver is None
            or not isinstance(driver, CardInfoProvider)
            or self.devices[device].state != "connected"
        ):
            raise CardError(device, "no connected card reader by that name")
        return await driver.read_card_info(pin)

    @property
    def operator(self) -> str | None:
        """Who is on duty (staff badge session), if anyone."""
        if self._operators is None:
            return None
        return self._operators.current(time.monotonic())

    def _driver_stats(self, name: str) -> dict[str, Any]:
        """Counters a running driver offers (e.g. the camera's decoded / dropped frames)."""
        stats = getattr(self._drivers.get(name), "stats", None)
        return stats() if callable(stats) else {}

    def take_alerts(self) -> list[dict[str, Any]]:
        alerts, self._alerts = self._alerts, []
        if self.outbox is not None:  # a database moved aside and salvaged, at start or since
            alerts += self.outbox.take_alerts()
        return alerts

    def alert(self, body: dict[str, Any]) -> None:
        """An alert for the next telemetry (e.g. the outbox was recovered)."""
        self._alerts.append(body)

    def subscribe(self, listener: Listener) -> None:
        """Get every station event (kiosk feedback, tests): listener(kind, body)."""
        self._listeners.append(listener)

    def running_drivers(self) -> dict[str, Driver]:
        """Open drivers by device name: the local API finds capabilities on them."""
        return dict(self._drivers)

    def emit(self, kind: str, body: dict[str, Any]) -> None:
        """Tell every listener; also how the app reports the uplink's connection."""
        for listener in self._listeners:
            try:
                listener(kind, body)
            except Exception:
                log.exception("event listener failed on %s", kind)

    # -- running -------------------------------------------------------------------

    async def device_loop(self, dev: DeviceConfig, stop: asyncio.Event) -> None:
        """One device until `stop`: open, read, reopen with backoff when it fails."""
        state = self.devices[dev.name]
        backoff = Backoff(first=0.2, cap=5.0)
        repeats = Repeats(log, dev.name)  # once per state change, then a summary
        first = True
        while not stop.is_set():
            driver = self._driver_factory(dev)
            if self.datasets is not None and isinstance(driver, TrustAnchorTaker):
                driver.add_anchor_source(self.datasets.jpki_anchors)  # the jpki_anchors dataset
            try:
                async with driver:
                    self._set_state(dev.name, "connected", None)
                    if not repeats.ok("connected") and first:
                        # the technician's (and a test's) sign that reads are taken now:
                        # a serial port's input is flushed inside its open()
                        log.info("%s: connected", dev.name)
                    first = False
                    backoff.reset()
                    self._drivers[dev.name] = driver
                    try:
                        async for event in driver.reads():
                            await self._finish(self._handle(driver, event))
                    finally:
                        self._drivers.pop(dev.name, None)
                raise DeviceUnavailable(dev.name, "stopped yielding reads")
            except DriverMissing as e:
                self._set_state(dev.name, "error", str(e))
                log.error("%s", e)
                return  # installing a library needs a person, not a retry
            except DeviceUnavailable as e:
                repeats.failed("unavailable", e.reason)
                self._set_state(dev.name, "disconnected", e.reason)
            except DeviceError as e:
                state.errors += 1
                self._set_state(dev.name, "error", e.reason)
                repeats.failed("failing", e.reason, logging.ERROR)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff.next())

    @staticmethod
    async def _finish(coro: Any) -> None:
        """Let a read in progress finish its commit and feedback even on shutdown."""
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise

    def _set_state(self, name: str, state: str, error: str | None) -> None:
        st = self.devices[name]
        if st.state != state:
            self.emit("device_state", {"device": name, "state": state, "error": error})
        st.state = state
        if error is not None:
            st.last_error = error

    async def _handle(self, driver: Driver, event: Read | ReadFault) -> Outcome:
        if isinstance(event, ReadFault):
            st = self.devices[event.device]
            st.errors += 1
            st.last_error = event.reason
            log.warning("%s: read rejected: %s", event.device, event.reason)
            self.emit("read_rejected", {"device": event.device, "reason": event.reason})
            await driver.feedback(event, accepted=False)
            return Outcome(accepted=False, error=event.reason)
        outcome = await self.accept(event)
        ref = outcome.reference
        alarm = (
            outcome.record is not None and ref is not None and ref.get("verdict") in ALARM_VERDICTS
        )
        await driver.feedback(event, accepted=outcome.accepted, alarm=alarm)
        return outcome

    async def accept(self, read: Read) -> Outcome:
        """Interpret, apply the station rules, store. Used by drivers and manual entry."""
        assert self.outbox is not None, "the app opens the outbox before any read"
        dev = self.config.device(read.device)
        st = self.devices[read.device]
        st.reads += 1
        st.last_read_at = time.time()
        if read.kind == "barcode" and "text" in read.data:
            read = self._interpreted(dev, read)
            text = read.data["text"]
            last = self._last_text.get(read.device)
            now = time.monotonic()
            if (last is not None and last[0] == text and now - last[1] < dev.repeat_window_s) or (
                last is None and await self._committed_before_restart(dev, text)
            ):
                self._last_text[read.device] = (text, now) if last is None else last
                st.duplicates_suppressed += 1
                return Outcome(
                    accepted=True, duplicate=True, interpretation=read.data["interpretation"]
                )
        interpretation = read.data.get("interpretation")
        verdict = None if self.datasets is None else self.datasets.verdict(interpretation)
        if verdict is not None:  # what the city knows: stored with the record, never a refusal
            read = replace(read, data={**read.data, "verdict": verdict})
            if verdict["verdict"] in ALARM_VERDICTS:
                log.warning(
                    "%s: %s (%s v%d%s)",
                    read.device,
                    verdict["verdict"].upper(),
                    verdict["dataset"],
                    verdict["version"],
                    ", stale" if verdict["stale"] else "",
                )
                self._alerts.append({"type": verdict["verdict"], "device": read.device})
        booked = None if self.datasets is None else self.datasets.reservation(read.data)
        if booked is not None:  # a separate fact: a ticket can be both used and reserved
            read = replace(read, data={**read.data, "reservation": booked})
        if read.clock_synced is None:  # lets the registry tell a 1970 timestamp from a real one
            read = dataclasses.replace(read, clock_synced=clock_synced())
        read, operator = self._with_operator(read)
        if verdict is None and isinstance(read.data.get("verdict"), dict):
            verdict = read.data["verdict"]  # unknown_staff
        try:
            record = await self.outbox.append(read, operator=operator)
        except OutboxError as e:
            st.naks += 1
            st.last_error = str(e)
            log.error("%s: read NOT stored, operator gets a NAK: %s", read.device, e)
            if isinstance(e, OutboxFull):
                self.emit("outbox_full", {"device": read.device})
            if isinstance(e, OutboxDiskFull):
                self.emit("disk_full", {"device": read.device})
            self.emit("read_rejected", {"device": read.device, "reason": "not_stored"})
            return Outcome(accepted=False, error=str(e), interpretation=interpretation)
        if read.kind == "barcode" and "text" in read.data:
            self._last_text[read.device] = (read.data["text"], time.monotonic())
        if self.on_stored is not None:
            self.on_stored()
        ok = acknowledged(interpretation, nak_invalid=dev.nak_invalid) and not (
            dev.nak_invalid and verdict is not None and verdict["verdict"] in ALARM_VERDICTS
        )
        if not ok:
            st.naks += 1
        self.emit(
            "read_accepted",
            {
                "device": read.device,
                "seq": record.seq,
                "id": record.id,
                "kind": record.kind,
                "source": record.source,
                "interpretation": interpretation,
                "verdict": verdict,
                "reservation": booked,
                **_card_auth_verdict(read),
            },
        )
        return Outcome(accepted=ok, record=record, interpretation=interpretation, reference=verdict)

    async def _committed_before_restart(self, dev: DeviceConfig, text: str) -> bool:
        """The repeat window across a restart: the first scan of a device after start is a
        rescan if the outbox's last record of the device is this text, committed within
        `repeat_window_s` (its ACK may never have gone out before a crash)."""
        if dev.repeat_window_s <= 0 or self.outbox is None:
            return False
        try:
            return await self.outbox.find_repeat(dev.name, text, dev.repeat_window_s)
        except OutboxError as e:
            log.warning("%s: repeat window lookup failed: %s", dev.name, e)
            return False

    def _with_operator(self, read: Read) -> tuple[Read, str | None]:
        """A staff badge tap starts or ends the operator session; every record carries
        the operator on duty."""
        sessions = self._operators
        if sessions is None:
            return read, None
        now = time.monotonic()
        uid = read.data.get("uid") if read.kind == "card" else None
        staff = None if self.datasets is None else self.datasets.staff
        change = sessions.tap(uid, now, staff) if isinstance(uid, str) else None
        if change is None:
            unknown = self._unknown_staff(read, uid)
            if unknown is not None:
                read = replace(read, data={**read.data, "verdict": unknown})
            return read, sessions.touch(now)
        event, operator = change
        log.info("%s: operator session %s (%s)", read.device, event, operator)
        self.emit("operator", {"device": read.device, "event": event, "operator": operator})
        data = {**read.data, "operator_session": {"event": event, "operator": operator}}
        return replace(read, data=data), operator

    def _unknown_staff(self, read: Read, uid: object) -> dict[str, Any] | None:
        """`unknown_staff` for a plain badge tap (a card UID, no My Number certificate)
        that neither the `staff` dataset nor the hand map names; stored, not refused."""
        if self.datasets is None or not isinstance(uid, str) or "auth_cert" in read.data:
            return None
        if "verdict" in read.data or "card_auth" in read.data:
            return None
        found = self.datasets.unknown_staff()
        if found is not None:
            log.warning(
                "%s: badge not on the staff list (staff v%d)", read.device, found["version"]
            )
        return found

    def _interpreted(self, dev: DeviceConfig, read: Read) -> Read:
        text: str = read.data["text"]
        symbology = read.data.get("symbology")
        body = text
        if symbology is None:
            symbology, body = split_aim(text)
        result = interpret(
            body, symbology=symbology, gs_substitute=dev.gs_substitute, today=self._today()
        )
        if dev.expect and result.get("type") not in dev.expect:
            result = {**result, "problems": [*result.get("problems", []), "unexpected_type"]}
        if "expired" in result.get("problems", []):
            log.warning("%s: EXPIRED lot scanned (%s)", read.device, result.get("type"))
            self._alerts.append(
                {"type": "expired_lot", "device": read.device, "fields": result.get("fields", {})}
            )
        data = {**read.data, "symbology": symbology, "interpretation": result}
        return Read(
            device=read.device,
            kind=read.kind,
            data=data,
            captured_at=read.captured_at,
            source=read.source,
            personal=read.personal,
            token=read.token,
            clock_synced=read.clock_synced,
        )


def _card_auth_verdict(read: Read) -> dict[str, Any]:
    """`card_auth`: the authenticity verdict of a card read, for the kiosk's alarm (#21)."""
    auth = read.data.get("card_auth") if read.kind in ("card", "card_auth") else None
    return {"card_auth": auth["verdict"]} if isinstance(auth, dict) and "verdict" in auth else {}
