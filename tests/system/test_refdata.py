"""Reference datasets end to end (issue #20, first slice): real mosquitto, the registry in
this loop keeping `used_tickets`, two stations at two sites with pty scanners, and the
`publish-dataset` path for `recalled_lots`. Every verdict is read back from the record
the station stored, and the scanner's NAK byte."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import UsedTicketsFeed, public_hex, publish_dataset
from agent.testing import (
    Broker,
    Pty,
    mqtt_collect,
    running_registry,
    running_station,
    serial_scanner,
    write_config,
)
from tests.support.cli import run_cli

TICKET = "111122410000012345"
GS1 = "]C101049123451234591725123110AB"
ACK, NAK = b"\x06", b"\x15"
MANIFEST = "madoguchi/v1/_datasets/fleet/used_tickets/manifest"
LOT = {"gtin": "04912345123459", "lot": "AB", "reason": "contamination"}


def station_config(tmp: Path, port: int, pty: Pty, site: str, name: str, key: str) -> Path:
    devices = serial_scanner(pty.link, extra="nak_invalid = true\n")
    devices += f'\n[datasets]\npublic_key = "{key}"\nmax_age_s = 3600\n'
    return write_config(tmp, port, devices=devices, site=site, name=name)


class Verdicts:
    """The read_accepted events of one station, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def __call__(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "read_accepted":
            self.queue.put_nowait(body)

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.queue.get(), 10)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


@pytest.mark.timeout(60)
async def test_ticket_used_at_site_a_is_already_used_at_site_b_and_offline(
    broker: Broker, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    pub = public_hex(key)
    a_pty, b_pty = Pty(tmp_path / "ttyA"), Pty(tmp_path / "ttyB")
    feed = UsedTicketsFeed(tmp_path / "registry-datasets.db", key, "madoguchi/v1", debounce_s=0.05)
    try:
        async with (
            running_registry(broker.port, tmp_path / "registry.db", datasets=feed) as registry,
            running_station(
                station_config(tmp_path, broker.port, a_pty, "toda-1f", "st-a", pub)
            ) as a,
            running_station(
                station_config(tmp_path, broker.port, b_pty, "goka-2f", "st-b", pub)
            ) as b,
        ):
            a_events, b_events = Verdicts(), Verdicts()
            a.station.subscribe(a_events)
            b.station.subscribe(b_events)
            b_data = b.station.station.datasets
            assert b_data is not None
            await until(lambda: b.station.uplink is not None and b.station.uplink.connected)

            # site A: the first use; no used_tickets yet (or it does not hold this ticket)
            t0 = time.monotonic()
            a_pty.scan(TICKET)
            assert await a_pty.aread(1) == ACK
            first = await a_events.next()
            assert first["verdict"] is None or first["verdict"]["verdict"] == "not_used"
            await registry.wait_for(1)

            # site B knows within 2 s (registry -> signed used_tickets -> station B)
            def b_knows() -> bool:
                v = b_data.verdict(
                    {
                        "type": "vaccination_ticket",
                        "valid": True,
                        "fields": {
                            "municipality_code": "112241",
                            "ticket_number": "0000012345",
                            "round_code": "1",
                        },
                    }
                )
                return v is not None and v["verdict"] == "already_used"

            await until(b_knows, 5)
            spread = time.monotonic() - t0
            assert spread < 2.0, f"site B learned of the ticket after {spread:.2f} s"
            b_pty.scan(TICKET)
            assert await b_pty.aread(1) == NAK  # stored, and the operator is told
            used = (await b_events.next())["verdict"]
            assert used["verdict"] == "already_used"
            assert (used["site"], used["agent"], used["dataset"]) == (
                "toda-1f",
                "st-a",
                "used_tickets",
            )
            assert used["stale"] is False and used["version"] == feed.version
            stored = await registry.wait_for(2)
            assert stored[1]["data"]["verdict"]["verdict"] == "already_used"  # the record says it

            # the central desk publishes a recall; both stations get it retained
            v = await publish_dataset(
                "127.0.0.1", broker.port, "madoguchi/v1", key, "recalled_lots", [LOT]
            )
            a_data = a.station.station.datasets
            assert a_data is not None
            await until(lambda: "recalled_lots" in b_data.held and "recalled_lots" in a_data.held)
            b_pty.scan(GS1)
            assert await b_pty.aread(1) == NAK
            recalled = (await b_events.next())["verdict"]
            assert (recalled["verdict"], recalled["reason"], recalled["version"]) == (
                "recalled",
                "contamination",
                v,
            )

            # broker gone: verdicts keep coming from the stored versions
            broker.kill()
            await until(lambda: not b.station.uplink.connected)  # type: ignore[union-attr]
            a_pty.scan(GS1)
            assert await a_pty.aread(1) == NAK
            assert (await a_events.next())["verdict"]["verdict"] == "recalled"
            b_pty.scan("A0000012345B")  # the NW-7 ticket number alone
            assert await b_pty.aread(1) == NAK
            offline = (await b_events.next())["verdict"]
            assert offline["verdict"] == "already_used" and offline["site"] == "toda-1f"
            print(f"site A -> site B: {spread * 1000:.0f} ms")
    finally:
        a_pty.close()
        b_pty.close()


@pytest.mark.timeout(60)
async def test_a_station_that_starts_later_gets_the_newest_version_retained(
    broker: Broker, tmp_path: Path
) -> None:
    """Three versions published while a station was away: it comes up with the newest."""
    key = Ed25519PrivateKey.generate()
    for n in range(1, 4):
        rows = [{**LOT, "lot": f"L{i}"} for i in range(n)]
        last = await publish_dataset(
            "127.0.0.1", broker.port, "madoguchi/v1", key, "recalled_lots", rows
        )
    # what stays retained on the broker fits docs/asyncapi.yaml: 3 manifests' last + chunks
    from tests.support.central import Contract

    contract = Contract()
    retained = await mqtt_collect(broker.port, "madoguchi/v1/_datasets/#", 1.0)
    kinds = [contract.check_raw(m.topic.value, bytes(m.payload)) for m in retained if m.payload]
    assert sorted(set(kinds)) == ["datasetChunk/datasetChunk", "datasetManifest/datasetManifest"]
    assert kinds.count("datasetManifest/datasetManifest") == 1
    chunks = [m.topic.value for m in retained if m.payload and "manifest" not in m.topic.value]
    assert {t.split("/")[-2] for t in chunks} == {str(last)}  # older versions' chunks cleared
    pty = Pty(tmp_path / "tty")
    try:
        cfg = station_config(tmp_path, broker.port, pty, "toda-1f", "late", public_hex(key))
        async with running_station(cfg) as s:
            data = s.station.station.datasets
            assert data is not None
            await until(lambda: "recalled_lots" in data.held)
            assert data.held["recalled_lots"].version == last
            assert data.held["recalled_lots"].rows == 3
    finally:
        pty.close()


@pytest.mark.timeout(60)
async def test_the_desk_publishes_with_the_cli_and_a_wrong_key_is_refused(
    broker: Broker, tmp_path: Path
) -> None:
    made = run_cli(
        "registry", "dataset-keygen", "--private", "k.pem", "--public", "k.pub", cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    pub = (tmp_path / "k.pub").read_text().strip()
    assert pub in made.stdout and (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
    again = run_cli(
        "registry", "dataset-keygen", "--private", "k.pem", "--public", "x", cwd=tmp_path
    )
    assert again.returncode == 1 and "never overwritten" in again.stderr

    bad = tmp_path / "bad.csv"
    bad.write_text("gtin,lot,reason\n123,AB,x\n04912345123459,,\n")
    refused = run_cli(
        "registry", "publish-dataset", "recalled_lots", str(bad), "--key", "k.pem",
        "--port", str(broker.port), cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"{bad}:2:1: gtin: not a valid value",
        f"{bad}:3:2: lot: missing",
        f"{bad}:3:3: reason: missing",
    ]

    pty = Pty(tmp_path / "tty")
    try:
        cfg = station_config(tmp_path, broker.port, pty, "toda-1f", "desk", pub)
        async with running_station(cfg) as s:
            data = s.station.station.datasets
            assert data is not None
            good = tmp_path / "recalls.csv"
            good.write_text("gtin,lot,reason\n04912345123459,AB,contamination\n")
            ok = run_cli(
                "registry", "publish-dataset", "recalled_lots", str(good), "--key", "k.pem",
                "--port", str(broker.port), cwd=tmp_path,
            )  # fmt: skip
            assert ok.returncode == 0, ok.stderr
            await until(lambda: "recalled_lots" in data.held)
            held = data.held["recalled_lots"].version
            assert f"v{held}: 1 row(s) published" in ok.stdout

            # someone else's key on the broker: refused, the desk's version keeps serving
            await publish_dataset(
                "127.0.0.1", broker.port, "madoguchi/v1", Ed25519PrivateKey.generate(),
                "recalled_lots", [],
            )  # fmt: skip
            await until(lambda: "recalled_lots" in data.refused)
            from tests.support.central import Contract

            telemetry = await s.station.uplink.telemetry()  # type: ignore[union-attr]
            base = "madoguchi/v1/toda-1f/desk"
            assert Contract().check(f"{base}/telemetry", telemetry) == "telemetry/telemetry"
            status = telemetry["datasets"]
            assert "signature" in status["refused"]["recalled_lots"]["reason"]
            assert status["held"]["recalled_lots"]["version"] == held
            pty.scan(GS1)
            assert await pty.aread(1) == NAK
    finally:
        pty.close()


@pytest.mark.timeout(60)
async def test_madoguchi_registry_with_a_dataset_key_publishes_used_tickets(
    broker: Broker, tmp_path: Path
) -> None:
    (tmp_path / "bad.pem").write_text("not a key\n")
    args = ["registry", "--db", "reg.db", "--port", str(broker.port), "--quiet"]
    bad = run_cli(*args, "--dataset-key", "bad.pem", cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.strip().endswith("bad.pem: not an unencrypted PEM private key")
    shared = run_cli(*args, "--shared", "g", "--dataset-key", "bad.pem", cwd=tmp_path)
    assert shared.returncode == 1 and "not with shared = 'g'" in shared.stderr
    assert run_cli("registry", "dataset-keygen", "--private", "k.pem", "--public", "k.pub",
                cwd=tmp_path).returncode == 0  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args, "--dataset-key", "k.pem"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 15
        while not got and time.monotonic() < deadline:  # the registry publishes at start
            got = await mqtt_collect(
                broker.port, "madoguchi/v1/_datasets/fleet/used_tickets/manifest", 0.5
            )
        assert got, "no used_tickets manifest from `madoguchi registry --dataset-key`"
        from agent.contract.datasets import parse_manifest

        m = parse_manifest(bytes(got[0].payload))  # type: ignore[arg-type]
        assert (m.kind, m.rows) == ("used_tickets", 0)
        assert (tmp_path / "reg-datasets.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.browser
@pytest.mark.timeout(90)
async def test_the_kiosk_page_shows_already_used_and_recalled(
    browser: Any, broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    """Real Chromium at 800x480: the page's big message for the two reference verdicts."""
    from playwright.async_api import expect

    from tests.support.browser import ARTIFACTS
    from tests.support.kiosk import kiosk_config, running_kiosk

    key = Ed25519PrivateKey.generate()
    used = {
        "municipality_code": "112241",
        "ticket_number": "0000012345",
        "dose": "1",
        "site": "goka-2f",
        "agent": "st-b",
        "at": "2026-12-02T01:02:03.000Z",
    }
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    soon = (now + timedelta(seconds=4)).isoformat()  # stale while on screen
    booked = {
        "id": "0000012345",  # the ticket's number: this resident has a slot now
        "id_type": "ticket_number",
        "slot_start": (now - timedelta(minutes=10)).isoformat(),
        "slot_end": (now + timedelta(minutes=10)).isoformat(),
        "purpose": "dose 1",
    }
    for kind, rows, expires in (
        ("used_tickets", [used], None),
        ("recalled_lots", [LOT], soon),
        ("reservations", [booked], None),
    ):
        await publish_dataset(
            "127.0.0.1", broker.port, "madoguchi/v1", key, kind, rows, expires_at=expires
        )
    cfg, _ = kiosk_config(
        tmp_path,
        broker.port,
        pty_port.link,
        card_reader=False,
        extra_devices=f'\n[datasets]\npublic_key = "{public_hex(key)}"\n',
    )
    async with running_kiosk(cfg) as k:
        data = k.station.station.datasets
        assert data is not None
        await until(lambda: {"used_tickets", "recalled_lots", "reservations"} <= set(data.held))
        page = await browser.new_page(viewport={"width": 800, "height": 480})
        await page.goto(f"{k.base}/#token={k.token}")
        await expect(page.locator("#online")).to_have_class("state-online", timeout=20_000)
        title, verdict = page.locator("#verdict-title"), page.locator("#verdict")
        pty_port.scan(TICKET)
        assert await pty_port.aread(1) == ACK  # this desk does not NAK: the page tells
        await expect(title).to_have_text("この接種券は使用済みです")
        await expect(verdict).to_have_class("verdict-danger")
        # the reservation beside it: the slot and that the resident is on time
        await expect(page.locator("#verdict-detail")).to_contain_text(
            re.compile(r"予約 \d\d:\d\d–\d\d:\d\d（時間どおり）")
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "kiosk-already-used.png"))
        pty_port.scan(GS1)
        assert await pty_port.aread(1) == ACK
        await expect(title).to_have_text("回収対象のワクチンです")
        await page.screenshot(path=str(ARTIFACTS / "kiosk-recalled.png"))
        # each dataset's age in the footer; past its expiry the recall list says stale
        # (and still decides: the verdict above came from it)
        ages = page.locator("#datasets li")
        await expect(ages).to_have_count(3)
        used_age = page.locator('#datasets li[data-kind="used_tickets"]')
        await expect(used_age).to_have_text(re.compile(r"^使用済券 \d+秒前$"))
        await expect(used_age).to_have_class("ds-ok")
        recalls = page.locator('#datasets li[data-kind="recalled_lots"]')
        await expect(recalls).to_have_class("ds-stale", timeout=20_000)
        await expect(recalls).to_have_text(re.compile(r"^回収ロット \d+秒前 古い$"))
        pty_port.scan(GS1)
        assert await pty_port.aread(1) == ACK
        await expect(title).to_have_text("回収対象のワクチンです")
        await page.screenshot(path=str(ARTIFACTS / "kiosk-dataset-ages-800x480.png"))
        await page.close()


@pytest.mark.timeout(60)
async def test_site_reservations_and_staff_reach_only_their_site(
    broker: Broker, tmp_path: Path
) -> None:
    """Second slice: `reservations` and `staff` published for site A (site scope): a
    reservation QR at A is `reserved`, an unknown one `no_reservation`, a staff badge puts
    its operator id on the records; station B at another site never holds A's data."""
    from datetime import UTC, datetime, timedelta

    from agent.contract.records import Read

    key = Ed25519PrivateKey.generate()
    pub = public_hex(key)
    now = datetime.now(UTC)
    slot = {
        "id": "R-2026-000123",
        "id_type": "qr",
        "slot_start": (now - timedelta(minutes=10)).isoformat(),
        "slot_end": (now + timedelta(minutes=10)).isoformat(),
        "purpose": "vaccination dose 1",
    }
    a_pty, b_pty = Pty(tmp_path / "ttyA"), Pty(tmp_path / "ttyB")
    try:
        async with (
            running_registry(broker.port, tmp_path / "registry.db") as registry,
            running_station(
                station_config(tmp_path, broker.port, a_pty, "toda-1f", "st-a", pub)
            ) as a,
            running_station(
                station_config(tmp_path, broker.port, b_pty, "goka-2f", "st-b", pub)
            ) as b,
        ):
            a_data, b_data = a.station.station.datasets, b.station.station.datasets
            assert a_data is not None and b_data is not None
            P = "madoguchi/v1"
            await publish_dataset("127.0.0.1", broker.port, P, key, "reservations", [slot],
                                  site="toda-1f")  # fmt: skip
            staff = [{"uid": "01010601CB095703", "operator": "staff-014"}]
            await publish_dataset("127.0.0.1", broker.port, P, key, "staff", staff, site="toda-1f")
            # a fleet dataset after them: once B holds it, B has seen all it will see
            await publish_dataset("127.0.0.1", broker.port, P, key, "recalled_lots", [LOT])
            await until(lambda: {"reservations", "staff", "recalled_lots"} <= set(a_data.held))
            await until(lambda: "recalled_lots" in b_data.held)
            assert "reservations" not in b_data.held and "staff" not in b_data.held
            assert not b_data.refused  # not refused either: it never came to B
            from tests.support.central import Contract

            retained = await mqtt_collect(broker.port, "madoguchi/v1/_datasets/site/#", 1.0)
            site_kinds = {
                Contract().check_raw(m.topic.value, bytes(m.payload)) for m in retained if m.payload
            }
            assert site_kinds == {
                "datasetSiteManifest/datasetManifest",
                "datasetSiteChunk/datasetChunk",
            }

            # the staff badge tap (a card read) starts staff-014's session at A
            badge = Read(device="ticket-scanner", kind="card", data={"uid": "01010601cb095703"})
            assert (await a.station.station.accept(badge)).accepted
            a_pty.scan(slot["id"])
            await a_pty.aread(1)
            a_pty.scan("R-2026-999999")
            await a_pty.aread(1)
            b_pty.scan(slot["id"])  # the same QR at site B: B holds no reservations
            await b_pty.aread(1)
            records = await registry.wait_for(4)
            by = {(r["data"].get("text"), r["kind"], r.get("operator")): r for r in records}
            tap = by[(None, "card", "staff-014")]
            assert tap["data"]["operator_session"] == {"event": "start", "operator": "staff-014"}
            reserved = by[(slot["id"], "barcode", "staff-014")]["data"]["reservation"]
            assert (reserved["verdict"], reserved["timing"], reserved["purpose"]) == (
                "reserved",
                "on_time",
                "vaccination dose 1",
            )
            assert reserved["dataset"] == "reservations" and reserved["stale"] is False
            unknown = by[("R-2026-999999", "barcode", "staff-014")]["data"]["reservation"]
            assert unknown["verdict"] == "no_reservation"
            at_b = by[(slot["id"], "barcode", None)]["data"]
            assert "reservation" not in at_b
    finally:
        a_pty.close()
        b_pty.close()


@pytest.mark.timeout(60)
async def test_the_cli_publishes_staff_and_reservations_for_one_site(
    broker: Broker, tmp_path: Path
) -> None:
    made = run_cli("registry", "dataset-keygen", "--private", "k.pem", "--public", "k.pub",
                cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    pub = (tmp_path / "k.pub").read_text().strip()
    staff = tmp_path / "staff.csv"
    staff.write_text("uid,operator\n01010601CB095703,staff-014\n")
    bad_site = run_cli("registry", "publish-dataset", "staff", str(staff), "--key", "k.pem",
                    "--site", "Toda 1F", "--port", str(broker.port), cwd=tmp_path)  # fmt: skip
    assert bad_site.returncode == 1 and "--site: 'Toda 1F' is not a site name" in bad_site.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "R-1", "slot_start": "10:30", "purpose": "x"}]')
    refused = run_cli("registry", "publish-dataset", "reservations", str(bad), "--key", "k.pem",
                   "--site", "toda-1f", "--port", str(broker.port), cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"{bad}:1:slot_start: not a valid value",
        f"{bad}:1:slot_end: missing",
    ]
    pty = Pty(tmp_path / "tty")
    try:
        cfg = station_config(tmp_path, broker.port, pty, "toda-1f", "desk", pub)
        async with running_station(cfg) as s:
            data = s.station.station.datasets
            assert data is not None
            ok = run_cli("registry", "publish-dataset", "staff", str(staff), "--key", "k.pem",
                      "--site", "toda-1f", "--port", str(broker.port), cwd=tmp_path)  # fmt: skip
            assert ok.returncode == 0, ok.stderr
            assert "1 row(s) published for site toda-1f" in ok.stdout
            await until(lambda: "staff" in data.held)
            assert data.staff("01010601cb095703") == "staff-014"
    finally:
        pty.close()


@pytest.mark.timeout(90)
async def test_a_station_offline_through_three_deltas_catches_up_to_the_newest(
    broker: Broker, tmp_path: Path
) -> None:
    """Deltas end to end (~10 s): the registry publishes a full `used_tickets`, then one
    signed delta per stored ticket; station B, down while three deltas went out, applies
    the retained chain when it comes back and holds the registry's newest version."""
    key = Ed25519PrivateKey.generate()
    pub = public_hex(key)
    feed = UsedTicketsFeed(tmp_path / "registry-datasets.db", key, "madoguchi/v1", debounce_s=0.05)
    a_pty, b_pty = Pty(tmp_path / "ttyA"), Pty(tmp_path / "ttyB")
    b_cfg = station_config(tmp_path, broker.port, b_pty, "goka-2f", "st-b", pub)
    good = [TICKET, "111122410000022226", "111122410000033337", "111122410000044448"]
    try:
        async with (
            running_registry(broker.port, tmp_path / "registry.db", datasets=feed) as registry,
            running_station(station_config(tmp_path, broker.port, a_pty, "toda-1f", "st-a", pub)),
        ):
            async with running_station(b_cfg) as b:
                b_data = b.station.station.datasets
                assert b_data is not None
                await until(lambda: "used_tickets" in b_data.held)
                a_pty.scan(good[0])
                assert await a_pty.aread(1) == ACK
                await until(lambda: b_data.held["used_tickets"].rows == 1)
                assert feed.deltas == 1  # the ticket came as a delta, not a full version
            full_then = feed.version
            for n, t in enumerate(good[1:], 2):  # B is down: three deltas, one per ticket
                a_pty.scan(t)
                assert await a_pty.aread(1) == ACK
                await registry.wait_for(n)
                await until(lambda n=n: feed.deltas == n)
            assert feed.version > full_then
            retained = await mqtt_collect(broker.port, "madoguchi/v1/_datasets/fleet/#", 1.0)
            from tests.support.central import Contract

            kinds = {Contract().check_raw(m.topic.value, bytes(m.payload)) for m in retained
                     if m.payload}  # fmt: skip
            assert "datasetDelta/datasetManifest" in kinds
            async with running_station(b_cfg) as b:
                b_data = b.station.station.datasets
                assert b_data is not None
                await until(lambda: b_data.held["used_tickets"].version == feed.version)
                assert b_data.held["used_tickets"].rows == 4 and not b_data.refused
                b_pty.scan(good[3])
                assert await b_pty.aread(1) == NAK  # the newest delta's ticket: already used
    finally:
        a_pty.close()
        b_pty.close()


@pytest.mark.timeout(60)
async def test_a_profile_alarm_pattern_sounds_for_a_recalled_lot_and_the_record_is_stored(
    broker: Broker, tmp_path: Path
) -> None:
    """`host_alarm` (device profile / config): a stored read the city flags gets its own
    bytes back (a distinct beep pattern), not the plain NAK; other reads keep ACK."""
    key = Ed25519PrivateKey.generate()
    pty = Pty(tmp_path / "tty")
    alarm = b"\x07\x07\x07"
    devices = serial_scanner(
        pty.link, extra='nak_invalid = true\nhost_alarm = "\\u0007\\u0007\\u0007"\n'
    )
    devices += f'\n[datasets]\npublic_key = "{public_hex(key)}"\n'
    cfg = write_config(tmp_path, broker.port, devices=devices, site="toda-1f", name="desk")
    try:
        async with running_station(cfg) as s:
            events = Verdicts()
            s.station.subscribe(events)
            data = s.station.station.datasets
            assert data is not None
            await publish_dataset(
                "127.0.0.1", broker.port, "madoguchi/v1", key, "recalled_lots", [LOT]
            )
            await until(lambda: "recalled_lots" in data.held)
            pty.scan(GS1)
            assert await pty.aread(3) == alarm
            stored = await events.next()
            assert stored["verdict"]["verdict"] == "recalled" and stored["seq"] >= 1
            pty.scan(TICKET)  # no dataset speaks to it here: the usual ACK
            assert await pty.aread(1) == ACK
    finally:
        pty.close()
