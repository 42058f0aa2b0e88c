"""IC card readers through pcscd (PC/SC, pyscard): My Number cards, 住基カード, staff badges.

On every card insertion the driver records the card type, ATR and UID and, for
a My Number card, the user-authentication certificate's serial and issuer
(readable without a PIN): that pair identifies the holder's current
certificate, and `card_auth`, the offline chain check of that certificate
against the pinned `jpki_anchors` (agent/drivers/jpki.py). With the resident's
auth PIN, `prove_possession` has the card sign a station nonce. The signature
certificate is never read.

Three modules: the card protocol (agent/drivers/card.py: APDUs, TLV, PIN
rules, pure), the pyscard boundary (agent/drivers/scard.py) and, here, the
driver thread.

Threading: pyscard blocks, and a PC/SC context belongs to one thread. Each
reader gets ONE dedicated thread that owns the context and runs our own
`SCardGetStatusChange` loop (not pyscard's CardMonitor, which stops for good
when pcscd restarts). Results cross to asyncio with `call_soon_threadsafe`.
Work asked from asyncio (the PIN flow) is queued to the same thread, which is
woken with `SCardCancel`, so APDU sequences never interleave. After the PIN
flow the card is reset, so the unlocked state does not outlive the read.
The PIN is never logged or stored; personal data only goes into
`Read.personal`, which the outbox encrypts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.contract.records import Read, ReadFault
from agent.drivers import jpki
from agent.drivers.base import Driver
from agent.drivers.capabilities import CardInfoProvider, PossessionProver, TrustAnchorTaker
from agent.drivers.card import CardInfo, card_info, identify_card
from agent.drivers.scard import CardLink, NoService, PcscSession, require_pyscard
from agent.errors import CardError, DeviceUnavailable

if TYPE_CHECKING:
    from agent.config import PcscDevice

log = logging.getLogger(__name__)

PNP_NOTIFICATION = "\\\\?PnP?\\Notification"
#: backstop for a SCardCancel that raced the wait it meant to interrupt
WAIT_MS = 2000


# -- the driver ---------------------------------------------------------------------------


@dataclass
class _Job:
    fn: Callable[[CardLink], Any]
    future: concurrent.futures.Future[Any]


_GONE = object()


class PcscDriver(Driver):
    """One PC/SC reader, chosen by the `reader` glob."""

    config: PcscDevice

    def __init__(self, config: PcscDevice) -> None:
        super().__init__(config)
        self.reader: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._session: PcscSession | None = None
        self._stop = threading.Event()
        self._last_card: dict[str, Any] | None = None
        #: the station clock's sync state, asked before validity is judged (tests replace it)
        self.clock_synced: Callable[[], bool | None] = jpki.kernel_clock_synced
        self._anchor_sources: list[Callable[[], frozenset[str]]] = []

    def add_anchor_source(self, source: Callable[[], frozenset[str]]) -> None:
        """More trust anchors than `jpki_anchors` in the config (the station's dataset)."""
        self._anchor_sources.append(source)

    def anchors(self) -> frozenset[str]:
        """The config's `jpki_anchors` and every added source's, at this moment."""
        found = frozenset(self.config.jpki_anchors)
        for source in self._anchor_sources:
            found |= source()
        return found

    # asyncio side

    async def open(self) -> None:
        require_pyscard(self.name)  # DriverMissing now, not in the thread
        loop = asyncio.get_running_loop()
        self._loop = loop
        ready: asyncio.Future[str] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"pcsc:{self.name}")
        self._thread.start()
        try:
            self.reader = await ready
        except BaseException:
            await self.close()
            raise
        log.info("%s: reader %s", self.name, self.reader)

    async def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        while thread.is_alive():
            session = self._session
            if session is not None:
                session.cancel()
            await asyncio.to_thread(thread.join, 0.2)
        self._thread = None

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        while True:
            item = await self._queue.get()
            if isinstance(item, DeviceUnavailable):
                raise item
            if item is _GONE:
                raise DeviceUnavailable(self.name, "reader thread ended")
            yield item

    async def read_card_info(self, pin: str) -> CardInfo:
        """The PIN flow on the card in this reader, on the reader's thread.

        Raises PinRefused (too few tries, wrong PIN), CardError (no card, pulled out).
        With `store_card_info` the result is also yielded as an encrypted record.
        """
        cfg = self.config
        if self._thread is None or not self._thread.is_alive():
            raise CardError(self.name, "the reader is not open")
        future: concurrent.futures.Future[CardInfo] = concurrent.futures.Future()
        self._jobs.put(
            _Job(
                lambda link: card_info(
                    link.transmit, pin, read_my_number=cfg.read_my_number, device=self.name
                ),
                future,
            )
        )
        session = self._session
        if session is not None:
            session.cancel()
        info = await asyncio.wrap_future(future)
        if cfg.store_card_info:
            card = self._last_card or {}
            data: dict[str, Any] = {
                k: card[k] for k in ("card_type", "uid", "auth_cert") if k in card
            }
            self._post(
                Read(device=self.name, kind="card_info", data=data, personal=info.personal())
            )
        return info

    async def prove_possession(self, pin: str) -> dict[str, Any]:
        """Chain check and the PIN-safe possession proof on the card in this reader.

        Raises PinRefused / CardError like `read_card_info`. The result (verdict,
        chain, possession, nonce, signature, certificate) is also yielded as a
        `card_auth` record, so the registry can verify the signature again.
        """
        if self._thread is None or not self._thread.is_alive():
            raise CardError(self.name, "the reader is not open")
        anchors = self.anchors()
        synced = self.clock_synced()
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._jobs.put(
            _Job(
                lambda link: jpki.prove_possession(
                    link.transmit, pin, self.name, anchors, datetime.now(UTC), synced
                ),
                future,
            )
        )
        session = self._session
        if session is not None:
            session.cancel()
        result = await asyncio.wrap_future(future)
        card = self._last_card or {}
        data: dict[str, Any] = {k: card[k] for k in ("card_type", "uid", "auth_cert") if k in card}
        data["card_auth"] = result
        self._post(Read(device=self.name, kind="card_auth", data=data))
        log.info("%s: possession proof: %s", self.name, result["verdict"])
        return result

    # thread side

    def _post(self, item: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _resolve(self, fut: asyncio.Future[str], value: str | BaseException) -> None:
        def set_it() -> None:
            if fut.done():
                return
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(set_it)

    def _run(self, ready: asyncio.Future[str]) -> None:
        try:
            session = PcscSession(self.name)
        except DeviceUnavailable as e:
            self._resolve(ready, e)
            return
        self._session = session
        try:
            reader = self._wait_for_reader(session)
            if reader is None:
                self._resolve(ready, DeviceUnavailable(self.name, "closed"))
                return
            self._resolve(ready, reader)
            self._watch(session, reader)
        except NoService as e:
            err = DeviceUnavailable(self.name, f"pcscd went away: {e}")
            self._resolve(ready, err)
            self._post(err)
        except DeviceUnavailable as e:
            self._resolve(ready, e)
            self._post(e)
        except Exception as e:  # a bug: make it visible, let the supervisor restart us
            log.exception("%s: reader thread failed", self.name)
            err = DeviceUnavailable(self.name, f"reader thread failed: {type(e).__name__}")
            self._resolve(ready, err)
            self._post(err)
        finally:
            self._session = None
            self._fail_jobs(DeviceUnavailable(self.name, "reader closed"))
            session.release()
            if not self._stop.is_set():
                self._post(_GONE)  # reads() must never wait on a thread that is gone

    def _wait_for_reader(self, session: PcscSession) -> str | None:
        """The reader, as soon as it is plugged in: waits on the PnP pseudo-reader."""
        pattern = self.config.reader
        pnp_state = 0
        warned = False
        while not self._stop.is_set():
            name = session.find(pattern)
            if name is not None:
                return name
            self._fail_jobs(CardError(self.name, "no reader"))
            if not warned:
                log.warning("%s: waiting for a reader matching %r", self.name, pattern)
                warned = True
            new = session.wait([(PNP_NOTIFICATION, pnp_state)], WAIT_MS)
            if new is not None:
                pnp_state = new[0][1] & ~0x2  # ~SCARD_STATE_CHANGED
        return None

    def _watch(self, session: PcscSession, reader: str) -> None:
        sc = session.sc
        state = sc.SCARD_STATE_UNAWARE
        pnp_state = sc.SCARD_STATE_UNAWARE
        present_key: int | None = None  # event counter of the card we read
        while not self._stop.is_set():
            self._run_jobs(session, reader)
            new = session.wait([(reader, state), (PNP_NOTIFICATION, pnp_state)], WAIT_MS)
            if new is None:
                continue
            (_, ev, atr), (_, pnp_ev, _) = new
            state = ev & ~sc.SCARD_STATE_CHANGED
            pnp_state = pnp_ev & ~sc.SCARD_STATE_CHANGED
            if ev & (sc.SCARD_STATE_UNKNOWN | sc.SCARD_STATE_IGNORE):
                self._post(DeviceUnavailable(self.name, f"reader {reader} was unplugged"))
                return
            if ev & sc.SCARD_STATE_PRESENT:
                counter = ev >> 16  # pcsc-lite: card event counter in the high word
                if present_key != counter:
                    present_key = counter
                    if ev & sc.SCARD_STATE_MUTE:
                        self._post(ReadFault(self.name, "the card does not answer (mute)"))
                    else:
                        self._post(self._on_insert(session, reader, atr))
            elif ev & sc.SCARD_STATE_EMPTY:
                if present_key is not None:
                    log.debug("%s: card removed", self.name)
                present_key = None
                self._last_card = None

    def _on_insert(self, session: PcscSession, reader: str, atr: bytes) -> Read | ReadFault:
        captured = datetime.now(UTC)
        try:
            link = session.connect(reader)
        except CardError as e:
            return ReadFault(self.name, e.reason)
        try:
            certs: list[bytes] = []
            data, problems = identify_card(
                link.transmit, link.atr or atr, self.name, captured, certs.append
            )
            if data["card_type"] in ("mynumber", "unknown"):
                self._check_chain(link, data, captured, certs[0] if certs else None)
        except CardError as e:
            log.warning("%s: %s", self.name, e.reason)
            return ReadFault(self.name, e.reason)
        finally:
            link.close(reset=False)
        if problems:
            data["problems"] = problems
            if "auth_cert_expired" in problems:
                log.warning("%s: the card's user-auth certificate has EXPIRED", self.name)
        self._last_card = data
        log.debug("%s: %s card read", self.name, data["card_type"])
        return Read(device=self.name, kind="card", data=data, captured_at=captured)

    def _check_chain(
        self, link: CardLink, data: dict[str, Any], now: datetime, cert: bytes | None
    ) -> None:
        """The offline chain check (no PIN) onto the record as `card_auth`."""
        if data["card_type"] == "unknown" and jpki.probe_generation(link.transmit) == "":
            return  # not a My Number card at all: nothing to judge
        result, _ = jpki.read_and_check(
            link.transmit,
            self.name,
            self.anchors(),
            now,
            self.clock_synced(),
            cert,
        )
        data["card_auth"] = result.record()
        if result.verdict != jpki.GENUINE:
            log.warning("%s: card check: %s", self.name, result.verdict)

    def _run_jobs(self, session: PcscSession, reader: str) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                link = session.connect(reader)
            except CardError as e:
                job.future.set_exception(CardError(self.name, f"no card: {e.reason}"))
                continue
            try:
                job.future.set_result(job.fn(link))
            except NoService:
                job.future.set_exception(DeviceUnavailable(self.name, "pcscd went away"))
                raise
            except Exception as e:
                job.future.set_exception(e)
            finally:
                link.close(reset=True)  # the card forgets the PIN it accepted

    def _fail_jobs(self, err: Exception) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(err)


#: mypy --strict fails here when the driver and the capability it offers drift apart
_offers_card_info: type[CardInfoProvider] = PcscDriver
_offers_possession: type[PossessionProver] = PcscDriver
_offers_anchors: type[TrustAnchorTaker] = PcscDriver
