"""The dashboard's per-station reference datasets (issue #20) in a real headless Chromium:
two real stations on a real broker, signed versions published to them; each row shows
the versions it holds with their age, and a set past its expiry is marked stale with an
alert, while another station holding a fresh one is not."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.dashboard import Dashboard
from agent.central.datasets import public_hex, publish_dataset
from agent.testing import Broker, Pty, free_port, running_station, serial_scanner, write_config
from tests.support.browser import ARTIFACTS
from tests.support.central import DESK_TOKEN, desk_guard, running_dashboard

pytestmark = [pytest.mark.browser, pytest.mark.broker]
LOT = {"gtin": "04912345123459", "lot": "AB", "reason": "contamination"}
P = "madoguchi/v1"


def station(tmp: Path, port: int, pty: Pty, site: str, name: str, key: str) -> Path:
    devices = serial_scanner(pty.link) + f'\n[datasets]\npublic_key = "{key}"\n'
    return write_config(tmp, port, devices=devices, site=site, name=name)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    import asyncio

    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


@pytest.mark.timeout(90)
async def test_the_dashboard_shows_each_stations_versions_and_the_stale_ones(
    broker: Broker, tmp_path: Path, page: Any
) -> None:
    """About 15 s (the stations' rate-limited status republish)."""
    from playwright.async_api import expect

    await page.set_viewport_size({"width": 1600, "height": 700})  # the screenshot's size

    key = Ed25519PrivateKey.generate()
    pub = public_hex(key)
    dash = Dashboard("127.0.0.1", broker.port, http_port=free_port(), guard=desk_guard())
    pa, pb = Pty(tmp_path / "ttyA"), Pty(tmp_path / "ttyB")
    try:
        async with (
            running_dashboard(dash),
            running_station(station(tmp_path, broker.port, pa, "toda-1f", "st-a", pub)) as a,
            running_station(station(tmp_path, broker.port, pb, "goka-2f", "st-b", pub)),
        ):
            data = a.station.station.datasets
            assert data is not None
            soon = (datetime.now(UTC) + timedelta(seconds=4)).isoformat()
            recall = await publish_dataset("127.0.0.1", broker.port, P, key, "recalled_lots", [LOT])
            staff = [{"uid": "0101", "operator": "staff-1"}]
            old_staff = await publish_dataset("127.0.0.1", broker.port, P, key, "staff", staff,
                                              expires_at=soon, site="toda-1f")  # fmt: skip
            await until(lambda: "staff" in data.held)
            await page.goto(f"http://127.0.0.1:{dash.http_port}/#token={DESK_TOKEN}")
            row_a = page.locator('tr[data-station="toda-1f/st-a"]')
            row_b = page.locator('tr[data-station="goka-2f/st-b"]')
            await expect(row_a.locator('td.datasets [data-kind="recalled_lots"]')).to_contain_text(
                f"recalled_lots v{recall} (1)", timeout=20_000
            )
            await expect(row_b.locator('td.datasets [data-kind="recalled_lots"]')).to_contain_text(
                f"recalled_lots v{recall} (1)", timeout=20_000
            )
            await expect(row_b.locator('td.datasets [data-kind="staff"]')).to_have_count(0)
            a_staff = row_a.locator('td.datasets [data-kind="staff"]')
            await expect(a_staff).to_contain_text(f"staff v{old_staff} (1)", timeout=20_000)
            # past its expiry: marked stale (yellow) with an alert, still held
            await expect(a_staff).to_have_class(re.compile(r"\bbad\b"), timeout=20_000)
            await expect(a_staff).to_contain_text("古い stale")
            await expect(row_a.locator('[data-alert="dataset_stale"]')).to_contain_text(
                f"staff v{old_staff}"
            )
            await expect(row_b.locator('[data-alert="dataset_stale"]')).to_have_count(0)
            fresh = row_a.locator('td.datasets [data-kind="recalled_lots"]')
            await expect(fresh).not_to_have_class(re.compile(r"\bbad\b"))
            assert data.held["staff"].version == old_staff  # it keeps serving
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard-datasets.png"), full_page=True)
    finally:
        pa.close()
        pb.close()
