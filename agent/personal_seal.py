"""The personal part of a record, sealed to the registry's public key (docs/CONTRACT.md).

A station that reads personal data (a card's name, address, birth date, My Number)
seals it once, when the outbox gives the record its id, so that the broker and the
registry database only ever hold ciphertext; only the back office, holding the
private key, opens it (`madoguchi registry export-personal`).

    shared = X25519(ephemeral private, registry public)     a fresh key per record
    key    = HKDF-SHA256(shared, salt=b"", info=INFO || epk || registry public, 32)
    ct     = AES-256-GCM(key, nonce, JSON of the personal part, aad=record id)

The envelope is `data["personal_sealed"]`:
`{"v": 1, "kid": hex16, "epk": b64, "nonce": b64, "ct": b64}` (standard base64 with
padding; `kid` = first 8 bytes of SHA-256 of the raw public key, to pick a key after a
rotation). The record id as associated data means a sealed part cannot be moved to
another record unnoticed. Lives outside agent/contract because it needs `cryptography`
(the contract is standard library only); both the station and the registry import it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import ConfigError, PersonalSealError

VERSION = 1
INFO = b"madoguchi personal v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_CT_BYTES = 64 * 1024
"""A card's personal part is a few hundred bytes; anything this big is not one."""
FIELDS = frozenset({"v", "kid", "epk", "nonce", "ct"})


@dataclass(frozen=True, slots=True)
class Sealed:
    """A parsed envelope: the bytes, checked for size, not yet opened."""

    kid: str
    epk: bytes
    nonce: bytes
    ct: bytes

    def envelope(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kid": self.kid,
            "epk": _b64(self.epk),
            "nonce": _b64(self.nonce),
            "ct": _b64(self.ct),
        }


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(value: object, name: str, record_id: str) -> bytes:
    if not isinstance(value, str):
        raise PersonalSealError(f"record {record_id}: personal_sealed.{name}: not a string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise PersonalSealError(f"record {record_id}: personal_sealed.{name}: not base64") from None
    if _b64(raw) != value:  # one spelling per value: padded, no stray bits
        raise PersonalSealError(f"record {record_id}: personal_sealed.{name}: not canonical base64")
    return raw


def key_id(public: X25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_envelope(obj: object, record_id: str) -> Sealed:
    """Check an envelope's shape and sizes; `PersonalSealError` naming the field if wrong."""
    if not isinstance(obj, dict):
        raise PersonalSealError(f"record {record_id}: personal_sealed: not an object")
    extra = set(obj) - FIELDS
    if extra:
        raise PersonalSealError(
            f"record {record_id}: personal_sealed: unknown field(s) {sorted(map(str, extra))[:5]}"
        )
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise PersonalSealError(f"record {record_id}: personal_sealed.v: must be {VERSION}")
    kid = obj.get("kid")
    if not (isinstance(kid, str) and len(kid) == 16 and all(c in "0123456789abcdef" for c in kid)):
        raise PersonalSealError(f"record {record_id}: personal_sealed.kid: not 16 hex digits")
    for name in ("epk", "nonce", "ct"):
        if name not in obj:
            raise PersonalSealError(f"record {record_id}: personal_sealed.{name}: missing")
        # base64 of MAX_CT_BYTES is 4/3 as long: refuse a huge string before decoding it
        if isinstance(obj[name], str) and len(obj[name]) > MAX_CT_BYTES * 2:
            raise PersonalSealError(f"record {record_id}: personal_sealed.{name}: too long")
    epk = _unb64(obj["epk"], "epk", record_id)
    nonce = _unb64(obj["nonce"], "nonce", record_id)
    ct = _unb64(obj["ct"], "ct", record_id)
    if len(epk) != KEY_BYTES:
        raise PersonalSealError(f"record {record_id}: personal_sealed.epk: not {KEY_BYTES} bytes")
    if len(nonce) != NONCE_BYTES:
        raise PersonalSealError(
            f"record {record_id}: personal_sealed.nonce: not {NONCE_BYTES} bytes"
        )
    if not TAG_BYTES <= len(ct) <= MAX_CT_BYTES:
        raise PersonalSealError(
            f"record {record_id}: personal_sealed.ct: {len(ct)} bytes, not "
            f"{TAG_BYTES}..{MAX_CT_BYTES}"
        )
    return Sealed(kid, epk, nonce, ct)


def _derive(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=INFO + epk + recipient)
    return hkdf.derive(shared)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class PersonalSealer:
    """Seals personal parts to one registry public key (the station side)."""

    def __init__(self, public: X25519PublicKey) -> None:
        self._public = public
        self._raw = _raw(public)
        self.kid = key_id(public)

    def seal(self, record_id: str, personal: dict[str, Any]) -> dict[str, Any]:
        """The envelope of `personal` for record `record_id`; a fresh ephemeral key each call."""
        eph = X25519PrivateKey.generate()
        epk = _raw(eph.public_key())
        key = _derive(eph.exchange(self._public), epk, self._raw)
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(personal, ensure_ascii=False, separators=(",", ":")).encode()
        ct = AESGCM(key).encrypt(nonce, plain, record_id.encode())
        return Sealed(self.kid, epk, nonce, ct).envelope()

    @classmethod
    def from_file(cls, path: Path, *, key: str = "outbox.registry_public_key") -> PersonalSealer:
        """Load a PEM X25519 public key; `ConfigError` as `file: key: reason`."""
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise ConfigError([f"{path}: {key}: cannot read: {e.strerror}"]) from None
        try:
            public = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError):
            raise ConfigError([f"{path}: {key}: not a PEM public key"]) from None
        if not isinstance(public, X25519PublicKey):
            raise ConfigError([f"{path}: {key}: not an X25519 key (madoguchi registry keygen)"])
        return cls(public)


class PersonalOpener:
    """Opens envelopes with the registry's private key (the back-office side only)."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self._raw = _raw(private.public_key())
        self.kid = key_id(private.public_key())

    def open(self, record_id: str, envelope: object) -> dict[str, Any]:
        """The personal part; `PersonalSealError` if malformed, for another key or record,
        or tampered with (AES-GCM cannot tell those last ones apart, on purpose)."""
        sealed = parse_envelope(envelope, record_id)
        if sealed.kid != self.kid:
            raise PersonalSealError(
                f"record {record_id}: sealed to key {sealed.kid}, this key is {self.kid}"
            )
        try:
            peer = X25519PublicKey.from_public_bytes(sealed.epk)
            key = _derive(self._private.exchange(peer), sealed.epk, self._raw)
            plain = AESGCM(key).decrypt(sealed.nonce, sealed.ct, record_id.encode())
        except (InvalidTag, ValueError):
            raise PersonalSealError(
                f"record {record_id}: personal part does not open "
                "(tampered, or sealed for another record or key)"
            ) from None
        try:
            out = json.loads(plain)
        except ValueError:
            raise PersonalSealError(f"record {record_id}: personal part is not JSON") from None
        if not isinstance(out, dict):
            raise PersonalSealError(f"record {record_id}: personal part is not an object")
        return out

    @classmethod
    def from_file(cls, path: Path) -> PersonalOpener:
        """Load the PEM private key; refuse one that others can read."""
        try:
            st = path.stat()
            pem = path.read_bytes()
        except OSError as e:
            raise ConfigError([f"{path}: --key: cannot read: {e.strerror}"]) from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                [f"{path}: --key: readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it"]
            )
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError([f"{path}: --key: not an unencrypted PEM private key"]) from None
        if not isinstance(private, X25519PrivateKey):
            raise ConfigError([f"{path}: --key: not an X25519 key (madoguchi registry keygen)"])
        return cls(private)


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new private key (mode 0600, never overwritten) and its public key; the key id."""
    private = X25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub)
    return key_id(private.public_key())
