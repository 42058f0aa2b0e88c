"""IC card readers through pcscd (PC/SC, pyscard): My Number cards, 住基カード, staff badges.

On every card insertion the driver records the card type, ATR and UID and, for
a My Number card, the user-authentication certificate's serial and issuer
(readable without a PIN): that pair identifies the holder's current
certificate. The signature certificate is never read.

Threading: pyscard blocks, and a PC/SC context belongs to one thread. Each
reader gets ONE dedicated thread that owns the context and runs our own
`SCardGetStatusChange` loop (not pyscard's CardMonitor, which stops for good
when pcscd restarts). Results cross to asyncio with `call_soon_threadsafe`.
Work asked from asyncio (the PIN flow) is queued to the same thread, which is
woken with `SCardCancel`, so APDU sequences never interleave.

PIN rules (a locked card costs the resident a trip to the counter): read the
retry counter without spending a try, refuse below 2 tries, VERIFY exactly
once, never retry, and reset the card afterwards so the unlocked state does not
outlive the read. The PIN is never logged or stored; personal data only goes
into `Read.personal`, which the outbox encrypts.

APDUs, file layouts and status words: ../shared/FORMATS.md (sources: jpki/myna,
TRETJapanNFCReader).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.contract.records import Read, ReadFault
from agent.drivers.base import Driver
from agent.errors import CardError, DeviceUnavailable, DriverMissing, PinRefused

if TYPE_CHECKING:
    from agent.config import PcscDevice

log = logging.getLogger(__name__)

PNP_NOTIFICATION = "\\\\?PnP?\\Notification"
JPKI_AID = bytes.fromhex("D392F000260100000001")
SUPPORT_AID = bytes.fromhex("D3921000310001010408")  # 券面事項入力補助AP
EF_TOKEN = 0x0006
EF_AUTH_CERT = 0x000A
EF_SUPPORT_PIN = 0x0011
EF_MY_NUMBER = 0x0001
EF_ATTRIBUTES = 0x0002
MIN_TRIES = 2
CHUNK = 256
PCSC_PART3_RID = bytes.fromhex("A000000306")
#: PC/SC part 3 "card name" values of MIFARE cards (Classic 1K/4K, Ultralight, Mini,
#: Plus, Ultralight C)
MIFARE_NAMES = {0x0001, 0x0002, 0x0003, 0x0026, 0x0036, 0x0037, 0x0038, 0x0039, 0x003A}
FELICA_NAME = 0x003B
#: backstop for a SCardCancel that raced the wait it meant to interrupt
WAIT_MS = 2000

Transmit = Callable[[bytes], tuple[bytes, int]]


# -- pure parts: no PC/SC, no I/O -------------------------------------------------------


def ber_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """BER-TLV sequence -> [(tag, value)]. Multi-byte tags, short and long lengths."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        first = data[pos]
        if first in (0x00, 0xFF) and (pos + 1 >= len(data) or data[pos + 1] in (0x00, 0xFF)):
            break  # padding of the file
        tag = first
        pos += 1
        if first & 0x1F == 0x1F:
            while True:
                if pos >= len(data):
                    raise ValueError("truncated tag")
                tag = (tag << 8) | data[pos]
                pos += 1
                if not data[pos - 1] & 0x80:
                    break
        length, pos = ber_length(data, pos)
        if pos + length > len(data):
            raise ValueError(f"value of tag {tag:X} runs past the data")
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def ber_length(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a BER length at `pos`; returns (length, position after it)."""
    if pos >= len(data):
        raise ValueError("truncated length")
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    if n == 0 or n > 3 or pos + 1 + n > len(data):
        raise ValueError("bad length")
    return int.from_bytes(data[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def der_total_length(head: bytes) -> int:
    """Total size of a DER object from its first bytes (`30 82 06 1F` -> 0x0623)."""
    if not head or head[0] != 0x30:
        raise ValueError("not a DER SEQUENCE")
    length, after = ber_length(head, 1)
    return after + length


def storage_card_type(atr: bytes) -> str | None:
    """FeliCa / MIFARE from a PC/SC part 3 storage-card ATR, else None."""
    at = atr.find(b"\x4f\x0c" + PCSC_PART3_RID)
    if at < 0 or len(atr) < at + 10:
        return None
    name = int.from_bytes(atr[at + 8 : at + 10], "big")
    if name == FELICA_NAME:
        return "felica"
    if name in MIFARE_NAMES:
        return "mifare"
    return None


def certificate_fields(der: bytes, now: datetime) -> tuple[dict[str, str], list[str]]:
    """The identifying fields of the user-auth certificate, and its problems."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    fields = {
        "serial": f"{cert.serial_number:x}",
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    problems = []
    if now > not_after:
        problems.append("auth_cert_expired")
    if now < not_before:
        problems.append("auth_cert_not_yet_valid")
    return fields, problems


SEX = {"1": "male", "2": "female", "9": "not_applicable", "0": "unknown"}


def parse_four_attributes(ef: bytes) -> dict[str, str]:
    """EF 0002 of the 入力補助AP: FF 20 { DF 21 header, DF 22 name, DF 23 address,
    DF 24 birth date, DF 25 sex } -> fields. Parsed as BER, never byte-indexed."""
    outer = dict(ber_tlvs(ef))
    if 0xFF20 not in outer:
        raise ValueError("no FF 20 template")
    inner = dict(ber_tlvs(outer[0xFF20]))
    missing = [f"{t:X}" for t in (0xDF22, 0xDF23, 0xDF24, 0xDF25) if t not in inner]
    if missing:
        raise ValueError(f"missing tags {', '.join(missing)}")
    birth = inner[0xDF24].decode("ascii").strip()
    sex_code = inner[0xDF25].decode("ascii").strip()
    return {
        "name": inner[0xDF22].decode("utf-8"),
        "address": inner[0xDF23].decode("utf-8"),
        "birth_date": f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}" if len(birth) == 8 else birth,
        "sex": SEX.get(sex_code, sex_code),
    }


def parse_my_number(ef: bytes) -> str:
    """EF 0001: `FF 10 0C` + 12 ASCII digits, checked with python-stdnum."""
    from stdnum.jp import in_

    values = dict(ber_tlvs(ef))
    if 0xFF10 not in values:
        raise ValueError("no FF 10 tag")
    number = values[0xFF10].decode("ascii")
    if not in_.is_valid(number):
        raise ValueError("check digit does not match")  # never say the number
    return str(number)


class OperatorSessions:
    """Staff badge taps -> the operator every record carries. Pure: the clock is passed in.

    The station keeps one (agent/supervisor.py), fed by the card reads of every
    reader, so a session survives a driver restart and covers every device.

    A mapped badge starts a session; the same badge again ends it; another
    mapped badge takes over. A session ends by itself after `timeout_s`
    without activity (a tap or a record).
    """

    def __init__(self, operators: dict[str, str], timeout_s: float) -> None:
        self.operators = {k.lower(): v for k, v in operators.items()}
        self.timeout_s = timeout_s
        self._current: str | None = None
        self._last = 0.0

    def tap(self, uid: str, now: float) -> tuple[str, str] | None:
        """A badge with `uid` was tapped: ("start"|"end", operator id), or None if unmapped."""
        op = self.operators.get(uid.lower())
        if op is None:
            return None
        if self.current(now) == op:
            self._current = None
            return ("end", op)
        self._current, self._last = op, now
        return ("start", op)

    def current(self, now: float) -> str | None:
        if self._current is not None and now - self._last > self.timeout_s:
            self._current = None
        return self._current

    def touch(self, now: float) -> str | None:
        """A record is being made: who is on duty (and keep the session alive)."""
        op = self.current(now)
        if op is not None:
            self._last = now
        return op


# -- card protocol over any transmit function -------------------------------------------


def _apdu(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
    out = bytes([cla, ins, p1, p2])
    if data:
        out += bytes([len(data)]) + data
    if le is not None:
        out += bytes([le & 0xFF])
    return out


def _select_ap(tx: Transmit, aid: bytes) -> int:
    return tx(_apdu(0x00, 0xA4, 0x04, 0x0C, aid))[1]


def _select_ef(tx: Transmit, fid: int) -> int:
    return tx(_apdu(0x00, 0xA4, 0x02, 0x0C, fid.to_bytes(2, "big")))[1]


def _read_binary(tx: Transmit, offset: int, length: int) -> tuple[bytes, int]:
    return tx(_apdu(0x00, 0xB0, (offset >> 8) & 0x7F, offset & 0xFF, le=length))


def _read_der(tx: Transmit, device: str) -> bytes:
    """Read the selected EF as one DER object: 7-byte head, then <= 256-byte chunks."""
    head, sw = _read_binary(tx, 0, 7)
    if sw != 0x9000:
        raise CardError(device, f"reading the certificate header: SW {sw:04X}")
    try:
        total = der_total_length(head)
    except ValueError as e:
        raise CardError(device, f"certificate header: {e}") from None
    buf = bytearray(head[:total])
    while len(buf) < total:
        n = min(CHUNK, total - len(buf))
        chunk, sw = _read_binary(tx, len(buf), n)
        if sw != 0x9000 or not chunk:
            raise CardError(device, f"reading the certificate at {len(buf)}: SW {sw:04X}")
        buf += chunk[:n]
    return bytes(buf)


def _read_ef(tx: Transmit, device: str, what: str) -> bytes:
    """Read a small EF whole (the 4 attributes are well under 256 bytes, but be safe)."""
    data = bytearray()
    while True:
        chunk, sw = _read_binary(tx, len(data), 0)  # Le 00: up to 256
        if sw == 0x6B00 and data:
            break
        if sw not in (0x9000, 0x6282):
            raise CardError(device, f"reading {what}: SW {sw:04X}")
        data += chunk
        if len(chunk) < CHUNK or sw == 0x6282 or len(data) >= 0x7F00:
            break
    return bytes(data)


def _uid(tx: Transmit) -> str | None:
    data, sw = tx(bytes.fromhex("FFCA000000"))
    return data.hex() if sw == 0x9000 and data else None


def identify_card(
    tx: Transmit, atr: bytes, device: str, now: datetime
) -> tuple[dict[str, Any], list[str]]:
    """What a freshly inserted card is: `data` for the record, and its problems."""
    data: dict[str, Any] = {"card_type": "unknown", "atr": atr.hex(), "uid": _uid(tx)}
    problems: list[str] = []
    storage = storage_card_type(atr)
    if storage is not None:
        data["card_type"] = storage
        return data, problems
    if _select_ap(tx, JPKI_AID) != 0x9000:
        return data, problems
    token = b""
    if _select_ef(tx, EF_TOKEN) == 0x9000:
        raw, sw = _read_binary(tx, 0, 0x20)
        token = raw.rstrip(b" \x00") if sw == 0x9000 else b""
    if token == b"JPKIAPICCTOKEN2":
        data["card_type"] = "mynumber"
    elif token == b"JPKIAPICCTOKEN":
        data["card_type"] = "juki"
        return data, problems
    else:
        return data, problems
    if _select_ef(tx, EF_AUTH_CERT) != 0x9000:
        problems.append("auth_cert_missing")
        return data, problems
    der = _read_der(tx, device)
    try:
        fields, cert_problems = certificate_fields(der, now)
    except ValueError as e:
        raise CardError(device, f"user-auth certificate does not parse: {e}") from None
    data["auth_cert"] = fields
    problems += cert_problems
    return data, problems


@dataclass(frozen=True, slots=True)
class CardInfo:
    """What the 入力補助AP gave. Personal data: never log it; `repr` hides it."""

    name: str = field(repr=False)
    address: str = field(repr=False)
    birth_date: str = field(repr=False)
    sex: str = field(repr=False)
    my_number: str | None = field(default=None, repr=False)
    tries_left: int = 0

    def personal(self) -> dict[str, str]:
        out = {
            "name": self.name,
            "address": self.address,
            "birth_date": self.birth_date,
            "sex": self.sex,
        }
        if self.my_number is not None:
            out["my_number"] = self.my_number
        return out


def support_tries(tx: Transmit, device: str) -> int:
    """Select the 入力補助AP and its PIN EF, and read the retry counter (spends nothing)."""
    if _select_ap(tx, SUPPORT_AID) != 0x9000:
        raise CardError(device, "not a My Number card (no 券面事項入力補助AP)")
    if _select_ef(tx, EF_SUPPORT_PIN) != 0x9000:
        raise CardError(device, "the 入力補助AP has no PIN EF")
    _, sw = tx(bytes.fromhex("00200080"))
    if sw in (0x6983, 0x6984):
        return 0
    if sw & 0xFFF0 == 0x63C0:
        return sw & 0x0F
    raise CardError(device, f"retry counter: unexpected SW {sw:04X}")


def card_info(tx: Transmit, pin: str, *, read_my_number: bool, device: str) -> CardInfo:
    """The PIN flow. VERIFY at most once; refuse when fewer than 2 tries remain."""
    if len(pin) != 4 or not pin.isdigit():
        raise PinRefused(device, "the PIN must be 4 digits; the card was not asked", None)
    tries = support_tries(tx, device)
    if tries == 0:
        raise PinRefused(device, "the card's PIN is locked (reset at the municipal counter)", 0)
    if tries < MIN_TRIES:
        raise PinRefused(
            device,
            f"only {tries} PIN try left: not trying (reset at the municipal counter)",
            tries,
        )
    _, sw = tx(_apdu(0x00, 0x20, 0x00, 0x80, pin.encode("ascii")))
    if sw & 0xFFF0 == 0x63C0:
        left = sw & 0x0F
        raise PinRefused(device, f"wrong PIN: {left} tries left; not retried", left)
    if sw in (0x6983, 0x6984):
        raise PinRefused(device, "the card's PIN is locked", 0)
    if sw != 0x9000:
        raise CardError(device, f"VERIFY: unexpected SW {sw:04X}")
    if _select_ef(tx, EF_ATTRIBUTES) != 0x9000:
        raise CardError(device, "no 4-attribute EF")
    try:
        attrs = parse_four_attributes(_read_ef(tx, device, "the 4 attributes"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CardError(device, f"4-attribute EF does not parse: {e}") from None
    number = None
    if read_my_number:
        if _select_ef(tx, EF_MY_NUMBER) != 0x9000:
            raise CardError(device, "no My Number EF")
        try:
            number = parse_my_number(_read_ef(tx, device, "the My Number EF"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CardError(device, f"My Number EF: {e}") from None
    return CardInfo(tries_left=3, my_number=number, **attrs)


# -- pyscard boundary --------------------------------------------------------------------


def _scard(device: str) -> Any:
    try:
        from smartcard import scard
    except ImportError:
        raise DriverMissing(
            device, "pyscard is not installed (pip install 'madoguchi[card]')"
        ) from None
    return scard


class _NoService(Exception):
    """pcscd went away (stopped, restarted)."""


class PcscSession:
    """One PC/SC context (one thread) and the card operations on one reader."""

    NO_SERVICE = (0x8010001D, 0x8010001E, 0x80100003)  # no service, stopped, bad handle

    def __init__(self, device: str) -> None:
        self.device = device
        self.sc = _scard(device)
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
        that died mid-call with varying codes; 0x8010006A was seen on 1.9.9)."""
        hr, _ = self.sc.SCardListReaders(self.ctx, [])
        return hr in self.NO_SERVICE or hr == 0x80100003  # invalid handle

    def readers(self) -> list[str]:
        hr, names = self.sc.SCardListReaders(self.ctx, [])
        if hr == 0x8010002E:  # no readers available
            return []
        if hr in self.NO_SERVICE:
            raise _NoService(self._msg(hr))
        if hr != 0:
            raise DeviceUnavailable(self.device, f"listing readers: {self._msg(hr)}")
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
            raise _NoService(self._msg(hr))
        if hr != 0:
            raise DeviceUnavailable(self.device, f"status change: {self._msg(hr)}")
        return [(n, int(s), bytes(a)) for n, s, a in new]

    def connect(self, reader: str) -> CardLink:
        sc = self.sc
        hr, card, proto = sc.SCardConnect(
            self.ctx, reader, sc.SCARD_SHARE_SHARED, sc.SCARD_PROTOCOL_T0 | sc.SCARD_PROTOCOL_T1
        )
        if hr in self.NO_SERVICE:
            raise _NoService(self._msg(hr))
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
                raise CardError(self.session.device, "card removed during the read")
            if hr in PcscSession.NO_SERVICE:
                raise _NoService(self.session._msg(hr))
            raise CardError(self.session.device, f"transmit: {self.session._msg(hr)}")
        resp = bytes(resp)
        if len(resp) < 2:
            # every card answer ends in a status word: nothing at all means the card went
            # (vpcd says so this way; CCID readers with SCARD_W_REMOVED_CARD above)
            raise CardError(self.session.device, "card removed during the read (no answer)")
        return resp[:-2], int.from_bytes(resp[-2:], "big")

    def close(self, *, reset: bool) -> None:
        """End the transaction; `reset` drops a verified PIN state on the card."""
        sc = self.session.sc
        how = sc.SCARD_RESET_CARD if reset else sc.SCARD_LEAVE_CARD
        sc.SCardEndTransaction(self.card, how)
        sc.SCardDisconnect(self.card, how)


def read_card_now(reader_pattern: str, *, device: str = "card-info") -> dict[str, Any]:
    """Blocking, for the CLI: what card is in the reader now (no PIN)."""
    session = PcscSession(device)
    try:
        reader = _require_reader(session, reader_pattern, device)
        link = session.connect(reader)
        try:
            data, problems = identify_card(link.transmit, link.atr, device, datetime.now(UTC))
        finally:
            link.close(reset=False)
        data["reader"] = reader
        if problems:
            data["problems"] = problems
        return data
    except _NoService as e:
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
    except _NoService as e:
        raise DeviceUnavailable(device, f"pcscd went away: {e}") from None
    finally:
        session.release()


def _require_reader(session: PcscSession, pattern: str, device: str) -> str:
    name = session.find(pattern)
    if name is None:
        have = ", ".join(session.readers()) or "none"
        raise DeviceUnavailable(device, f"no reader matches {pattern!r} (readers: {have})")
    return name


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

    # asyncio side

    async def open(self) -> None:
        _scard(self.name)  # DriverMissing now, not in the thread
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
        except _NoService as e:
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
            data, problems = identify_card(link.transmit, link.atr or atr, self.name, captured)
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
            except _NoService:
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
