"""Remote configuration with rollback (issue #22, point 3), end to end on the shipped TLS
fleet broker and ACL: `madoguchi fleet config push` (the CLI, with a `fleet` certificate)
to a real `madoguchi run` process, a real registry process from central.toml.

- a push with errors is refused with every problem, and nothing on the station changes;
- a good push is applied, confirmed, reported in status, and audited;
- a push pointing the station at a wrong broker is rolled back by the station after
  `config_rollback_after_s`, it reconnects with the old file and its scans arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.central.audit import AuditLog
from agent.central.dashboard import Dashboard
from agent.cli.main import main as cli
from agent.testing import AgentProcess, LoggedProcess, Pty, free_port
from tests.support.central import DESK_USER, desk_guard, running_dashboard
from tests.system.test_broker_acl import Fleet, P
from tests.system.test_central_tls import (
    NAME,
    SITE,
    central_toml,
    madoguchi,
    station_config,
)
from tests.system.test_cert_expiry import http_json

pytestmark = pytest.mark.broker

ROLLBACK_AFTER_S = 3.0


@dataclass
class Setup:
    tmp: Path
    fleet: Fleet
    scanner: Pty
    agent: AgentProcess
    config: Path
    original: str
    fleet_ident: tuple[Path, Path]
    registry: LoggedProcess

    def push_argv(self, new: Path, revision: str, wait: float) -> list[str]:
        cert, key = self.fleet_ident
        return [
            "fleet",
            "config",
            "push",
            "--site",
            SITE,
            "--agent",
            NAME,
            str(new),
            "--revision",
            revision,
            "--wait",
            str(wait),
            "--host",
            "localhost",
            "--port",
            str(self.fleet.broker.port),
            "--tls-ca",
            str(self.fleet.ca_file),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--audit-file",
            str(self.tmp / "fleet-audit.jsonl"),
        ]

    async def push(self, text: str, revision: str, wait: float = 0.0) -> int:
        new = self.tmp / f"{revision}.toml"
        new.write_text(text)
        return await asyncio.to_thread(cli, self.push_argv(new, revision, wait))

    def audit(self) -> list[dict[str, Any]]:
        path = self.tmp / "fleet-audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def records(self) -> list[str]:
        with sqlite3.connect(self.tmp / "registry.db") as db:
            rows = db.execute("SELECT body FROM records").fetchall()
        return [json.loads(body)["data"]["text"] for (body,) in rows]

    async def scan_arrives(self, code: str, timeout: float = 20.0) -> None:
        await asyncio.to_thread(self.agent.wait_connected)  # also after a loop restart
        self.scanner.scan(code)
        assert await self.scanner.aread(1, timeout=timeout) == b"\x06"  # stored
        async with asyncio.timeout(timeout):
            while code not in await asyncio.to_thread(self.records):
                await asyncio.sleep(0.1)

    async def status(self, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The station's retained status once `until` holds (it is republished within
        the uplink's status rate limit, 5 s), as the dashboard reads it."""
        async with (
            self.fleet.client(self.fleet_ident, "status-reader") as client,
            asyncio.timeout(15),
        ):
            await client.subscribe(f"{P}/{SITE}/{NAME}/status", qos=1)
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                body: dict[str, Any] = json.loads(m.payload)
                if until(body):
                    return body
        raise AssertionError("no status")


@contextlib.asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Setup]:
    fleet = Fleet(tmp_path)
    fleet.broker.start()
    scanner = Pty(tmp_path / "ttyScanner")
    config = station_config(tmp_path, fleet, scanner)
    text = config.read_text().replace(
        "telemetry_interval_s = 0.5\n",
        f"telemetry_interval_s = 0.5\nconfig_rollback_after_s = {ROLLBACK_AFTER_S}\n",
    )
    config.write_text(text)
    registry = madoguchi("registry", central_toml(tmp_path, fleet, free_port()), tmp_path / "r.log")
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        registry.start()
        await asyncio.to_thread(registry.wait_log, "registry consuming")
        agent.start()
        await asyncio.to_thread(agent.wait_log, "connected to localhost")
        yield Setup(tmp_path, fleet, scanner, agent, config, text, fleet.role("fleet"), registry)
    finally:
        agent.stop()
        registry.stop()
        scanner.close()
        fleet.broker.stop()


async def test_a_push_with_errors_is_refused_then_a_good_one_is_confirmed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(tmp_path) as s:
        await s.scan_arrives("111122410000012345")
        # what check-config says of a file that does not load: every problem in it
        bad = s.original.replace("[agent]\n", "[agent]\ncolour = 'blue'\n").replace(
            'profile = "generic-serial-scanner"', 'profile = "no-such-profile"'
        )
        assert await s.push(bad, "bad-1") == 1
        err = capsys.readouterr().err
        assert "revision bad-1 refused: 2 problem(s); nothing applied" in err
        assert "agent.colour" in err and "no-such-profile" in err
        # and of one that loads: every file it names that this host cannot read
        cert = s.original.split('tls_cert = "')[1].split('"')[0]
        missing = s.original.replace(str(s.fleet.ca_file), str(tmp_path / "missing-ca.crt"))
        missing = missing.replace(cert, str(tmp_path / "missing.crt"))
        assert await s.push(missing, "bad-2") == 1
        err = capsys.readouterr().err
        assert "revision bad-2 refused: 2 problem(s); nothing applied" in err
        assert "mqtt.tls_ca" in err and "missing-ca.crt: not found" in err
        assert "mqtt.tls_cert" in err and "missing.crt: not found" in err
        assert s.config.read_text() == s.original  # nothing applied
        assert not s.config.with_name("agent.toml.previous").exists()
        refused = s.audit()[-1]
        assert (refused["outcome"], refused["command"]) == ("refused", "config")
        assert "missing-ca.crt" in refused["error"] and "missing.crt" in refused["error"]

        good = s.original.replace("telemetry_interval_s = 0.5", "telemetry_interval_s = 0.4")
        assert await s.push(good, "good-1", wait=20) == 0
        assert "revision good-1 applied and confirmed" in capsys.readouterr().out
        assert s.config.read_text() == good
        assert s.config.with_name("agent.toml.previous").read_text() == s.original
        await s.scan_arrives("111122410000099999")
        status = await s.status(lambda b: b.get("config_state") == "confirmed")
        assert status["config_revision"] == "good-1"
        assert "config_rolled_back" not in status
        assert [(e["request_id"].split("-")[1], e["outcome"]) for e in s.audit()] == [
            ("bad", "sent"),
            ("bad", "refused"),
            ("bad", "sent"),
            ("bad", "refused"),
            ("good", "sent"),
            ("good", "confirmed"),
        ]
        s.agent.check_running()  # the same process all along: its loop restarted


async def test_a_push_to_a_wrong_broker_is_rolled_back_and_scans_arrive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(tmp_path) as s:
        wrong_port = free_port()  # nothing listens there
        wrong = s.original.replace(f"port = {s.fleet.broker.port}", f"port = {wrong_port}")
        assert wrong != s.original
        loop = asyncio.get_running_loop()
        started = loop.time()
        rc = await s.push(wrong, "lockout-1", wait=ROLLBACK_AFTER_S + 20)
        took = loop.time() - started
        err = capsys.readouterr().err
        assert rc == 1
        assert "revision lockout-1 rolled_back" in err and f"localhost:{wrong_port}" in err
        assert ROLLBACK_AFTER_S <= took < ROLLBACK_AFTER_S + 15, took
        assert s.config.read_text() == s.original  # the station restored its own file
        # a scan taken after the rollback reaches the registry over the old broker
        await s.scan_arrives("111122410000054321")
        status = await s.status(lambda b: b.get("state") == "online")
        assert status["config_revision"] is None  # the file it started with
        assert status["config_rolled_back"]["revision"] == "lockout-1"
        assert f"localhost:{wrong_port}" in status["config_rolled_back"]["reason"]
        assert [e["outcome"] for e in s.audit()] == ["sent", "rolled_back"]
        s.agent.check_running()


async def test_a_push_not_decided_within_the_wait_says_what_the_station_last_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No registry to confirm the revision, a trial longer than the desk waits: the push
    ends `unknown`, audited, naming the revision the station says it runs, on trial."""
    async with running(tmp_path) as s:
        s.registry.stop()
        slow = s.original.replace(
            f"config_rollback_after_s = {ROLLBACK_AFTER_S}", "config_rollback_after_s = 60"
        )
        assert slow != s.original
        rc = await s.push(slow, "slow-1", wait=2.0)
        err = capsys.readouterr().err
        assert rc == 1
        assert (
            "revision slow-1 unknown: neither confirmed nor rolled back in 2.0 s; last heard" in err
        )
        assert "config_revision slow-1, config_state applied" in err
        unknown = s.audit()[-1]
        assert unknown["outcome"] == "unknown" and "config_state applied" in unknown["error"]
        s.agent.check_running()


async def test_a_push_that_reaches_the_broker_but_not_the_registry_is_rolled_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong topic_prefix: the broker takes the connection, the registry never hears."""
    async with running(tmp_path) as s:
        wrong = s.original.replace("[mqtt]\n", '[mqtt]\ntopic_prefix = "madoguchi/v2"\n')
        rc = await s.push(wrong, "prefix-1", wait=ROLLBACK_AFTER_S + 20)
        err = capsys.readouterr().err
        assert rc == 1 and "revision prefix-1 rolled_back" in err
        assert "connected, no registry ack" in err
        assert s.config.read_text() == s.original
        await s.scan_arrives("111122410000077777")


async def test_the_dashboard_pushes_a_configuration_audited_and_shows_its_revision(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as s:
        dash = Dashboard(
            "127.0.0.1",
            s.fleet.broker.port,
            http_port=free_port(),
            tls_context=s.fleet.tls(*s.fleet.role("dashboard")),
            guard=desk_guard(),
            audit=AuditLog(tmp_path / "dashboard-audit.jsonl"),
        )
        base = f"http://127.0.0.1:{dash.http_port}"
        async with running_dashboard(dash):

            async def row(until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
                async with asyncio.timeout(20):
                    while True:
                        view = await asyncio.to_thread(http_json, f"{base}/api/fleet")
                        rows = [r for site in view["sites"] for r in site["stations"]]
                        if rows and until(rows[0]):
                            return rows[0]
                        await asyncio.sleep(0.1)

            await row(lambda r: r["state"] == "online")
            bad = s.original.replace("[agent]\n", "[agent]\ncolour = 'blue'\n")
            refused = await asyncio.to_thread(
                http_json, f"{base}/api/config", {"site": SITE, "agent": NAME, "toml": bad}
            )
            assert refused["ok"] is False and "agent.colour" in refused["problems"][0]
            good = s.original.replace("telemetry_interval_s = 0.5", "telemetry_interval_s = 0.4")
            applied = await asyncio.to_thread(
                http_json,
                f"{base}/api/config",
                {"site": SITE, "agent": NAME, "toml": good, "revision": "desk-1"},
            )
            assert applied["ok"] is True and applied["revision"] == "desk-1"
            shown = await row(lambda r: r["config_state"] == "confirmed")
            assert shown["config_revision"] == "desk-1"
            assert s.config.read_text() == good
        entries = [(e["who"], e["command"], e["outcome"]) for e in dash.audit.tail()]  # type: ignore[union-attr]
        assert entries == [
            (DESK_USER, "config", "sent"),
            (DESK_USER, "config", "failed"),
            (DESK_USER, "config", "sent"),
            (DESK_USER, "config", "ok"),
        ]
        failed = dash.audit.tail()[1]  # type: ignore[union-attr]
        assert "agent.colour" in failed["error"]
