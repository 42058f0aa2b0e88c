"""Test-only emulators and data (cards, a test CA, camera scenes, the PostgreSQL cluster,
the kiosk's fixtures, HID captures); the generic harness is agent.testing."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
