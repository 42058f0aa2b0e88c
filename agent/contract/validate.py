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
    return r
