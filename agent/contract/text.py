"""Which control characters a scanned text may hold: the one rule for every input.

A barcode's text is printable characters plus the few separators that
standards put inside a code: TAB, EOT, GS and RS (ISO/IEC 15434 envelopes,
GS1 element strings). Any other C0 control or DEL means the bytes were not a
scan (line noise, a wrong baud rate, a keyboard shortcut) and the read is
refused rather than stored. The serial and HID drivers apply `SCAN_CONTROL`;
the kiosk's manual entry, typed by staff, takes GS only.
"""

from __future__ import annotations

GS = "\x1d"
#: control characters a scanner legitimately sends inside a code: TAB, EOT, GS, RS
SCAN_CONTROL = frozenset({"\t", "\x04", GS, "\x1e"})
#: what staff may type into manual entry: GS (as the page's GS key) and nothing else
TYPED_CONTROL = frozenset({GS})


def forbidden_controls(text: str, allowed: frozenset[str] = SCAN_CONTROL) -> list[str]:
    """The control characters of `text` outside `allowed`, in order (empty: text is clean)."""
    return [c for c in text if (c < " " and c not in allowed) or c == "\x7f"]
