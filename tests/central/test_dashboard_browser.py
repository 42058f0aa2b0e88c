"""The fleet dashboard in a real headless Chromium (Debian's), fed by real agents.

Playwright drives the browser Debian installed (`executable_path`); it never
downloads one. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent import __version__ as VERSION
from agent.central.audit import AuditLog
from agent.central.dashboard import Dashboard, Thresholds
from agent.testing import (
    AgentProcess,
    Broker,
    Pty,
    RegistryProbe,
    free_port,
    running_station,
    write_config,
)
from tests.support.browser import ARTIFACTS
from tests.support.central import DESK_TOKEN, DESK_USER, desk_guard, running_dashboard

pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.usefixtures("contract_spy")]

KEY = "toda-city-hall-1f/station-03"
ACK = b"\x06"
KEEPALIVE_S = 30  # the agent's mqtt.keepalive_s default: the broker's will comes within 1.5x


async def test_station_killed_turns_red_and_comes_back(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path, page: Any
) -> None:
    from playwright.async_api import expect

    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    dash = Dashboard(
        "127.0.0.1",
        broker.port,
        db=tmp_path / "registry.db",
        http_port=free_port(),
        db_poll_s=0.5,
        guard=desk_guard(),
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    async with running_dashboard(dash):
        try:
            agent.start()
            await page.goto(f"http://127.0.0.1:{dash.http_port}/#token={DESK_TOKEN}")
            row = page.locator(f'tr[data-station="{KEY}"]')
            await expect(row).to_have_class(re.compile(r"\bonline\b"), timeout=20_000)
            await expect(row.locator("td.state")).to_have_text("オンライン / Online")
            await asyncio.to_thread(agent.wait_connected)  # the port's open() flushes input
            for i in range(3):
                pty_port.scan(f"11112241000001234{i}")
                assert await pty_port.aread(1) == ACK
            await expect(row.locator("td.registry")).to_contain_text("3 件 records", timeout=20_000)
            await expect(row.locator("td.devices")).to_contain_text("ticket-scanner: connected")
            await page.screenshot(path=str(ARTIFACTS / "dashboard-online.png"), full_page=True)

            agent.kill9()  # no goodbye: the broker publishes the station's will
            await expect(row).to_have_class(
                re.compile(r"\boffline\b"), timeout=int(KEEPALIVE_S * 1.5 * 1000)
            )
            await expect(row.locator('[data-alert="offline"]')).to_be_visible()
            color = await row.locator("td.state").evaluate("e => getComputedStyle(e).color")
            assert color == "rgb(198, 40, 40)"  # red
            await page.screenshot(path=str(ARTIFACTS / "dashboard-offline.png"), full_page=True)

            agent.start()  # a new session: online again, the old will stays behind
            await expect(row).to_have_class(re.compile(r"\bonline\b"), timeout=20_000)
        finally:
            agent.close()


async def test_stuck_outbox_shows_its_age_and_a_command_round_trips(
    broker: Broker, pty_port: Pty, tmp_path: Path, page: Any
) -> None:
    from playwright.async_api import expect

    # no registry at all: what the station stores stays unconfirmed in its outbox
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    dash = Dashboard(
        "127.0.0.1",
        broker.port,
        http_port=free_port(),
        thresholds=Thresholds(stuck_after_s=3.0),
        guard=desk_guard(),
        audit=AuditLog(tmp_path / "audit.jsonl"),
    )
    async with running_dashboard(dash), running_station(cfg):
        await page.goto(f"http://127.0.0.1:{dash.http_port}/#token={DESK_TOKEN}")
        row = page.locator(f'tr[data-station="{KEY}"]')
        await expect(row).to_have_class(re.compile(r"\bonline\b"), timeout=20_000)
        pty_port.scan("111122410000012345")
        assert await pty_port.aread(1) == ACK
        oldest = row.locator("td.oldest")
        await expect(oldest).to_have_class(re.compile(r"\bstuck\b"), timeout=20_000)
        await expect(oldest).to_have_text(re.compile(r"^\d+ s$"))
        await expect(row.locator('[data-alert="outbox_stuck"]')).to_contain_text(
            "未確認レコード滞留 / Records stuck"
        )
        await expect(row.locator("td.outbox")).to_contain_text(re.compile(r"^1 \("))

        await row.locator('button[data-command="diagnostics"]').click()
        result = row.locator(f'[data-result="{KEY}"]')
        await expect(result).to_contain_text("diagnostics: 成功 OK", timeout=20_000)
        await expect(result).to_contain_text(f"madoguchi {VERSION}")
        await expect(result).to_have_class(re.compile(r"\bok\b"))
        await check_diagnostics(page, dash.http_port)

        await row.locator('button[data-command="resend"]').click()
        await expect(result).to_contain_text(re.compile(r'resend: 成功 OK .*"requeued": ?1'))
        # every command is in the audit table: who, which station, what, how it went
        audit_rows = page.locator("#audit tbody tr")
        await expect(audit_rows.first).to_contain_text("resend", timeout=10_000)
        await expect(audit_rows.first).to_contain_text(DESK_USER)
        await expect(audit_rows.first).to_contain_text(KEY)
        await expect(audit_rows).to_have_count(4)  # two commands, sent + ok each
        assert "token" not in page.url  # the fragment was dropped from the address bar
        await page.screenshot(path=str(ARTIFACTS / "dashboard-stuck-command.png"), full_page=True)

        # issue #22: the version column, no client certificate, and the logs panel
        await expect(row.locator("td.version")).to_have_text(str(VERSION))
        await expect(row.locator("td.cert")).to_have_text("—")
        logging.getLogger("agent.test").warning("a <b>line</b> & another")  # text, not HTML
        await row.locator('button[data-command="logs"]').click()
        await expect(result).to_contain_text("logs: 成功 OK", timeout=20_000)
        panel = page.locator(f'details[data-logs="{KEY}"] pre.logs')
        await expect(panel).to_contain_text("WARNING agent.test: a <b>line</b> & another")
        await page.screenshot(path=str(ARTIFACTS / "dashboard-logs.png"), full_page=True)


async def check_diagnostics(page: Any, http_port: int) -> None:
    """Readable (a panel of tables, not JSON in a cell) and downloadable, with the version."""
    from playwright.async_api import expect

    panel = page.locator(f'details[data-diagnostics="{KEY}"]')
    await expect(panel).to_be_visible()
    await expect(panel.locator('[data-version="madoguchi"]')).to_have_text(f"madoguchi: {VERSION}")
    await expect(panel.locator('[data-version="python"]')).to_contain_text("Python: 3.")
    devices = panel.locator("table.diag-devices")
    await expect(devices).to_contain_text("ticket-scanner")
    await expect(devices.locator("tr", has_text="ticket-scanner")).to_contain_text("connected")
    assert "{" not in await panel.inner_text()  # no raw JSON on screen
    await page.screenshot(path=str(ARTIFACTS / "dashboard-diagnostics.png"), full_page=True)

    async with page.expect_download() as info:
        await panel.locator(f'button[data-download="{KEY}"]').click()
    download = await info.value
    saved = json.loads(Path(await download.path()).read_text())
    assert saved["madoguchi"] == VERSION and saved["agent"] == "station-03"
    assert saved["devices"]["ticket-scanner"]["state"] == "connected"
    assert "request_id" not in saved

    # the same file from the endpoint, for scripts and curl (the dashboard runs in this loop)
    base = f"http://127.0.0.1:{http_port}"

    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            req = urllib.request.Request(base + path)
            if path.startswith("/api/"):  # the API wants the desk's token; the icon does not
                req.add_header("Authorization", f"Bearer {DESK_TOKEN}")
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    status, headers, raw = await asyncio.to_thread(get, f"/api/diagnostics/{KEY}")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert headers["content-disposition"].startswith(
        'attachment; filename="diagnostics-toda-city-hall-1f-station-03-'
    )
    body = json.loads(raw)
    assert body["madoguchi"] == VERSION and "python" in body and "request_id" not in body
    status, _, _ = await asyncio.to_thread(get, "/api/diagnostics/nowhere/none")
    assert status == 404
    status, headers, raw = await asyncio.to_thread(get, "/favicon.svg")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")
    assert raw.startswith(b"<svg")
    icon = await page.locator('link[rel="icon"]').get_attribute("href")
    assert icon == "/favicon.svg"


async def test_rollout_column_shows_a_rolled_back_release(
    broker: Broker, pty_port: Pty, tmp_path: Path, page: Any
) -> None:
    """issue #22: a station whose last switch was rolled back says so in its row, with
    the reason (the switch record is the one agent/station/releases.py writes)."""
    from playwright.async_api import expect

    from agent.station.releases import Releases
    from tests.support import releases

    rel = Releases(tmp_path / "releases")
    for v in (VERSION, "9.9"):
        releases.tree(rel.root / v, releases.healthy(v))
    rel.point(VERSION)
    rel.switch("9.9", 30)
    rel.rollback("release 9.9 exited with code 1 before its health check passed")
    cfg = write_config(
        tmp_path, broker.port, scanner=pty_port.link, extra_agent=f'releases_dir = "{rel.root}"'
    )
    dash = Dashboard("127.0.0.1", broker.port, http_port=free_port(), guard=desk_guard())
    async with running_dashboard(dash), running_station(cfg):
        await page.goto(f"http://127.0.0.1:{dash.http_port}/#token={DESK_TOKEN}")
        row = page.locator(f'tr[data-station="{KEY}"]')
        await expect(row.locator("td.rollout")).to_have_text("9.9: rolled_back", timeout=20_000)
        await expect(row.locator("td.rollout")).to_have_attribute("title", re.compile("code 1"))
        await expect(row.locator("td.version")).to_have_text(str(VERSION))
        await expect(row.locator('[data-alert="release_rolled_back"]')).to_be_visible()
        await page.screenshot(path=str(ARTIFACTS / "dashboard-rollout.png"), full_page=True)
