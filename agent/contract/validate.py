"""Record validation: what a registry checks before it stores a record.

In the contract so that every consumer of `records` (the reference registry,
tests, a city's own consumer written against docs/CONTRACT.md) refuses the
same records for the same reasons. Standard library only.
"""

from __future__ import annotations

from typing import Any


def check_record(r: Any) -> dict[str, Any]:
    """The record if it has what the registry keys on; ValueError otherwise."""
    if not isinstance(r, dict):
        raise ValueError("record is not an object")
    if not isinstance(r.get("id"), str) or not r["id"]:
        raise ValueError("record without a string id")
    if not isinstance(r.get("seq"), int) or isinstance(r["seq"], bool) or r["seq"] < 1:
        raise ValueError("record without a positive integer seq")
    for key in ("captured_at", "device", "kind"):
        if not isinstance(r.get(key), str):
            raise ValueError(f"record without a string {key}")
    if r["kind"] == LOST_RANGE:
        lost_range(r)
    return r


LOST_RANGE = "lost_range"
"""The record kind by which a station says which of its seqs could not be read from a
damaged outbox (docs/CONTRACT.md "lost-range record")."""


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def lost_range(r: dict[str, Any]) -> tuple[int, int]:
    """(first_seq, last_seq) of a `lost_range` record; ValueError if it is malformed.

    The range lies below the record's own seq: it reports seqs already handed out.
    """
    data = r.get("data")
    if not isinstance(data, dict):
        raise ValueError("lost_range record without a data object")
    first, last = data.get("first_seq"), data.get("last_seq")
    if not (isinstance(first, int) and isinstance(last, int) and _int(first) and _int(last)):
        raise ValueError("lost_range record without integer first_seq and last_seq")
    if not 1 <= first <= last < r["seq"]:
        raise ValueError("lost_range record needs 1 <= first_seq <= last_seq < seq")
    return first, last
