"""Shared pieces of the format modules: the result shape and a strict digit test."""

from __future__ import annotations

from typing import Any

Interpretation = dict[str, Any]
"""`{"type": str, "valid": bool, "fields": dict, "problems": list[str]}` (the contract)."""


def result(kind: str, fields: dict[str, Any], problems: list[str] | None = None) -> Interpretation:
    """Build the contract's result: valid exactly when there is no problem."""
    problems = problems or []
    return {"type": kind, "valid": not problems, "fields": fields, "problems": problems}


def is_digits(text: str) -> bool:
    """ASCII digits only: `str.isdigit()` alone also accepts '²' and Arabic-Indic digits."""
    return text.isascii() and text.isdigit()
