"""Encryption at rest for personal data in the outbox (AES-256-GCM).

The key is 32 random bytes in a file readable only by the agent (in production
a systemd credential). The record id is the associated data, so a sealed blob
cannot be moved to another record unnoticed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12


class Sealer:
    """Seal and open small blobs with one AES-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes, not {len(key)}")
        self._key = key
        self._aead: Any = None

    def _cipher(self) -> Any:
        if self._aead is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(self._key)
        return self._aead

    def seal(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + bytes(self._cipher().encrypt(nonce, plaintext, aad))

    def open(self, sealed: bytes, *, aad: bytes) -> bytes:
        return bytes(self._cipher().decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad))

    @classmethod
    def from_file(cls, path: Path) -> Sealer:
        """Load the key; refuse a key file that others can read."""
        try:
            st = path.stat()
            key = path.read_bytes()
        except OSError as e:
            raise ConfigError([f"{path}: outbox.key_file: cannot read: {e.strerror}"]) from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                [
                    f"{path}: outbox.key_file: readable by others (mode {st.st_mode & 0o777:o}); "
                    "chmod 600 it"
                ]
            )
        if len(key) != KEY_BYTES:
            raise ConfigError(
                [f"{path}: outbox.key_file: must hold {KEY_BYTES} raw bytes, has {len(key)}"]
            )
        return cls(key)

    @staticmethod
    def create_key_file(path: Path) -> None:
        """Write a fresh random key with mode 0600."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_BYTES))
