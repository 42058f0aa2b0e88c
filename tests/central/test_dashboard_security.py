"""The dashboard refuses what the desk did not send: no credential, a foreign Host
(DNS rebinding), a foreign Origin; commands go through only authenticated, audited,
to a real station over a real mosquitto; capture_photo is refused by default."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.central.audit import AuditLog
from agent.central.dashboard import Dashboard
from agent.central.dashboard_guard import DashboardGuard, load_tokens
from agent.errors import AuditError, DashboardAuthError
from agent.testing import Broker, FakeCamera, Pty, free_port, running_station, write_config
from tests.support.camera import camera_station, photo_scene
from tests.support.central import DESK_TOKEN, DESK_USER, authorized, desk_guard, running_dashboard

S, A = "toda-city-hall-1f", "station-03"


def request(
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    h = {"content-type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=20) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def call(url: str, body: dict[str, Any] | None = None, /, **headers: str) -> tuple[int, Any]:
    return await asyncio.to_thread(
        request, url, body, {k.replace("_", "-"): v for k, v in headers.items()}
    )


async def online(base: str) -> None:
    async def wait() -> None:
        while True:
            code, fleet = await call(f"{base}/api/fleet", **authorized())
            assert code == 200
            if fleet["sites"] and fleet["sites"][0]["stations"][0]["state"] == "online":
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(wait(), 20)


@pytest.mark.broker
async def test_refused_without_token_foreign_host_or_origin_and_audited_with_token(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    audit = AuditLog(tmp_path / "audit.jsonl")
    dash = Dashboard(
        "127.0.0.1", broker.port, http_port=free_port(), guard=desk_guard(), audit=audit
    )
    resend = {"site": S, "agent": A, "name": "resend"}
    async with running_dashboard(dash), running_station(cfg):
        base = f"http://127.0.0.1:{dash.http_port}"
        await online(base)
        host = f"127.0.0.1:{dash.http_port}"
        refusals = [
            ({}, 401),  # no credential
            ({"authorization": "Bearer " + "x" * 40}, 401),  # a wrong token
            ({"authorization": f"Basic {DESK_TOKEN}"}, 401),  # the token, wrong scheme
            (authorized({"host": f"attacker.example:{dash.http_port}"}), 421),  # rebinding
            (authorized({"host": "attacker.example"}), 421),
            (authorized({"origin": "http://attacker.example"}), 403),
            (authorized({"origin": f"http://{host}.attacker.example"}), 403),
            (authorized({"origin": "null"}), 403),
        ]
        for headers, status in refusals:
            for path, body in (
                ("/api/command", resend),
                ("/api/fleet", None),
                ("/api/audit", None),
            ):
                code, answer = await call(f"{base}{path}", body, **headers)
                assert (path, headers, code) == (path, headers, status)
                assert answer["ok"] is False and "sites" not in answer
        # none of that reached the station or the audit log
        assert dash.fleet.stations[(S, A)].results == {}  # no command answered: none sent
        assert audit.tail() == []
        # the page itself is public (it holds no data) but still checks Host
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{base}/", timeout=10))
        assert page.status == 200
        assert await call(f"{base}/", None, host="attacker.example") == (
            421,
            {"ok": False, "error": "wrong_host", "detail": "Host is not this dashboard"},
        )
        # the same request with the token and the page's own Origin goes through
        code, result = await call(
            f"{base}/api/command", resend, **authorized({"origin": f"http://{host}"})
        )
        assert code == 200 and result["ok"] is True and "requeued" in result
        entries = audit.tail()
        assert [(e["who"], e["site"], e["agent"], e["command"], e["outcome"]) for e in entries] == [
            (DESK_USER, S, A, "resend", "sent"),
            (DESK_USER, S, A, "resend", "ok"),
        ]
        assert entries[0]["at"].endswith("Z")
        # capture_photo: refused by the dashboard unless dashboard.remote_photo, not audited
        code, answer = await call(
            f"{base}/api/command", {"site": S, "agent": A, "name": "capture_photo"}, **authorized()
        )
        assert code == 403 and "remote_photo" in answer["error"]
        assert len(audit.tail()) == 2
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o777 == 0o600


@pytest.mark.broker
async def test_trusted_header_only_from_a_trusted_proxy(broker: Broker, tmp_path: Path) -> None:
    def dash(proxies: list[str]) -> Dashboard:
        guard = DashboardGuard(trusted_header="X-Remote-User", trusted_proxies=proxies)
        return Dashboard("127.0.0.1", broker.port, http_port=free_port(), guard=guard)

    async with running_dashboard(dash(["127.0.0.1"])) as d:
        base = f"http://127.0.0.1:{d.http_port}"
        assert (await call(f"{base}/api/fleet", x_remote_user="tanaka"))[0] == 200
        assert (await call(f"{base}/api/fleet"))[0] == 401
        assert (await call(f"{base}/api/fleet", x_remote_user=""))[0] == 401
        # this dashboard has no audit log: it sends no command at all
        code, answer = await call(
            f"{base}/api/command", {"site": S, "agent": A, "name": "ping"}, x_remote_user="tanaka"
        )
        assert (code, answer["error"]) == (503, "no audit log: commands are off")
    async with running_dashboard(dash(["10.0.0.1"])) as d:  # we are not the proxy
        base = f"http://127.0.0.1:{d.http_port}"
        assert (await call(f"{base}/api/fleet", x_remote_user="tanaka"))[0] == 401


@pytest.mark.broker
async def test_no_command_is_sent_when_the_audit_log_cannot_be_written(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    """ENOSPC on the audit file's filesystem: 503, and the station got no command."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as filled:
                while True:
                    os.write(fd, b"\0" * 4096)
            assert filled.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
        audit = AuditLog(full / "audit.jsonl")
        dash = Dashboard(
            "127.0.0.1", broker.port, http_port=free_port(), guard=desk_guard(), audit=audit
        )
        async with running_dashboard(dash), running_station(cfg):
            base = f"http://127.0.0.1:{dash.http_port}"
            await online(base)
            code, answer = await call(
                f"{base}/api/command", {"site": S, "agent": A, "name": "ping"}, **authorized()
            )
            assert code == 503 and "not sent" in answer["error"]
            assert dash.fleet.stations[(S, A)].results == {}  # no result: nothing was sent
            with pytest.raises(AuditError, match=r"audit\.jsonl: dashboard\.audit_file: No space"):
                audit.record(
                    who="x", site=S, agent=A, command="ping", request_id="r", outcome="sent"
                )
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_audit_tail_skips_a_torn_last_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record(who="a", site=S, agent=A, command="ping", request_id="1", outcome="sent")
    with (tmp_path / "audit.jsonl").open("ab") as f:
        f.write(b'{"who": "b", "site"')  # killed mid-write
    assert [e["who"] for e in log.tail()] == ["a"]
    log.record(who="c", site=S, agent=A, command="ping", request_id="2", outcome="ok")
    # the next line starts after the torn one: only the torn line is lost
    assert [e["who"] for e in log.tail()] in (["a", "c"], ["a"])


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_audit_tail_survives_hostile_bytes(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    path.write_bytes(data)
    entries = AuditLog(path).tail()
    assert all(isinstance(e, dict) for e in entries)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=300))
def test_token_file_parser_takes_only_long_tokens(tmp_path_factory: Any, text: str) -> None:
    path = tmp_path_factory.mktemp("tok") / "tokens"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        tokens = load_tokens(path)
    except DashboardAuthError as e:
        assert str(e).startswith(f"{path}: dashboard.token_file: ")
    else:
        assert tokens and all(len(t) >= 32 and " " not in t for t in tokens)


def test_token_file_names_its_users(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# the desk\n{DESK_USER} {DESK_TOKEN}\n{'z' * 40}\n")
    assert load_tokens(path) == {DESK_TOKEN: DESK_USER, "z" * 40: "token"}
    path.write_text("desk short\n")
    with pytest.raises(DashboardAuthError, match="line 1: token shorter than 32"):
        load_tokens(path)
    with pytest.raises(DashboardAuthError, match=r"missing: dashboard\.token_file: No such file"):
        load_tokens(tmp_path / "missing")


CAMERA = """
[[devices]]
name = "id-camera"
profile = "generic-uvc-webcam"
device = "/dev/null-camera"
"""


@pytest.mark.broker
@pytest.mark.parametrize("station_opts_in", [False, True])
async def test_capture_photo_needs_both_ends_to_opt_in(
    broker: Broker, tmp_path: Path, station_opts_in: bool
) -> None:
    """dashboard.remote_photo lets the command out; the station still refuses it unless
    its [agent] remote_photo is on (with it on, this station then fails for want of an
    outbox key: the command did reach the camera path)."""
    extra = "remote_photo = true" if station_opts_in else ""
    cfg = write_config(tmp_path, broker.port, devices=CAMERA, extra_agent=extra)
    audit = AuditLog(tmp_path / "audit.jsonl")
    dash = Dashboard(
        "127.0.0.1",
        broker.port,
        http_port=free_port(),
        guard=desk_guard(),
        audit=audit,
        remote_photo=True,
    )
    camera = FakeCamera([], frame_dt=0.05, still=photo_scene(320, 240))
    async with running_dashboard(dash), camera_station(cfg, camera) as station:
        base = f"http://127.0.0.1:{dash.http_port}"
        await online(base)
        code, result = await call(
            f"{base}/api/command", {"site": S, "agent": A, "name": "capture_photo"}, **authorized()
        )
        assert code == 200 and result["ok"] is False
        if station_opts_in:
            assert "outbox.key_file" in result["error"]
        else:
            assert "[agent] remote_photo" in result["error"]
        assert station.outbox is not None
        assert (await station.outbox.stats()).last_seq == 0  # no photo record either way
    assert [(e["command"], e["outcome"]) for e in audit.tail()] == [
        ("capture_photo", "sent"),
        ("capture_photo", "failed"),
    ]
