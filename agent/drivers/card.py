"""The card protocol of My Number cards, 住基カード and badges: pure, no PC/SC, no I/O.

Everything here works over a `Transmit` callable (APDU in, (data, status word)
out), so it runs the same against pcscd (agent/drivers/scard.py's `CardLink`)
and against an emulated card in a test: APDU building, BER-TLV and DER lengths,
the user-auth certificate's identifying fields, the 4-attribute and My Number
parsers, what an inserted card is (`identify_card`), and the PIN flow
(`card_info`).

PIN rules (a locked card costs the resident a trip to the counter): read the
retry counter without spending a try, refuse below `MIN_TRIES`, VERIFY exactly
once, never retry. The PIN is never logged or put in an exception.

APDUs, file layouts and status words: ../shared/FORMATS.md (sources: jpki/myna,
TRETJapanNFCReader).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.errors import CardError, PinRefused

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


# -- card protocol over any transmit function -------------------------------------------
# APDU primitives (ISO 7816-4), public: jpki.py's authenticity checks use them too


def apdu(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
    """One short APDU: header, Lc + data when there is data, Le when one is asked."""
    out = bytes([cla, ins, p1, p2])
    if data:
        out += bytes([len(data)]) + data
    if le is not None:
        out += bytes([le & 0xFF])
    return out


def select_ap(tx: Transmit, aid: bytes) -> int:
    """SELECT an application by AID (no answer data asked); its status word."""
    return tx(apdu(0x00, 0xA4, 0x04, 0x0C, aid))[1]


def select_ef(tx: Transmit, fid: int) -> int:
    """SELECT an elementary file of the current application; its status word."""
    return tx(apdu(0x00, 0xA4, 0x02, 0x0C, fid.to_bytes(2, "big")))[1]


def read_binary(tx: Transmit, offset: int, length: int) -> tuple[bytes, int]:
    """READ BINARY of `length` bytes at `offset` of the selected EF."""
    return tx(apdu(0x00, 0xB0, (offset >> 8) & 0x7F, offset & 0xFF, le=length))


def read_der(tx: Transmit, device: str) -> bytes:
    """Read the selected EF as one DER object: 7-byte head, then <= 256-byte chunks."""
    head, sw = read_binary(tx, 0, 7)
    if sw != 0x9000:
        raise CardError(device, f"reading the certificate header: SW {sw:04X}")
    try:
        total = der_total_length(head)
    except ValueError as e:
        raise CardError(device, f"certificate header: {e}") from None
    buf = bytearray(head[:total])
    while len(buf) < total:
        n = min(CHUNK, total - len(buf))
        chunk, sw = read_binary(tx, len(buf), n)
        if sw != 0x9000 or not chunk:
            raise CardError(device, f"reading the certificate at {len(buf)}: SW {sw:04X}")
        buf += chunk[:n]
    return bytes(buf)


def _read_ef(tx: Transmit, device: str, what: str) -> bytes:
    """Read a small EF whole (the 4 attributes are well under 256 bytes, but be safe)."""
    data = bytearray()
    while True:
        chunk, sw = read_binary(tx, len(data), 0)  # Le 00: up to 256
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
    tx: Transmit,
    atr: bytes,
    device: str,
    now: datetime,
    on_cert: Callable[[bytes], None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """What a freshly inserted card is: `data` for the record, and its problems.
    `on_cert` gets the auth certificate's DER (the chain check reuses it)."""
    data: dict[str, Any] = {"card_type": "unknown", "atr": atr.hex(), "uid": _uid(tx)}
    problems: list[str] = []
    storage = storage_card_type(atr)
    if storage is not None:
        data["card_type"] = storage
        return data, problems
    if select_ap(tx, JPKI_AID) != 0x9000:
        return data, problems
    token = b""
    if select_ef(tx, EF_TOKEN) == 0x9000:
        raw, sw = read_binary(tx, 0, 0x20)
        token = raw.rstrip(b" \x00") if sw == 0x9000 else b""
    if token == b"JPKIAPICCTOKEN2":
        data["card_type"] = "mynumber"
    elif token == b"JPKIAPICCTOKEN":
        data["card_type"] = "juki"
        return data, problems
    else:
        return data, problems
    if select_ef(tx, EF_AUTH_CERT) != 0x9000:
        problems.append("auth_cert_missing")
        return data, problems
    der = read_der(tx, device)
    if on_cert is not None:
        on_cert(der)
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

    def attributes(self) -> dict[str, str]:
        """The 4 attributes (基本4情報) without the My Number: what the kiosk shows."""
        return {
            "name": self.name,
            "address": self.address,
            "birth_date": self.birth_date,
            "sex": self.sex,
        }

    def personal(self) -> dict[str, str]:
        """Everything read, for `Read.personal` (encrypted by the outbox)."""
        out = self.attributes()
        if self.my_number is not None:
            out["my_number"] = self.my_number
        return out


def support_tries(tx: Transmit, device: str) -> int:
    """Select the 入力補助AP and its PIN EF, and read the retry counter (spends nothing)."""
    if select_ap(tx, SUPPORT_AID) != 0x9000:
        raise CardError(device, "not a My Number card (no 券面事項入力補助AP)")
    if select_ef(tx, EF_SUPPORT_PIN) != 0x9000:
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
    _, sw = tx(apdu(0x00, 0x20, 0x00, 0x80, pin.encode("ascii")))
    if sw & 0xFFF0 == 0x63C0:
        left = sw & 0x0F
        raise PinRefused(device, f"wrong PIN: {left} tries left; not retried", left)
    if sw in (0x6983, 0x6984):
        raise PinRefused(device, "the card's PIN is locked", 0)
    if sw != 0x9000:
        raise CardError(device, f"VERIFY: unexpected SW {sw:04X}")
    if select_ef(tx, EF_ATTRIBUTES) != 0x9000:
        raise CardError(device, "no 4-attribute EF")
    try:
        attrs = parse_four_attributes(_read_ef(tx, device, "the 4 attributes"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CardError(device, f"4-attribute EF does not parse: {e}") from None
    number = None
    if read_my_number:
        if select_ef(tx, EF_MY_NUMBER) != 0x9000:
            raise CardError(device, "no My Number EF")
        try:
            number = parse_my_number(_read_ef(tx, device, "the My Number EF"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CardError(device, f"My Number EF: {e}") from None
    return CardInfo(tries_left=3, my_number=number, **attrs)
