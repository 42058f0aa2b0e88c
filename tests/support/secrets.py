"""Looking for a PIN in what was stored, logged or answered.

A 4-digit PIN occurs by chance inside the hex or base64 of random material that is
rightly there (a certificate, a nonce, a signature, a fingerprint of a CA made per
test session) and inside longer numbers (timestamps, inode numbers): about one run in
thirty failed a plain `PIN in data` that way. A PIN written anywhere would stand as a
value of its own, so that is what is looked for.
"""

from __future__ import annotations

import re


def pin_in(pin: str, data: bytes | str) -> bool:
    """`pin` as a token of its own in `data`: not inside a longer number, hex or base64."""
    raw = data.encode() if isinstance(data, str) else data
    pattern = rb"(?<![0-9A-Za-z+/])" + re.escape(pin.encode()) + rb"(?![0-9A-Za-z+/=])"
    return re.search(pattern, raw) is not None
