"""Is this My Number card genuine: the offline chain check and the PIN-safe possession proof.

Pure like agent/drivers/card.py: everything runs over a `Transmit` callable, so
the same code serves pcscd (the driver, `card-info`) and the emulated cards of
the tests.

Chain check (`check_chain`, no PIN): the user-auth certificate (JPKI EF 000A)
must be signed by a CA certificate whose SHA-256 fingerprint is pinned in the
config (`jpki_anchors`). The CA certificate the card carries next to it (EF
000B) is only a *candidate*: it is trusted because its fingerprint is pinned,
never because the card offers it. Validity is judged by the station clock only
when that clock is synced; otherwise the verdict is `clock_unsynced`.
Revocation is not checked at the station (J-LIS CRLs go only to approved
verifiers): every result says `revocation: not_checked`.

Possession proof (`prove_possession`, with the 4-digit auth PIN): the same PIN
rules as the 4-attribute read (retry counter read without spending a try,
refuse below `MIN_TRIES`, VERIFY once, never retry), then the card signs a
fresh station nonce with the auth key (EF 0017, `80 2A 00 80`) and the
signature is verified against the certificate's public key. RSA (PKCS#1 v1.5
over a SHA-256 DigestInfo, as jpki/myna sends it) and ECDSA P-384 (SHA-384).

Nothing here logs; the PIN never reaches an exception or a result.
APDUs and sources: docs/FORMATS-cards.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.drivers.card import (
    JPKI_AID,
    MIN_TRIES,
    SUPPORT_AID,
    Transmit,
    apdu,
    read_binary,
    read_der,
    select_ap,
    select_ef,
)
from agent.errors import CardError, PinRefused

EF_AUTH_CERT = 0x000A
EF_AUTH_CA = 0x000B
EF_AUTH_KEY = 0x0017
EF_AUTH_PIN = 0x0018
TOKEN_MYNUMBER = b"JPKIAPICCTOKEN2"

#: SHA-256 fingerprints of the J-LIS JPKI user-authentication CA certificates
#: (2015-10-20..2025-10-19 and 2023-07-16..2033-07-15), as published in jpki/myna
#: src/ta/auth_ca_2015.pem and auth_ca_2023.pem. The default of `jpki_anchors`.
JLIS_AUTH_ANCHORS = (
    "4dcfc4ca0aaf9fb2a3081b3f0c991c320b3acc008667a341eeaec5af1d58ca7d",
    "64114f29620c24ed2631d46476a040e7ee740d956089c00b036a6a8118c322b5",
)

# chain: what the certificate chain says (record field `chain`)
VALID = "valid"
UNTRUSTED_ISSUER = "untrusted_issuer"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
MALFORMED = "malformed"
CLOCK_UNSYNCED = "clock_unsynced"
# verdict: what the operator is told (record field `verdict`)
GENUINE = "genuine"
UNTRUSTED_CHAIN = "untrusted_chain"
POSSESSION_FAILED = "possession_failed"
UNSUPPORTED = "unsupported card generation"
VERDICT_OF_CHAIN = {
    VALID: GENUINE,
    UNTRUSTED_ISSUER: UNTRUSTED_CHAIN,
    EXPIRED: EXPIRED,
    NOT_YET_VALID: NOT_YET_VALID,
    MALFORMED: MALFORMED,
    CLOCK_UNSYNCED: CLOCK_UNSYNCED,
}
#: generations by what the card answers: the card issued since 2016 (JPKI AP,
#: token JPKIAPICCTOKEN2, RSA-2048) and the 2026 card's ECDSA P-384 certificate
#: when it is found in that same JPKI layout. Anything else is UNSUPPORTED.
GEN_RSA = "2016 (RSA-2048)"
GEN_P384 = "2026 (ECDSA P-384)"

NONCE_BYTES = 32
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@dataclass(frozen=True, slots=True)
class ChainResult:
    """The chain check of one card; `record()` is what goes on the Read."""

    chain: str
    generation: str
    key: str = ""
    anchor: str | None = None
    reason: str = ""

    @property
    def verdict(self) -> str:
        if self.generation == UNSUPPORTED:
            return UNSUPPORTED
        return VERDICT_OF_CHAIN[self.chain]

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "chain": self.chain,
            "generation": self.generation,
            "revocation": "not_checked",
        }
        if self.key:
            out["key"] = self.key
        if self.anchor:
            out["anchor"] = self.anchor
        if self.reason:
            out["reason"] = self.reason
        return out


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER, lowercase hex (the form of `jpki_anchors`)."""
    return hashlib.sha256(der).hexdigest()


def key_kind(public_key: object) -> str | None:
    """`rsa-2048` / `ecdsa-p384` for the keys JPKI issues, else None."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP384R1
    ):
        return "ecdsa-p384"
    return None


def check_chain(
    cert_der: bytes,
    ca_der: bytes | None,
    anchors: frozenset[str],
    now: datetime,
    clock_synced: bool | None,
) -> ChainResult:
    """The offline chain check: pinned issuer, signature, key usage, then validity."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_der_x509_certificate(cert_der)
        kind = key_kind(cert.public_key())
    except (ValueError, TypeError) as e:
        return ChainResult(MALFORMED, UNSUPPORTED, reason=f"auth certificate: {e}")
    if kind is None:
        return ChainResult(MALFORMED, UNSUPPORTED, reason="auth key is neither RSA-2048 nor P-384")
    generation = GEN_P384 if kind == "ecdsa-p384" else GEN_RSA
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        signs = usage.digital_signature
    except x509.ExtensionNotFound:
        signs = False
    except ValueError as e:
        return ChainResult(MALFORMED, generation, kind, reason=f"extensions: {e}")
    if not signs:
        return ChainResult(MALFORMED, generation, kind, reason="no digitalSignature key usage")
    if ca_der is None:
        return ChainResult(UNTRUSTED_ISSUER, generation, kind, reason="the card has no CA cert")
    anchor = fingerprint(ca_der)
    if anchor not in anchors:
        return ChainResult(UNTRUSTED_ISSUER, generation, kind, reason="CA is not a pinned anchor")
    try:
        ca = x509.load_der_x509_certificate(ca_der)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return ChainResult(UNTRUSTED_ISSUER, generation, kind, reason="not signed by the pinned CA")
    if clock_synced is not True:
        return ChainResult(CLOCK_UNSYNCED, generation, kind, anchor)
    for c in (cert, ca):
        if now < c.not_valid_before_utc:
            return ChainResult(NOT_YET_VALID, generation, kind, anchor)
        if now > c.not_valid_after_utc:
            return ChainResult(EXPIRED, generation, kind, anchor)
    return ChainResult(VALID, generation, kind, anchor)


def _read_cert_ef(tx: Transmit, fid: int, device: str) -> bytes | None:
    if select_ef(tx, fid) != 0x9000:
        return None
    return read_der(tx, device)


def probe_generation(tx: Transmit) -> str | None:
    """None for a card of the documented JPKI layout, else UNSUPPORTED (it answers
    a My Number AID but not the layout we know) or "" (no known application)."""
    if select_ap(tx, JPKI_AID) == 0x9000:
        if select_ef(tx, 0x0006) == 0x9000:
            raw, sw = read_binary(tx, 0, 0x20)
            if sw == 0x9000 and raw.rstrip(b" \x00") == TOKEN_MYNUMBER:
                return None
        return UNSUPPORTED
    if select_ap(tx, SUPPORT_AID) == 0x9000:
        return UNSUPPORTED
    return ""


def read_and_check(
    tx: Transmit,
    device: str,
    anchors: frozenset[str],
    now: datetime,
    clock_synced: bool | None,
    cert: bytes | None = None,
) -> tuple[ChainResult, bytes | None]:
    """Probe, read EF 000A and the candidate CA EF 000B, check. No PIN.
    With `cert` (already read by `identify_card`, JPKI AP still selected) only EF 000B."""
    if cert is None:
        probe = probe_generation(tx)
        if probe is not None:
            reason = "no known My Number application answers" if probe == "" else "unknown layout"
            return ChainResult(MALFORMED, UNSUPPORTED, reason=reason), None
        cert = _read_cert_ef(tx, EF_AUTH_CERT, device)
    if cert is None:
        return ChainResult(MALFORMED, GEN_RSA, reason="no auth certificate EF"), None
    ca = _read_cert_ef(tx, EF_AUTH_CA, device)
    return check_chain(cert, ca, anchors, now, clock_synced), cert


def auth_tries(tx: Transmit, device: str) -> int:
    """The auth PIN's retry counter (JPKI AP selected), read without spending a try."""
    if select_ef(tx, EF_AUTH_PIN) != 0x9000:
        raise CardError(device, "the JPKI AP has no auth PIN EF")
    _, sw = tx(bytes.fromhex("00200080"))
    if sw in (0x6983, 0x6984):
        return 0
    if sw & 0xFFF0 == 0x63C0:
        return sw & 0x0F
    raise CardError(device, f"auth PIN retry counter: unexpected SW {sw:04X}")


def signing_input(key: str, nonce: bytes) -> bytes:
    """What the card is given to sign: a SHA-256 DigestInfo (RSA) or a SHA-384 digest."""
    if key == "ecdsa-p384":
        return hashlib.sha384(nonce).digest()
    return SHA256_DIGEST_INFO + hashlib.sha256(nonce).digest()


def verify_possession(cert_der: bytes, nonce: bytes, signature: bytes) -> bool:
    """Does `signature` over `nonce` verify with the certificate's key? (The auditor's check.)"""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    try:
        key = x509.load_der_x509_certificate(cert_der).public_key()
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, nonce, padding.PKCS1v15(), hashes.SHA256())
            return True
        if isinstance(key, ec.EllipticCurvePublicKey):
            sig = signature
            if len(signature) == 96:  # raw r || s
                r = int.from_bytes(signature[:48], "big")
                s = int.from_bytes(signature[48:], "big")
                sig = utils.encode_dss_signature(r, s)
            key.verify(sig, nonce, ec.ECDSA(hashes.SHA384()))
            return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    return False


def prove_possession(
    tx: Transmit,
    pin: str,
    device: str,
    anchors: frozenset[str],
    now: datetime,
    clock_synced: bool | None,
    nonce: bytes | None = None,
) -> dict[str, Any]:
    """Chain check, then the PIN-safe signature over a fresh nonce, verified here.

    Raises PinRefused (bad format, too few tries, wrong PIN; VERIFY at most once).
    An unsupported card or an unusable certificate never gets the PIN.
    """
    if len(pin) != 4 or not pin.isdigit():
        raise PinRefused(device, "the PIN must be 4 digits; the card was not asked", None)
    chain, cert = read_and_check(tx, device, anchors, now, clock_synced)
    out = chain.record()
    if cert is None or chain.verdict == UNSUPPORTED or chain.chain not in (VALID, CLOCK_UNSYNCED):
        out["possession"] = "not_attempted"  # a forged card must not see the resident's PIN
        return out
    if select_ap(tx, JPKI_AID) != 0x9000:
        raise CardError(device, "the JPKI AP went away")
    tries = auth_tries(tx, device)
    if tries == 0:
        raise PinRefused(device, "the auth PIN is locked (reset at the municipal counter)", 0)
    if tries < MIN_TRIES:
        raise PinRefused(
            device,
            f"only {tries} auth PIN try left: not trying (reset at the municipal counter)",
            tries,
        )
    _, sw = tx(apdu(0x00, 0x20, 0x00, 0x80, pin.encode("ascii")))
    if sw & 0xFFF0 == 0x63C0:
        left = sw & 0x0F
        raise PinRefused(device, f"wrong auth PIN: {left} tries left; not retried", left)
    if sw in (0x6983, 0x6984):
        raise PinRefused(device, "the auth PIN is locked", 0)
    if sw != 0x9000:
        raise CardError(device, f"VERIFY: unexpected SW {sw:04X}")
    nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES)
    if select_ef(tx, EF_AUTH_KEY) != 0x9000:
        raise CardError(device, "the JPKI AP has no auth key EF")
    signature, sw = tx(apdu(0x80, 0x2A, 0x00, 0x80, signing_input(chain.key, nonce), le=0))
    proven = sw == 0x9000 and verify_possession(cert, nonce, signature)
    out["possession"] = "proven" if proven else "failed"
    if not proven:
        out["verdict"] = POSSESSION_FAILED
        out["reason"] = (
            f"signature: SW {sw:04X}" if sw != 0x9000 else "signature does not match the cert"
        )
    out["nonce"] = nonce.hex()
    out["signature"] = signature.hex()
    out["certificate"] = cert.hex()
    return out


# -- the station clock, read the way agent/station/clock.py does (drivers know no station)


def kernel_clock_synced() -> bool | None:
    """adjtimex(2): True when NTP has synced the clock, None when it cannot be asked."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        adjtimex = libc.adjtimex
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(512)  # struct timex, zeroed: modes = 0 reads only
    state = adjtimex(buf)
    if state < 0:
        return None
    long_size = ctypes.sizeof(ctypes.c_long)
    status_at = max(4, long_size) + 4 * long_size  # after modes, offset, freq, max/esterror
    status = int.from_bytes(buf.raw[status_at : status_at + 4], "little", signed=True)
    time_error, sta_unsync = 5, 0x0040
    return state != time_error and not status & sta_unsync
