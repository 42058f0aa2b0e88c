"""The kiosk's local API over real HTTP against a running station (pty scanner,
real mosquitto, real SQLite outbox): auth, origin and host rules, durable manual
entry, SSE resume, the PIN path, and malformed requests answered with 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.station.feedback import VERDICTS, verdict
from agent.station.kiosk.openapi import openapi_document
from agent.testing import Broker, Pty, RegistryProbe, free_port, running_station, write_config
from tests.support.kiosk import CARD_INFO, CARD_PIN, PhotoStation, kiosk_config, running_kiosk, sse
from tests.support.secrets import pin_in

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
ACK = b"\x06"
V1_CALLS = [
    ("GET", "/v1/events"),
    ("GET", "/v1/status"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/manual"),
    ("POST", "/v1/cards/card-reader/info"),
    ("POST", "/v1/photos"),
]


async def test_every_v1_call_needs_the_token_the_page_does_not(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k, k.client() as c:
        for method, path in V1_CALLS:
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token-wrong-token-wrong-token"},
                {"Authorization": f"Basic {k.token}"},
                {"Authorization": f"Bearer {k.token}x"},
            ):
                r = await c.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"] == "unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")
        for path in ("/nope", "/v1", "/kiosk/../v1/status", "/openapi.json"):
            r = await c.get(path)
            assert r.status_code == 401, path  # deny by default
        page = await c.get("/")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "受付" in page.text
        assert k.token not in page.text  # the page carries no secret
        js = await c.get("/kiosk/app.js")
        assert js.status_code == 200 and k.token not in js.text
        ok = await c.get("/v1/status", headers=k.auth())
        assert ok.status_code == 200
        assert "default-src 'self'" in ok.headers["content-security-policy"]
        assert ok.headers["cache-control"] == "no-store"


async def test_token_file_is_created_private(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k:
        path = load_config(cfg).agent.data_dir / "api-token"
        assert path.read_text().strip() == k.token
        assert len(k.token) >= 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_other_origins_are_refused_and_cors_is_exact(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k, k.client() as c:
        for origin in ("http://evil.example", "null", f"http://localhost:{k.port}", k.origin + "/"):
            for method, path in V1_CALLS:
                r = await c.request(method, path, headers=k.auth(Origin=origin), json={})
                assert r.status_code == 403, (origin, path)
                assert r.json()["error"] == "origin_not_allowed"
                assert "access-control-allow-origin" not in r.headers
            pre = await c.options(
                "/v1/manual",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            assert pre.status_code == 403
            page = await c.get("/", headers={"Origin": origin})
            assert page.status_code == 403
        # the kiosk's own origin: allowed, echoed exactly, never a wildcard
        r = await c.get("/v1/status", headers=k.auth(Origin=k.origin))
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == k.origin
        assert r.headers["vary"] == "Origin"
        pre = await c.options(
            "/v1/manual",
            headers={
                "Origin": k.origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == k.origin
        assert "Authorization" in pre.headers["access-control-allow-headers"]


async def test_configured_origin_replaces_the_default(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, port = kiosk_config(
        tmp_path, broker.port, pty_port.link, api='allowed_origin = "http://localhost:9000"'
    )
    async with running_kiosk(cfg) as k, k.client() as c:
        good = await c.get("/v1/status", headers=k.auth(Origin="http://localhost:9000"))
        assert good.status_code == 200
        assert good.headers["access-control-allow-origin"] == "http://localhost:9000"
        own = await c.get("/v1/status", headers=k.auth(Origin=f"http://127.0.0.1:{port}"))
        assert own.status_code == 403


async def test_dns_rebinding_host_is_refused(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k, k.client() as c:
        for host in ("evil.example", f"evil.example:{k.port}", "127.0.0.1:1"):
            r = await c.get("/", headers={"Host": host})
            assert r.status_code == 421, host
            r = await c.get("/v1/status", headers=k.auth(Host=host))
            assert r.status_code == 421, host
        for host in (f"127.0.0.1:{k.port}", f"localhost:{k.port}"):
            assert (await c.get("/", headers={"Host": host})).status_code == 200


async def test_manual_entry_is_durable_before_the_answer(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    db = load_config(cfg).outbox_path
    text = "111122410000012345"
    async with running_kiosk(cfg) as k, k.client() as c:
        r = await c.post(
            "/v1/manual", headers=k.auth(), json={"device": "ticket-scanner", "text": text}
        )
        assert r.status_code == 201, r.text
        body = r.json()
        # the answer came back: the record must already be on disk, seen by another connection
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute(
                "SELECT seq, device, source, kind, data FROM records WHERE id = ?", (body["id"],)
            ).fetchone()
        assert row is not None
        assert row[0] == body["seq"] == 1
        assert row[1:4] == ("ticket-scanner", "manual", "barcode")
        assert json.loads(row[4])["text"] == text
        assert body["source"] == "manual" and body["accepted"] is True
        assert body["interpretation"]["valid"] is True
        assert body["verdict"] == "ok"
        # and it reaches the registry like a scan
        got = await registry.wait_for(1)
        assert got[0]["id"] == body["id"]
        assert got[0]["source"] == "manual" and got[0]["data"]["text"] == text
        # the same text again within repeat_window_s: stored once
        again = await c.post(
            "/v1/manual", headers=k.auth(), json={"device": "ticket-scanner", "text": text}
        )
        assert again.status_code == 200 and again.json()["duplicate"] is True
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 1


async def test_manual_entry_rejects_what_it_cannot_store(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    db = load_config(cfg).outbox_path
    async with running_kiosk(cfg) as k, k.client() as c:
        cases = [
            ({"device": "no-such-device", "text": "123"}, 404, "unknown_device"),
            ({"device": "ticket-scanner"}, 422, "invalid"),
            ({"device": "ticket-scanner", "text": ""}, 422, "invalid"),
            ({"device": "ticket-scanner", "text": "12\n34"}, 422, "invalid"),
            ({"device": "ticket-scanner", "text": 12345}, 422, "invalid"),
            ({"device": "ticket-scanner", "text": "1", "extra": 1}, 422, "invalid"),
            ({"device": "../etc", "text": "1"}, 422, "invalid"),
        ]
        for payload, status, code in cases:
            r = await c.post("/v1/manual", headers=k.auth(), json=payload)
            assert (r.status_code, r.json()["error"]) == (status, code), payload
        gs = await c.post(
            "/v1/manual", headers=k.auth(), json={"device": "ticket-scanner", "text": "0104\x1d21X"}
        )
        assert gs.status_code == 201  # GS1's separator is allowed
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 1


async def test_bad_bodies_get_4xx_and_never_crash_the_station(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, api="max_body_bytes = 1024")
    async with running_kiosk(cfg) as k, k.client() as c:
        js = {"Content-Type": "application/json"}

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(64):
                yield b" " * 100  # no Content-Length: counted while it arrives

        cases: list[tuple[bytes | None, dict[str, str], int, str]] = [
            (b"{not json", js, 400, "bad_json"),
            (b"\xff\xfe\x00", js, 400, "bad_json"),
            (b"[1, 2]", js, 400, "bad_json"),
            (b"null", js, 400, "bad_json"),
            (b"[" * 900 + b"]" * 10, js, 400, "bad_json"),
            (b"", js, 400, "bad_json"),
            (b'{"device":"ticket-scanner","text":"1"}', {}, 415, "unsupported_media_type"),
            (b'{"a":1}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            (b'{"t":"' + b"x" * 2000 + b'"}', js, 413, "too_large"),
            (None, js, 413, "too_large"),  # chunked
        ]
        for path in ("/v1/manual", "/v1/cards/card-reader/info", "/v1/photos"):
            for content, headers, status, code in cases:
                body = chunked() if content is None else content
                r = await c.post(path, content=body, headers={**k.auth(), **headers})
                assert r.status_code == status, (path, content, r.text)
                assert r.json()["error"] == code
        for method, path in (("GET", "/nope"), ("DELETE", "/v1/manual"), ("PUT", "/v1/status")):
            r = await c.request(method, path, headers=k.auth())
            assert r.status_code in (404, 405) and "error" in r.json()
        # raw garbage on the socket: the server drops it and stays up
        with socket.create_connection(("127.0.0.1", k.port)) as s:
            s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            s.settimeout(5)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                s.recv(100)
        # the station still stores a scan and the API still answers
        pty_port.scan("after-the-garbage")
        assert await pty_port.aread(1) == ACK
        assert (await c.get("/v1/status", headers=k.auth())).status_code == 200


async def test_events_resume_with_last_event_id(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k, k.client() as c:
        async with sse(c, k.auth()) as events:
            hello = await events.next()
            assert hello["event"] == "hello" and hello["data"]["reset"] is None
            seen = []
            for i in range(3):
                pty_port.scan(f"live-{i}")
                assert await pty_port.aread(1) == ACK
                seen.append(await events.until(lambda e: e["event"] == "read_accepted"))
        assert [e["data"]["seq"] for e in seen] == [1, 2, 3]
        assert all(e["data"]["verdict"] == "ok" and e["data"]["source"] == "device" for e in seen)
        ids = [e["id"] for e in seen]
        assert len(set(ids)) == 3
        # the page is away: two scans happen meanwhile
        for i in range(2):
            pty_port.scan(f"missed-{i}")
            assert await pty_port.aread(1) == ACK
        async with sse(c, k.auth(**{"Last-Event-ID": ids[-1]})) as events:
            hello = await events.next()
            assert hello["event"] == "hello" and hello["data"]["reset"] is None
            assert hello["id"] is None  # keeps the page's own last id
            assert hello["data"]["missed"] == 2
            missed = [await events.next(), await events.next()]
            assert [e["event"] for e in missed] == ["read_accepted", "read_accepted"]
            assert [e["data"]["seq"] for e in missed] == [4, 5]
            pty_port.scan("after")
            assert await pty_port.aread(1) == ACK
            nxt = await events.until(lambda e: e["event"] == "read_accepted")
            assert nxt["data"]["seq"] == 6  # no gap, no repeat
        # an id from another run of the agent: told to resync
        async with sse(c, k.auth(**{"Last-Event-ID": "0badc0de-3"})) as events:
            hello = await events.next()
            assert hello["data"]["reset"] == "restarted"
            assert hello["id"] == nxt["id"]  # a fresh starting point


async def test_events_after_a_gap_say_reset(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, _ = kiosk_config(
        tmp_path, broker.port, pty_port.link, card_reader=False, api="event_buffer = 10"
    )
    async with running_kiosk(cfg) as k, k.client() as c:
        async with sse(c, k.auth()) as events:
            first = await events.next()
        for i in range(12):
            pty_port.scan(f"burst-{i}")
            assert await pty_port.aread(1) == ACK
        async with sse(c, k.auth(**{"Last-Event-ID": first["id"]})) as events:
            hello = await events.next()
            assert hello["data"]["reset"] == "gap"


async def test_events_carry_verdicts_for_wrong_and_unreadable_scans(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(
        tmp_path,
        broker.port,
        pty_port.link,
        card_reader=False,
        scanner_extra='expect = ["vaccination_ticket"]\nmax_line_bytes = 32',
    )
    async with running_kiosk(cfg) as k, k.client() as c, sse(c, k.auth()) as events:
        await events.next()
        pty_port.scan("4901234567894")  # a JAN code at the ticket scanner
        await pty_port.aread(1)
        ev = await events.until(lambda e: e["event"].startswith("read_"))
        assert ev["event"] == "read_accepted" and ev["data"]["verdict"] == "unexpected"
        pty_port.scan("9" * 60)  # longer than max_line_bytes: dropped, an error event
        ev = await events.until(lambda e: e["event"].startswith("read_"))
        assert ev["event"] == "read_rejected" and ev["data"]["verdict"] == "read_error"


async def test_an_open_event_stream_does_not_hold_up_shutdown(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k, k.client() as c, sse(c, k.auth()) as events:
        await events.next()
        k.stop.set()
        with pytest.raises((EOFError, httpx.RemoteProtocolError)):
            await events.until(lambda e: False, timeout=15)
        await asyncio.wait_for(k.task, 15)  # a hang guard, not a timing
        assert k.task.exception() is None


async def test_api_disabled_listens_nowhere(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, port = kiosk_config(
        tmp_path, broker.port, pty_port.link, card_reader=False, api="enabled = false"
    )
    async with running_station(cfg) as run:
        pty_port.scan("stored-anyway")
        assert await pty_port.aread(1) == ACK
        assert run.station.api is None
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


async def test_uplink_state_is_an_event(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k, k.client() as c:
        for _ in range(600):  # wait for the first connection (it may precede the API)
            if (await c.get("/v1/status", headers=k.auth())).json()["online"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the station never connected to the broker in 30 s")
        async with sse(c, k.auth()) as events:
            await events.next()
            broker.stop()
            ev = await events.until(lambda e: e["event"] == "uplink", timeout=30)
            assert ev["data"]["connected"] is False
            status = (await c.get("/v1/status", headers=k.auth())).json()
            assert status["online"] is False
            broker.start()
            ev = await events.until(lambda e: e["event"] == "uplink", timeout=30)
            assert ev["data"]["connected"] is True


async def test_card_info_pin_rules_and_the_pin_is_never_logged(
    broker: Broker, pty_port: Pty, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    wrong = "7390"
    async with running_kiosk(cfg) as k, k.client() as c:
        reader = k.readers["card-reader"]
        url = "/v1/cards/card-reader/info"
        status = (await c.get("/v1/status", headers=k.auth())).json()
        assert status["card_readers"] == ["card-reader"]
        for bad in ("12345", "12a4", "", "１２３４", 1234):
            r = await c.post(url, headers=k.auth(), json={"pin": bad})
            assert r.status_code == 422, bad
            assert str(bad) not in r.text or bad == ""
        assert reader.verify_calls == 0
        r = await c.post(url, headers=k.auth(), json={"pin": CARD_PIN})
        assert r.status_code == 200
        assert r.json() == {"reader": "card-reader", "info": CARD_INFO}
        assert r.headers["cache-control"] == "no-store"
        r = await c.post(url, headers=k.auth(), json={"pin": wrong})
        assert (r.status_code, r.json()["tries_left"], r.json()["locked"]) == (403, 2, False)
        r = await c.post(url, headers=k.auth(), json={"pin": wrong})
        assert (r.status_code, r.json()["tries_left"]) == (403, 1)
        calls = reader.verify_calls
        # one try left: refused without trying, even with the right PIN
        r = await c.post(url, headers=k.auth(), json={"pin": CARD_PIN})
        assert (r.status_code, r.json()["error"], r.json()["tries_left"]) == (403, "pin_refused", 1)
        assert reader.verify_calls == calls
        reader.card_present = False
        r = await c.post(url, headers=k.auth(), json={"pin": CARD_PIN})
        assert (r.status_code, r.json()["error"]) == (409, "card_error")
        for name in ("ticket-scanner", "nope"):
            r = await c.post(f"/v1/cards/{name}/info", headers=k.auth(), json={"pin": CARD_PIN})
            assert r.status_code == 404
            assert r.json()["detail"] == f"no card reader named {name}"
    logged = caplog.text
    assert "api: serving" in logged  # the capture did see the agent's logs
    for secret in (CARD_PIN, wrong, "12345", CARD_INFO["name"], CARD_INFO["address"]):
        assert secret not in logged
    db = load_config(cfg).outbox_path
    for f in db.parent.iterdir():
        data = f.read_bytes()
        assert not pin_in(CARD_PIN, data) and not pin_in(wrong, data)


async def test_locked_card_says_locked(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k, k.client() as c:
        k.readers["card-reader"].tries_left = 0
        r = await c.post("/v1/cards/card-reader/info", headers=k.auth(), json={"pin": CARD_PIN})
        assert r.status_code == 403
        assert r.json()["locked"] is True and r.json()["tries_left"] == 0


async def test_concurrent_pin_attempts_are_not_queued(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k, k.client() as c:
        url = "/v1/cards/card-reader/info"
        rs = await asyncio.gather(
            *(c.post(url, headers=k.auth(), json={"pin": "0000"}) for _ in range(4))
        )
        codes = sorted(r.status_code for r in rs)
        assert 409 in codes  # a second attempt while one runs: refused, not queued
        tries_spent = 3 - k.readers["card-reader"].tries_left
        assert tries_spent == codes.count(403)


async def test_photos_without_a_camera(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k, k.client() as c:
        r = await c.post("/v1/photos", headers=k.auth(), json={"camera": "ticket-scanner"})
        assert r.status_code == 501 and r.json()["error"] == "no_camera"


async def test_photo_is_stored_as_a_record(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False, camera=True)
    db = load_config(cfg).outbox_path
    async with running_kiosk(cfg, PhotoStation) as k, k.client() as c:
        status = (await c.get("/v1/status", headers=k.auth())).json()
        assert status["cameras"] == ["camera"] and status["card_readers"] == []
        r = await c.post("/v1/photos", headers=k.auth(), json={"camera": "camera"})
        assert r.status_code == 201, r.text
        photo = r.json()
        assert photo["device"] == "camera" and photo["content_type"] == "image/jpeg"
        # the answer came after the commit: the record is on disk
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            kind, seq, data = conn.execute(
                "SELECT kind, seq, data FROM records WHERE id = ?", (photo["record_id"],)
            ).fetchone()
        assert kind == "photo" and seq == photo["seq"]
        assert json.loads(data)["sha256"] == photo["sha256"]
        r = await c.post("/v1/photos", headers=k.auth(), json={"camera": "ticket-scanner"})
        assert r.status_code == 404 and r.json()["detail"] == "no camera named ticket-scanner"


async def test_status_reports_devices_outbox_and_uplink(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    async with running_kiosk(cfg) as k, k.client() as c:
        pty_port.scan("one")
        assert await pty_port.aread(1) == ACK
        s = (await c.get("/v1/status", headers=k.auth())).json()
        assert s["site"] == "toda-city-hall-1f" and s["agent"] == "station-03"
        assert s["devices"]["ticket-scanner"]["state"] == "connected"
        assert s["devices"]["ticket-scanner"]["reads"] == 1
        assert s["outbox"]["last_seq"] == 1 and s["outbox"]["full"] is False
        assert s["manual_device"] == "ticket-scanner"
        assert s["cameras"] == []
        assert s["events"]["last_id"].startswith(s["events"]["run"] + "-")


async def test_unix_socket(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, api=f'unix_socket = "{sock}"')
    async with running_kiosk(cfg) as k:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://kiosk") as c:
            assert (await c.get("/v1/status")).status_code == 401
            r = await c.get("/v1/status", headers=k.auth())
            assert r.status_code == 200 and r.json()["agent"] == "station-03"
    assert not sock.exists()


async def test_port_in_use_leaves_the_station_recording(
    broker: Broker, pty_port: Pty, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, port = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        async with running_station(cfg):
            pty_port.scan("still-stored")
            assert await pty_port.aread(1) == ACK
            for _ in range(100):
                if "cannot listen on" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


def test_api_section_refuses_non_loopback_hosts(tmp_path: Path) -> None:
    base = write_config(tmp_path, free_port(), devices="")
    text = base.read_text()
    for host in ("0.0.0.0", "192.168.1.20", "kiosk.example"):
        base.write_text(text + f'\n[api]\nhost = "{host}"\n')
        with pytest.raises(ConfigError) as e:
            load_config(base)
        assert "not a loopback address" in str(e.value) and "api" in str(e.value)
    base.write_text(text + '\n[api]\nhost = "0.0.0.0"\nallow_remote = true\n')
    assert load_config(base).api is not None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        base.write_text(text + f'\n[api]\nhost = "{host}"\n')
        assert load_config(base).api.host == host  # type: ignore[union-attr]
    base.write_text(text + '\n[api]\nmanual_device = "nope"\n')
    with pytest.raises(ConfigError, match=r"api\.manual_device: no device named 'nope'"):
        load_config(base)
    base.write_text(text + '\n[api]\nallowed_origin = "*"\n')
    with pytest.raises(ConfigError, match="allowed_origin"):
        load_config(base)


def test_api_fields_all_have_descriptions() -> None:
    from agent.config_schema import ApiSection

    for name, f in ApiSection.model_fields.items():
        assert f.description, name


@pytest.mark.parametrize(
    ("interpretation", "code"),
    [
        (None, "ok"),
        ({"type": "vaccination_ticket", "valid": True, "fields": {}, "problems": []}, "ok"),
        (
            {"type": "vaccination_ticket", "valid": False, "problems": ["bad_check_digit"]},
            "invalid_ticket",
        ),
        (
            {"type": "vaccination_ticket_number", "valid": False, "problems": ["wrong_length"]},
            "invalid_ticket",
        ),
        ({"type": "gs1", "valid": False, "problems": ["expired"]}, "expired"),
        ({"type": "gs1", "valid": True, "problems": ["expired", "unexpected_type"]}, "expired"),
        ({"type": "gtin", "valid": True, "problems": ["unexpected_type"]}, "unexpected"),
        ({"type": "gtin", "valid": False, "problems": ["bad_check_digit"]}, "invalid_code"),
        ({"type": "gs1", "valid": False, "problems": ["missing_separator"]}, "invalid_code"),
    ],
)
def test_verdicts(interpretation: dict[str, object] | None, code: str) -> None:
    assert verdict(interpretation) == code


def test_every_verdict_has_a_message_on_the_page() -> None:
    js = (ROOT / "agent" / "station" / "kiosk" / "static" / "app.js").read_text()
    table = js[js.index("const VERDICTS") : js.index("const TYPE_LABELS")].replace("|", "")
    codes = set(re.findall(r"^  (\w+): \{", table, re.M))
    assert codes == set(VERDICTS)
    for message in (
        "受付完了",
        "接種券の番号が正しくありません",
        "有効期限切れのワクチンです",
        "読み取りエラー",
    ):
        assert message in table


async def test_openapi_is_served_and_matches_docs(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    doc = openapi_document()
    assert json.loads((ROOT / "docs" / "openapi.json").read_text()) == doc
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    async with running_kiosk(cfg) as k, k.client() as c:
        r = await c.get("/v1/openapi.json", headers=k.auth())
        assert r.json() == doc
        routes = {
            getattr(route, "path", "")
            for route in k.station.api.app.routes  # type: ignore[union-attr]
        }
    assert {p for p in routes if p.startswith("/v1/")} == set(doc["paths"])


def _random_json(rng: random.Random, depth: int = 0) -> object:
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        alphabet = "0123456789abc\x1d\x00\n\"'\\<>&é受付🙂"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    if kind == "int":
        return rng.choice([0, -1, 4821, 2**63, -(2**70), rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-300, rng.random()])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["device", "text", "pin", "camera", "x", ""]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


async def test_random_bodies_never_get_a_5xx(
    broker: Broker, pty_port: Pty, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reproducible fuzz: random JSON and random bytes at every POST endpoint."""
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link)
    rng = random.Random(20261122)
    async with running_kiosk(cfg) as k, k.client() as c:
        statuses: set[int] = set()
        for i in range(300):
            path = rng.choice(["/v1/manual", "/v1/cards/card-reader/info", "/v1/photos"])
            if i % 5 == 0:
                content = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
            else:
                body = _random_json(rng)
                if i % 2 and isinstance(body, dict):
                    body["device"] = rng.choice(["ticket-scanner", "card-reader"])
                content = json.dumps(body).encode()
            r = await c.post(
                path, content=content, headers=k.auth(**{"Content-Type": "application/json"})
            )
            statuses.add(r.status_code)
            assert r.status_code < 500, (path, content, r.text)
            assert "error" in r.json() or r.status_code in (200, 201)
        assert {400, 422} <= statuses
        pty_port.scan("after-the-fuzz")
        assert await pty_port.aread(1) == ACK
    assert "internal_error" not in caplog.text and "Traceback" not in caplog.text


async def test_outbox_full_is_an_event_and_a_503(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg, _ = kiosk_config(tmp_path, broker.port, pty_port.link, card_reader=False)
    cfg.write_text(cfg.read_text().replace("resend_after_s = 30", "max_bytes = 100_000"))
    async with running_kiosk(cfg) as k, k.client() as c, sse(c, k.auth()) as events:
        await events.next()
        stored = 0
        for i in range(500):
            r = await c.post(
                "/v1/manual",
                headers=k.auth(),
                json={"device": "ticket-scanner", "text": f"{i:04d}" + "7" * 4000},
            )
            if r.status_code != 201:
                break
            stored += 1
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "not_stored" and r.json()["verdict"] == "not_stored"
        assert stored > 0
        ev = await events.until(lambda e: e["event"] in ("outbox_full", "read_rejected"))
        assert ev["event"] == "outbox_full"
        ev = await events.until(lambda e: e["event"] == "read_rejected")
        assert ev["data"]["verdict"] == "not_stored"
        # nothing old was dropped to make room
        assert (await k.station.outbox.stats()).last_seq == stored  # type: ignore[union-attr]


async def test_a_weak_token_file_is_refused_and_the_station_records_on(
    broker: Broker, pty_port: Pty, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "weak-token"
    token.write_text("1234\n")
    cfg, port = kiosk_config(
        tmp_path, broker.port, pty_port.link, card_reader=False, api=f'token_file = "{token}"'
    )
    async with running_station(cfg) as run:
        pty_port.scan("stored-anyway")
        assert await pty_port.aread(1) == ACK
        assert run.station.api is not None and not run.station.api.ready.is_set()
        assert f"{token}: api.token_file: token shorter than 32" in caplog.text
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_event_hub_resume_boundaries_and_slow_followers() -> None:
    from agent.station.kiosk.events import CLIENT_QUEUE, EventHub

    hub = EventHub(size=5)
    for i in range(8):
        hub.publish("read_accepted", {"seq": i + 1, "personal": {"name": "x"}})
    # the buffer holds events 4..8; resuming from 3 loses nothing, from 2 it would
    _, backlog, reset = hub.attach(hub.event_id(3))
    assert reset is None and [e.n for e in backlog] == [4, 5, 6, 7, 8]
    assert all('"personal"' not in e.data for e in backlog)  # never on the stream
    assert hub.attach(hub.event_id(2))[2] == "gap"
    assert hub.attach(hub.event_id(8))[1:] == ([], None)
    for bad in (hub.event_id(9), "other-3", "garbage", f"{hub.run}-x", ""):
        assert hub.attach(bad)[2] == "restarted", bad
    client, _, _ = hub.attach(None)
    for _ in range(CLIENT_QUEUE + 1):
        hub.publish("device_state", {"device": "d", "state": "connected"})
    assert client.overflowed and len(client.queue) == CLIENT_QUEUE
    hub.close()
    assert client.closed
    hub.publish("read_accepted", {})  # after close: ignored, nothing raised


async def test_status_shows_the_api_connection_counters_as_documented(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    """Open connections, evictions and descriptor (EMFILE) episodes, through the real
    server: idle sockets past max_connections, then accept()'s error as asyncio reports it."""
    import errno

    schema = openapi_document()["components"]["schemas"]
    counters = schema["ApiConnections"]
    cfg, port = kiosk_config(tmp_path, broker.port, pty_port.link, api="max_connections = 4")
    idle: list[socket.socket] = []
    async with running_kiosk(cfg) as k:

        async def status() -> dict[str, Any]:
            async with k.client() as c:  # a fresh connection: an idle kept-alive one is evicted
                body: dict[str, Any] = (await c.get("/v1/status", headers=k.auth())).json()
                return body

        first = (await status())["api_connections"]
        assert set(first) == set(counters["properties"]) == set(counters["required"])
        assert first["max_connections"] == 4 and first["open"] >= 1
        assert (first["evicted"], first["resource_episodes"]) == (0, 0)
        try:
            for _ in range(10):  # idle: connect, send nothing; each past the cap evicts one
                idle.append(socket.create_connection(("127.0.0.1", port)))
            async with asyncio.timeout(10):
                while True:
                    now = (await status())["api_connections"]
                    if now["evicted"] >= 7:
                        break
                    await asyncio.sleep(0.05)
            assert now["open"] <= 4
            loop = asyncio.get_running_loop()
            for _ in range(3):  # one episode of three accept() failures
                loop.call_exception_handler(
                    {"message": "accept", "exception": OSError(errno.EMFILE, "Too many open files")}
                )
            s = await status()
        finally:
            for sock in idle:
                sock.close()
    conns = s["api_connections"]
    assert (conns["resource_errors"], conns["resource_episodes"]) == (3, 1)
    assert conns["out_of_descriptors"] is True
    for key, value in conns.items():  # the types the document states
        want = bool if counters["properties"][key]["type"] == "boolean" else int
        assert type(value) is want, key
    assert set(schema["Status"]["required"]) <= set(s)
