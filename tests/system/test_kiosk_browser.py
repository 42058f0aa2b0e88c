"""The reference kiosk page in a real headless Chromium (Debian's), against a
running station: scans on the pty appear with the right message, the on-screen
number pad reaches the registry, the PIN dialog, the offline indicator.
Screenshots at 800x480 go to test-artifacts/."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect  # the dev extra

from agent.testing import Broker, Pty, RegistryProbe
from tests.support.browser import ARTIFACTS
from tests.support.kiosk import CARD_INFO, CARD_PIN, Kiosk, kiosk_config, running_kiosk

pytestmark = [pytest.mark.browser, pytest.mark.broker]

ACK, NAK = b"\x06", b"\x15"


async def open_kiosk(browser: Browser, k: Kiosk) -> Page:
    page = await browser.new_page(viewport={"width": 800, "height": 480})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # script errors; HTTP answers such as a refused PIN (403) are the page's business
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    await page.goto(f"{k.base}/#token={k.token}")
    await expect(page.locator("#online")).to_have_class("state-online", timeout=20_000)
    assert k.token not in page.url  # taken out of the address bar at once
    page.errors = errors  # type: ignore[attr-defined]
    return page


def shot(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


async def test_scans_appear_with_the_right_message(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    second = Pty(tmp_path / "ttyDesk2")  # a scanner at a desk that takes tickets only
    cfg, _ = kiosk_config(
        tmp_path,
        broker.port,
        pty_port.link,
        card_reader=False,
        scanner_extra="max_line_bytes = 32",
        extra_devices=f"""
[[devices]]
name = "desk-2"
profile = "generic-serial-scanner"
port = "{second.link}"
host_ack = "\\u0006"
expect = ["vaccination_ticket"]
""",
    )
    try:
        async with running_kiosk(cfg) as k:
            page = await open_kiosk(browser, k)
            title = page.locator("#verdict-title")
            verdict = page.locator("#verdict")
            await expect(title).to_have_text("読み取ってください")

            second.scan("4901234567894")  # a JAN code where only tickets are taken
            assert await second.aread(1) == ACK
            await expect(title).to_have_text("この窓口では受け付けできない書類です")
            await expect(verdict).to_have_class("verdict-warn")

            pty_port.scan("9" * 60)  # garbage: longer than the scanner's max line
            assert await pty_port.aread(1) == NAK
            await expect(title).to_have_text("読み取りエラー")
            await expect(verdict).to_have_class("verdict-error")

            pty_port.scan("111122410000012345")
            assert await pty_port.aread(1) == ACK
            await expect(title).to_have_text("受付完了")
            await expect(verdict).to_have_class("verdict-ok")
            await page.screenshot(path=shot("kiosk-accepted-800x480.png"))
            assert page.errors == []  # type: ignore[attr-defined]
    finally:
        second.close()


async def test_number_pad_entry_reaches_the_registry(
    browser: Browser, broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    text = "111122410000012345"
    async with running_kiosk(cfg) as k:
        page = await open_kiosk(browser, k)
        for key in "999":
            await page.click(f'#pad [data-key="{key}"]')
        await page.click('#pad [data-key="back"]')
        await page.click('#pad [data-key="clear"]')
        for key in text:
            await page.click(f'#pad [data-key="{key}"]')
        await expect(page.locator("#pad-display")).to_have_text(text)
        await page.screenshot(path=shot("kiosk-number-pad-800x480.png"))
        await page.click("#pad-send")
        await expect(page.locator("#verdict-title")).to_have_text("受付完了")
        await expect(page.locator("#verdict-detail")).to_contain_text("手入力")
        await expect(page.locator("#pad-display")).to_have_text("")
        got = await registry.wait_for(1)
        assert got[0]["data"]["text"] == text
        assert got[0]["source"] == "manual" and got[0]["device"] == "ticket-scanner"
        assert page.errors == []  # type: ignore[attr-defined]


async def test_pin_dialog_masks_and_reads_the_card(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k:
        page = await open_kiosk(browser, k)
        await page.click("#card-button")
        dialog = page.locator("#pin-dialog")
        await expect(dialog).to_be_visible()
        for d in "7390":
            await page.click(f'#pin-dialog [data-pin="{d}"]')
        await expect(page.locator("#pin-display")).to_have_text("●●●●")
        await page.screenshot(path=shot("kiosk-pin-800x480.png"))
        assert "7390" not in await page.content()  # masked: the digits are nowhere in the DOM
        await page.click("#pin-ok")
        await expect(page.locator("#pin-message")).to_have_text("暗証番号が違います（残り2回）")
        assert k.readers["card-reader"].tries_left == 2
        for d in CARD_PIN:
            await page.click(f'#pin-dialog [data-pin="{d}"]')
        await page.click("#pin-ok")
        await expect(page.locator("#card-result")).to_be_visible()
        await expect(page.locator("#card-name")).to_have_text(CARD_INFO["name"])
        await expect(page.locator("#card-sex")).to_have_text("女性")
        await expect(dialog).to_be_hidden()
        await page.click("#card-close")
        await expect(page.locator("#card-name")).to_have_text("")  # not left on screen
        assert page.errors == []  # type: ignore[attr-defined]


async def test_offline_indicator_while_records_stay_local(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k:
        page = await open_kiosk(browser, k)
        broker.stop()
        online = page.locator("#online")
        await expect(online).to_have_class("state-offline", timeout=20_000)
        await expect(online).to_contain_text("記録は端末内に安全に保存されています")
        pty_port.scan("111122410000012345")
        assert await pty_port.aread(1) == ACK  # still stored, still acknowledged
        await expect(page.locator("#verdict-title")).to_have_text("受付完了")
        await page.screenshot(path=shot("kiosk-offline-800x480.png"))
        broker.start()
        await expect(online).to_have_class("state-online", timeout=30_000)


async def test_page_without_token_says_unpaired(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k:
        page = await browser.new_page(viewport={"width": 800, "height": 480})
        await page.goto(f"{k.base}/")
        await expect(page.locator("#unpaired")).to_be_visible()
        page2 = await browser.new_page(viewport={"width": 800, "height": 480})
        await page2.goto(f"{k.base}/#token=not-the-token-not-the-token-not-the")
        await expect(page2.locator("#unpaired")).to_be_visible()


async def test_launcher_redirect_file_pairs_the_page(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    # the launcher of docs/kiosk.md: a private file:// page that redirects with the token
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k:
        redirect = tmp_path / "madoguchi-kiosk.html"
        redirect.write_text(
            f'<meta http-equiv="refresh" content="0; url={k.base}/#token={k.token}">'
        )
        page = await browser.new_page(viewport={"width": 800, "height": 480})
        await page.goto(redirect.as_uri())
        await expect(page.locator("#online")).to_have_class("state-online", timeout=20_000)
        assert page.url == f"{k.base}/"
        pty_port.scan("111122410000012345")
        assert await pty_port.aread(1) == ACK
        await expect(page.locator("#verdict-title")).to_have_text("受付完了")


VERDICT_CASES = [
    ({"type": "vaccination_ticket", "valid": True, "problems": []}, "受付完了", "verdict-ok"),
    (
        {"type": "vaccination_ticket", "valid": False, "problems": ["bad_check_digit"]},
        "接種券の番号が正しくありません",
        "verdict-error",
    ),
    (
        {"type": "gs1", "valid": False, "problems": ["expired"]},
        "有効期限切れのワクチンです",
        "verdict-danger",
    ),
    (
        {"type": "gtin", "valid": False, "problems": ["bad_check_digit"]},
        "バーコードが正しくありません",
        "verdict-error",
    ),
    (
        {"type": "gtin", "valid": True, "problems": ["unexpected_type"]},
        "この窓口では受け付けできない書類です",
        "verdict-warn",
    ),
]


async def test_every_interpretation_verdict_renders(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    # the interpretations of the barcode issue's result shape, fed in where the station
    # emits its events: the hub, the event stream and the page are all real
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k:
        page = await open_kiosk(browser, k)
        for seq, (interp, title, tone) in enumerate(VERDICT_CASES, start=1):
            k.station.emit(
                "read_accepted",
                {
                    "device": "ticket-scanner",
                    "seq": seq,
                    "id": f"id-{seq}",
                    "kind": "barcode",
                    "source": "device",
                    "interpretation": {"fields": {}, **interp},
                },
            )
            await expect(page.locator("#verdict-title")).to_have_text(title)
            await expect(page.locator("#verdict")).to_have_class(tone)
            if interp["problems"] == ["expired"]:
                await page.screenshot(path=shot("kiosk-expired-800x480.png"))
        k.station.emit("read_rejected", {"device": "ticket-scanner", "reason": "not_stored"})
        await expect(page.locator("#verdict-title")).to_have_text("記録できませんでした")
        k.station.emit("outbox_full", {"device": "ticket-scanner"})
        await expect(page.locator("#banner")).to_contain_text("保存領域がいっぱい")


# -- the page reads right: every device, the backlog, the role, two languages --------

# Each line of a Japanese text as the browser laid it out: no line of one character
# (a lone 「す」), and none that overflows its box.
LINES_JS = """el => {
  const lines = new Map();
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    for (let i = 0; i < n.data.length; i++) {
      const r = document.createRange();
      r.setStart(n, i); r.setEnd(n, i + 1);
      const rect = r.getClientRects()[0];
      if (!rect || !n.data[i].trim()) continue;
      const top = Math.round(rect.top);
      lines.set(top, (lines.get(top) || "") + n.data[i]);
    }
  }
  return [...lines.values()];
}"""


async def assert_clean_lines(page: Page, selector: str) -> list[str]:
    lines: list[str] = await page.locator(selector).evaluate(LINES_JS)
    assert lines, selector
    for line in lines:
        assert len(line) > 1, (selector, lines)  # no lone character on a line of its own
    return lines


def labelled(name: str, port: Path, label: str) -> str:
    return f"""
[[devices]]
name = "{name}"
profile = "generic-serial-scanner"
port = "{port}"
host_ack = "\\u0006"
label = "{label}"
"""


async def test_every_device_is_shown_and_each_stays_named_until_it_is_back(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    desk2 = Pty(tmp_path / "ttyDesk2")
    spare = Pty(tmp_path / "ttySpare")
    cfg, _ = kiosk_config(
        tmp_path,
        broker.port,
        pty_port.link,
        card_reader=False,
        api='role = "general"',
        scanner_extra='label = "接種券スキャナ"',
        extra_devices=labelled("desk-2", desk2.link, "2番窓口スキャナ")
        + labelled("spare", spare.link, "予備スキャナ"),
    )
    replug: Pty | None = None
    try:
        async with running_kiosk(cfg) as k:  # no registry: what is stored waits to be sent
            spare.close()  # unplugged before the page loads
            async with asyncio.timeout(10):  # a station that never notices fails here, named
                while k.station.devices["spare"].state == "connected":
                    await asyncio.sleep(0.05)
            page = await open_kiosk(browser, k)
            dev = page.locator("#devices li")
            await expect(dev).to_have_count(3)
            await expect(page.locator('#devices li[data-device="spare"]')).to_have_class("dev-bad")
            await expect(page.locator('#devices li[data-device="spare"]')).to_have_text(
                "予備スキャナ未接続"
            )
            ticket = page.locator('#devices li[data-device="ticket-scanner"]')
            await expect(ticket).to_have_class("dev-ok")
            await expect(ticket).to_have_text("接種券スキャナ")  # the label, not the config name
            await expect(page.locator("#station")).to_contain_text("総合窓口")
            await expect(page.locator("#verdict-detail")).to_have_text(
                "書類のバーコードをかざすか、番号を入力してください"
            )
            await expect(page.locator("#waiting")).to_have_text("送信待ち 0件")

            desk2.close()  # a second one goes: both are named
            bad = page.locator("#devices li.dev-bad")
            await expect(bad).to_have_count(2, timeout=10_000)
            await expect(bad.nth(0)).to_contain_text("2番窓口スキャナ")
            await expect(bad.nth(1)).to_contain_text("予備スキャナ")

            pty_port.scan("111122410000012345")  # an accepted read clears no device
            assert await pty_port.aread(1) == ACK
            await expect(page.locator("#verdict-title")).to_have_text("受付完了")
            await expect(page.locator("#waiting")).to_have_text("送信待ち 1件")
            await expect(bad).to_have_count(2)
            await page.screenshot(path=shot("kiosk-devices-down-ja-800x480.png"))

            replug = Pty(desk2.link)  # desk-2 comes back: spare is still down
            await expect(page.locator('#devices li[data-device="desk-2"]')).to_have_class(
                "dev-ok", timeout=15_000
            )
            await expect(bad).to_have_count(1)
            await expect(bad).to_contain_text("予備スキャナ")

            await page.click("#lang")
            await expect(page.locator("html")).to_have_attribute("lang", "en")
            await expect(page.locator("#verdict-title")).to_have_text("Accepted")
            await expect(bad).to_have_text("予備スキャナnot connected")
            await expect(page.locator("#waiting")).to_have_text("1 waiting to send")
            await expect(page.locator("#station")).to_contain_text("General counter")
            await page.screenshot(path=shot("kiosk-devices-down-en-800x480.png"))
            await page.click("#lang")
            await expect(page.locator("#verdict-title")).to_have_text("受付完了")
            assert page.errors == []  # type: ignore[attr-defined]
    finally:
        for p in (desk2, spare, replug):
            if p is not None:
                p.close()


async def test_the_agent_unreachable_turns_the_keypad_off(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k:
        page = await open_kiosk(browser, k)
        await expect(page.locator('#pad [data-key="5"]')).to_be_enabled()
        await expect(page.locator("#verdict-title")).to_have_text("読み取ってください")
        icon = await page.locator('link[rel="icon"]').get_attribute("href")
        assert icon == "/kiosk/favicon.svg"
        async with k.client() as c:  # public, like the page: it holds no secret
            r = await c.get(icon)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    # the station has stopped: its API is gone
    title = page.locator("#verdict-title")
    await expect(page.locator("#online")).to_have_class("state-lost", timeout=10_000)
    await expect(title).to_have_text("端末と接続できません")
    for key in ("1", "5", "0", "clear", "back"):
        await expect(page.locator(f'#pad [data-key="{key}"]')).to_be_disabled()
    await expect(page.locator("#pad-send")).to_be_disabled()
    assert "読み取ってください" not in await page.locator("main").inner_text()
    await assert_clean_lines(page, "#verdict-detail")
    await page.screenshot(path=shot("kiosk-unreachable-ja-800x480.png"))
    await page.click("#lang")
    await expect(title).to_have_text("The stationis not reachable")
    await page.screenshot(path=shot("kiosk-unreachable-en-800x480.png"))
    async with running_kiosk(cfg):  # the agent is back (same port, same token): so is the pad
        await expect(page.locator('#pad [data-key="5"]')).to_be_enabled(timeout=15_000)
        await expect(title).to_have_text("Please scan")
        await expect(page.locator("#online")).to_have_class("state-online", timeout=20_000)


async def test_mynumber_desk_prompt_keypads_and_both_languages(
    browser: Browser, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, api='role = "mynumber"')
    async with running_kiosk(cfg) as k:
        page = await open_kiosk(browser, k)
        detail = page.locator("#verdict-detail")
        await expect(detail).to_contain_text("マイナンバーカードを置いてください")
        await expect(page.locator("#station")).to_contain_text("マイナンバーカード窓口")
        lines = await assert_clean_lines(page, "#verdict-detail")
        assert len(lines) >= 2  # it did wrap, at phrase ends
        await page.screenshot(path=shot("kiosk-mynumber-ja-800x480.png"))
        # the same phone layout on both pads: 1-2-3 on top
        pad = await page.locator("#pad .keys button").all_inner_texts()
        pin = await page.locator("#pin-dialog .keys button").all_inner_texts()
        assert pad[:9] == pin[:9] == [str(d) for d in range(1, 10)]
        assert pad[10] == pin[10] == "0"

        for code in ("expired", "unexpected", "not_stored"):
            k.station.emit("read_rejected", {"device": "ticket-scanner", "reason": code})
            await expect(page.locator("#verdict")).not_to_have_class("verdict-idle")
            await assert_clean_lines(page, "#verdict-detail")
            await assert_clean_lines(page, "#verdict-title")
        k.station.emit(
            "read_accepted",
            {
                "device": "ticket-scanner",
                "id": "id-x",
                "interpretation": {"type": "gs1", "valid": False, "problems": ["expired"]},
                "verdict": "expired",
            },
        )
        await expect(page.locator("#verdict-title")).to_have_text("有効期限切れのワクチンです")
        await assert_clean_lines(page, "#verdict-detail")
        await page.screenshot(path=shot("kiosk-expired-ja-800x480.png"))

        await page.click("#lang")
        await expect(page.locator("#verdict-title")).to_have_text("This vaccinehas expired")
        await page.screenshot(path=shot("kiosk-expired-en-800x480.png"))
        await page.click("#card-button")
        await expect(page.locator("#pin-title")).to_have_text("Enter your 4-digit PIN")
        for d in "7390":
            await page.click(f'#pin-dialog [data-pin="{d}"]')
        await page.click("#pin-ok")
        await expect(page.locator("#pin-message")).to_have_text("Wrong PIN (2 tries left)")
        await page.screenshot(path=shot("kiosk-pin-en-800x480.png"))
        await page.click("#pin-cancel")
        await page.reload()  # the choice survives a reload
        await expect(page.locator("#online")).to_have_class("state-online", timeout=20_000)
        await expect(page.locator("#verdict-detail")).to_contain_text("My Number Card")
        await page.screenshot(path=shot("kiosk-mynumber-en-800x480.png"))
        assert page.errors == []  # type: ignore[attr-defined]
