"""The pyscard boundary: one PC/SC context, a card link, and the blocking reads the CLI uses.

`smartcard` is imported lazily (`require_pyscard`), so a station without card
readers never loads it, and a missing pyscard is `DriverMissing` at `open()`.
A PC/SC context belongs to one thread: the driver (agent/drivers/pcsc.py)
makes one `PcscSession` per reader thread. `CardLink.transmit` is the
`Transmit` seam of the card protocol (agent/drivers/card.py).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from agent.drivers.card import CardInfo, card_info, identify_card
from agent.errors import CardError, DeviceUnavailable, DriverMissing


def require_pyscard(device: str) -> Any:
    """pyscard's `scard` module, or `DriverMissing` where it is not installed."""
    try:
        from smartcard import scard
    except ImportError:
        raise DriverMissing(
            device, "pyscard is not installed (pip install 'madoguchi[card]')"
        ) from None
    return scard


class NoService(Exception):
    """pcscd went away (stopped, restarted)."""


class PcscSession:
    """One PC/SC context (one thread) and the card operations on one reader."""

    NO_SERVICE = (0x8010001D, 0x8010001E, 0x80100003)  # no service, stopped, bad handle
    NO_READERS = 0x8010002E

    def __init__(self, device: str) -> None:
        self.device = device
        self.sc = require_pyscard(device)
        hr, ctx = self.sc.SCardEstablishContext(self.sc.SCARD_SCOPE_USER)
        if hr != 0:
            raise DeviceUnavailable(device, f"pcscd not reachable: {self._msg(hr)}")
        self.ctx = ctx

    def _msg(self, hr: int) -> str:
        return f"{self.sc.SCardGetErrorMessage(hr).strip()} (0x{hr & 0xFFFFFFFF:08X})"

    def release(self) -> None:
        self.sc.SCardReleaseContext(self.ctx)

    def cancel(self) -> None:
        """Wake a status-change wait (thread safe, the one call PC/SC allows across threads)."""
        self.sc.SCardCancel(self.ctx)

    def _daemon_gone(self) -> bool:
        """After an odd error: is it pcscd that went? (libpcsclite reports a daemon
        that died mid-call with varying codes; 0x8010006A was seen on 1.9.9, on a
        plain listing too, where it cannot be told from a polkit refusal.) A fresh
        context is not tried: behind a socket-activation listener it waits for a
        daemon that may never come."""
        hr, _ = self.sc.SCardListReaders(self.ctx, [])
        return hr in self.NO_SERVICE

    def readers(self) -> list[str]:
        hr, names = self.sc.SCardListReaders(self.ctx, [])
        if hr == self.NO_READERS:
            return []
        if hr in self.NO_SERVICE:
            raise NoService(self._msg(hr))
        if hr != 0:
            if self._daemon_gone():
                raise NoService(self._msg(hr))
            raise DeviceUnavailable(
                self.device, f"pcscd refused to list readers (stopped, or polkit): {self._msg(hr)}"
            )
        return list(names)

    def find(self, pattern: str) -> str | None:
        for name in sorted(self.readers()):
            if fnmatch.fnmatchcase(name, pattern):
                return name
        return None

    def wait(
        self, states: list[tuple[str, int]], timeout_ms: int
    ) -> list[tuple[str, int, bytes]] | None:
        """SCardGetStatusChange; None on timeout or cancel."""
        hr, new = self.sc.SCardGetStatusChange(self.ctx, timeout_ms, states)
        if hr in (0x8010000A, 0x80100002):  # timeout, cancelled
            return None
        if hr in self.NO_SERVICE or self._daemon_gone():
            raise NoService(self._msg(hr))
        if hr != 0:
            raise DeviceUnavailable(self.device, f"pcscd: status change: {self._msg(hr)}")
        return [(n, int(s), bytes(a)) for n, s, a in new]

    def connect(self, reader: str) -> CardLink:
        sc = self.sc
        hr, card, proto = sc.SCardConnect(
            self.ctx, reader, sc.SCARD_SHARE_SHARED, sc.SCARD_PROTOCOL_T0 | sc.SCARD_PROTOCOL_T1
        )
        if hr in self.NO_SERVICE:
            raise NoService(self._msg(hr))
        if hr != 0:
            raise CardError(self.device, f"cannot connect to the card: {self._msg(hr)}")
        return CardLink(self, card, proto)


class CardLink:
    """A connected card inside one transaction; `transmit` is the `Transmit` seam."""

    def __init__(self, session: PcscSession, card: Any, proto: int) -> None:
        self.session = session
        self.card = card
        sc = session.sc
        self.pci = sc.SCARD_PCI_T0 if proto == sc.SCARD_PROTOCOL_T0 else sc.SCARD_PCI_T1
        self.atr = b""
        self.gone = False  # the card left mid-transaction: nothing to reset
        hr = sc.SCardBeginTransaction(card)
        if hr != 0:
            self.close(reset=False)
            raise CardError(session.device, f"begin transaction: {session._msg(hr)}")
        hr, _name, _state, _proto, atr = sc.SCardStatus(card)
        if hr == 0:
            self.atr = bytes(atr)

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        sc = self.session.sc
        hr, resp = sc.SCardTransmit(self.card, self.pci, list(apdu))
        if hr != 0:
            if hr in (0x80100069, 0x8010000C, 0x80100068, 0x8010002F, 0x80100066, 0x80100067):
                # removed, no card, reset, comm error, unresponsive, unpowered
                self.gone = True
                raise CardError(self.session.device, "card removed during the read")
            if hr in PcscSession.NO_SERVICE:
                raise NoService(self.session._msg(hr))
            raise CardError(self.session.device, f"transmit: {self.session._msg(hr)}")
        resp = bytes(resp)
        if len(resp) < 2:
            # every card answer ends in a status word: nothing at all means the card went
            # (vpcd says so this way; CCID readers with SCARD_W_REMOVED_CARD above)
            self.gone = True
            raise CardError(self.session.device, "card removed during the read (no answer)")
        return resp[:-2], int.from_bytes(resp[-2:], "big")

    def close(self, *, reset: bool) -> None:
        """End the transaction; `reset` drops a verified PIN state on the card. A card
        that already left is not reset: resetting an absent card wedged the reader
        (pcscd + vpcd: the next card went unseen), and a removed card kept no state."""
        sc = self.session.sc
        how = sc.SCARD_RESET_CARD if reset and not self.gone else sc.SCARD_LEAVE_CARD
        sc.SCardEndTransaction(self.card, how)
        sc.SCardDisconnect(self.card, how)


def read_card_now(
    reader_pattern: str, *, device: str = "card-info", anchors: frozenset[str] | None = None
) -> dict[str, Any]:
    """Blocking, for the CLI: what card is in the reader now (no PIN); with `anchors`
    also the chain check (`card_auth`) by the station clock."""
    from agent.drivers import jpki

    session = PcscSession(device)
    try:
        reader = _require_reader(session, reader_pattern, device)
        link = session.connect(reader)
        try:
            now = datetime.now(UTC)
            certs: list[bytes] = []
            data, problems = identify_card(link.transmit, link.atr, device, now, certs.append)
            if anchors is not None and data["card_type"] in ("mynumber", "unknown"):
                result, _ = jpki.read_and_check(
                    link.transmit,
                    device,
                    anchors,
                    now,
                    jpki.kernel_clock_synced(),
                    certs[0] if certs else None,
                )
                data["card_auth"] = result.record()
        finally:
            link.close(reset=False)
        data["reader"] = reader
        if problems:
            data["problems"] = problems
        return data
    except NoService as e:
        raise DeviceUnavailable(device, f"pcscd went away: {e}") from None
    finally:
        session.release()


def read_card_info(
    reader: str, pin: str, *, read_my_number: bool = False, device: str = "card-info"
) -> CardInfo:
    """Blocking: the PIN flow on the card in `reader` (a name or glob). Raises PinRefused."""
    session = PcscSession(device)
    try:
        name = _require_reader(session, reader, device)
        link = session.connect(name)
        try:
            return card_info(link.transmit, pin, read_my_number=read_my_number, device=device)
        finally:
            link.close(reset=True)
    except NoService as e:
        raise DeviceUnavailable(device, f"pcscd went away: {e}") from None
    finally:
        session.release()


def prove_possession_now(
    reader: str, pin: str, anchors: frozenset[str], *, device: str = "card-info"
) -> dict[str, Any]:
    """Blocking, for `card-info --prove`: the possession proof. Raises PinRefused."""
    from agent.drivers import jpki

    session = PcscSession(device)
    try:
        name = _require_reader(session, reader, device)
        link = session.connect(name)
        try:
            return jpki.prove_possession(
                link.transmit, pin, device, anchors, datetime.now(UTC), jpki.kernel_clock_synced()
            )
        finally:
            link.close(reset=True)  # the card forgets the PIN it accepted
    except NoService as e:
        raise DeviceUnavailable(device, f"pcscd went away: {e}") from None
    finally:
        session.release()


def _require_reader(session: PcscSession, pattern: str, device: str) -> str:
    name = session.find(pattern)
    if name is None:
        have = ", ".join(session.readers()) or "none"
        raise DeviceUnavailable(device, f"no reader matches {pattern!r} (readers: {have})")
    return name


#: pcsc-lite's pseudo reader whose state changes when a reader is plugged in or out
PNP_READER = "\\\\?PnP?\\Notification"
_STATE_CHANGED, _STATE_PRESENT = 0x0002, 0x0020


def watch_cards(
    reader_pattern: str, *, device: str = "card-info", timeout_ms: int = 500
) -> Iterator[dict[str, Any]]:
    """Blocking, for `card-info --wait`: every reader and card change, like pcsc_scan.

    Yields `{"event": "reader_added" | "reader_removed" | "inserted" | "removed",
    "reader": name}`, and for "inserted" also "card" (what `read_card_now` gives).
    Waits in SCardGetStatusChange (`timeout_ms` only bounds how late Ctrl-C is seen).
    """
    session = PcscSession(device)
    try:
        known: dict[str, int] = {}
        pnp = 0
        while True:
            readers = [
                r for r in sorted(session.readers()) if fnmatch.fnmatchcase(r, reader_pattern)
            ]
            for name in [r for r in known if r not in readers]:
                del known[name]
                yield {"event": "reader_removed", "reader": name}
            for name in readers:
                if name not in known:
                    known[name] = 0  # SCARD_STATE_UNAWARE: the first wait tells the state
                    yield {"event": "reader_added", "reader": name}
            changes = session.wait(
                [*((r, known[r]) for r in readers), (PNP_READER, pnp)], timeout_ms
            )
            for name, state, _atr in changes or []:
                if name == PNP_READER:
                    pnp = state & ~_STATE_CHANGED
                    continue
                if name not in known:
                    continue
                was = known[name] & _STATE_PRESENT
                known[name] = state & ~_STATE_CHANGED
                if state & _STATE_PRESENT and not was:
                    yield {
                        "event": "inserted",
                        "reader": name,
                        "card": _identify(session, name, device),
                    }
                elif was and not state & _STATE_PRESENT:
                    yield {"event": "removed", "reader": name}
    except NoService as e:
        raise DeviceUnavailable(device, f"pcscd went away: {e}") from None
    finally:
        session.release()


def _identify(session: PcscSession, reader: str, device: str) -> dict[str, Any]:
    """What card this is (no PIN); a card that cannot be read is a `problems` entry."""
    try:
        link = session.connect(reader)
    except CardError as e:
        return {
            "reader": reader,
            "card_type": "unknown",
            "atr": "",
            "uid": None,
            "problems": [e.reason],
        }
    try:
        data, problems = identify_card(link.transmit, link.atr, device, datetime.now(UTC))
    except CardError as e:
        data, problems = {"card_type": "unknown", "atr": link.atr.hex(), "uid": None}, [e.reason]
    finally:
        link.close(reset=False)
    data["reader"] = reader
    if problems:
        data["problems"] = problems
    return data
