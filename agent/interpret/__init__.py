"""Interpretation: barcode text in, meaning out. Pure: no I/O, no clock but `today`.

`interpret()` never raises and never blocks: any string in, a result out.
The result shape is the contract's `data.interpretation`:
`{"type": ..., "valid": bool, "fields": {...}, "problems": [...]}`.
"""

from __future__ import annotations

from datetime import date
from typing import Any

Interpretation = dict[str, Any]


def interpret(
    text: str,
    *,
    symbology: str | None = None,
    gs_substitute: str | None = None,
    today: date | None = None,
) -> Interpretation:
    """What a scanned string means (placeholder until the format modules land)."""
    kind = "url" if text.startswith(("http://", "https://")) else "text"
    return {"type": kind, "valid": True, "fields": {}, "problems": []}


def split_aim(text: str) -> tuple[str | None, str]:
    """Strip a leading AIM symbology identifier (`]d2`, `]C1` ...) into its own value."""
    if len(text) >= 3 and text[0] == "]" and text[1].isalpha() and text[2].isalnum():
        return text[:3], text[3:]
    return None, text
