"""`madoguchi registry --config` and `madoguchi dashboard --config` on the shipped fleet
broker (provisioning/broker/: TLS, require_certificate, the CN as user name and client
id, the ACL): a station's records are stored and acked, the dashboard sees the station
and its command goes through, audited. Both processes are real ones, from central.toml."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from agent.central.config import dsn_with_password
from agent.testing import LoggedProcess, Pty, free_port, running_station
from tests.support import ROOT
from tests.support.central import DESK_TOKEN, DESK_USER, PgCluster, pg_bin
from tests.system.test_broker_acl import Fleet

pytestmark = pytest.mark.broker

SITE, NAME = "toda-city-hall-1f", "station-03"


def station_config(tmp_path: Path, fleet: Fleet, scanner: Pty) -> Path:
    cert, key = fleet.enroll_station(SITE, NAME)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
site = "{SITE}"
name = "{NAME}"
data_dir = "{tmp_path / "data"}"
telemetry_interval_s = 0.5

[mqtt]
host = "localhost"
port = {fleet.broker.port}
tls_ca = "{fleet.ca_file}"
tls_cert = "{cert}"
tls_key = "{key}"
backoff_max_s = 1

[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
port = "{scanner.link}"
host_ack = "\\u0006"
""")
    return cfg


def central_toml(tmp_path: Path, fleet: Fleet, http_port: int) -> Path:
    reg_cert, reg_key = fleet.role("registry")
    dash_cert, dash_key = fleet.role("dashboard")
    (tmp_path / "tokens").write_text(f"{DESK_USER} {DESK_TOKEN}\n")
    (tmp_path / "tokens").chmod(0o600)
    path = tmp_path / "central.toml"
    path.write_text(f"""
[broker]
host = "localhost"
port = {fleet.broker.port}
tls_ca = "{fleet.ca_file}"

[database]
dsn = "registry.db"

[registry]
tls_cert = "{reg_cert}"
tls_key = "{reg_key}"

[dashboard]
tls_cert = "{dash_cert}"
tls_key = "{dash_key}"
database_dsn = "registry.db"
listen_port = {http_port}
token_file = "tokens"
audit_file = "audit.jsonl"
""")
    return path


def madoguchi(command: str, config: Path, log: Path) -> LoggedProcess:
    return LoggedProcess(
        [sys.executable, "-m", "agent", command, "--config", str(config)], log, cwd=ROOT
    )


def http(url: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"authorization": f"Bearer {DESK_TOKEN}", "content-type": "application/json"}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=20) as res:
        return json.loads(res.read())


async def test_registry_and_dashboard_from_central_toml_on_the_tls_fleet_broker(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    fleet.broker.start()
    scanner = Pty(tmp_path / "ttyScanner")
    http_port = free_port()
    config = central_toml(tmp_path, fleet, http_port)
    registry = madoguchi("registry", config, tmp_path / "registry.log")
    dashboard = madoguchi("dashboard", config, tmp_path / "dashboard.log")
    base = f"http://127.0.0.1:{http_port}"
    log = ""
    try:
        registry.start()
        await asyncio.to_thread(registry.wait_log, "registry consuming")
        dashboard.start()
        await asyncio.to_thread(dashboard.wait_log, "dashboard on http://")
        async with running_station(station_config(tmp_path, fleet, scanner)) as run:
            scanner.scan("111122410000012345")
            assert await scanner.aread(1) == b"\x06"
            outbox = run.station.outbox
            assert outbox is not None

            async def until(check: Any) -> None:
                while not await check():
                    await asyncio.sleep(0.05)

            async def confirmed() -> bool:
                assert outbox is not None
                return (await outbox.stats()).confirmed == 1

            await asyncio.wait_for(until(confirmed), 20)  # stored, then acked over TLS

            async def online() -> bool:
                fleet_view = await asyncio.to_thread(http, f"{base}/api/fleet")
                rows = [r for s in fleet_view["sites"] for r in s["stations"]]
                return bool(rows) and rows[0]["state"] == "online" and bool(fleet_view["broker"])

            await asyncio.wait_for(until(online), 20)
            result = await asyncio.to_thread(
                http, f"{base}/api/command", {"site": SITE, "agent": NAME, "name": "ping"}
            )
            assert result["ok"] is True
    finally:
        scanner.close()
        registry.stop()
        dashboard.stop()
        log = fleet.broker.log.read_text()  # the broker's directory goes with it
        fleet.broker.stop()
    with sqlite3.connect(tmp_path / "registry.db") as db:
        rows = db.execute("SELECT site, agent, body FROM records").fetchall()
    assert [(s, a) for s, a, _ in rows] == [(SITE, NAME)]
    assert json.loads(rows[0][2])["data"]["text"] == "111122410000012345"
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["who"], e["command"], e["outcome"]) for e in audit] == [
        (DESK_USER, "ping", "sent"),
        (DESK_USER, "ping", "ok"),
    ]
    # the identities came from the certificates: the CN is the client id
    assert {"registry", "dashboard", f"{SITE}/{NAME}"} <= set(
        line.split(" as ")[1].split()[0]
        for line in log.splitlines()
        if "New client connected" in line
    )
    assert "Denied" not in log, [line for line in log.splitlines() if "Denied" in line]


class PasswordPg(PgCluster):
    """A cluster of this test's own that wants a password (scram), over its unix socket:
    the session cluster trusts everyone, so it could not tell a password from none."""

    PASSWORD = "s3cret:/@ pass ü"

    def start(self) -> None:
        self.port = free_port()
        pwfile = self.dir / "pw"
        pwfile.write_text(self.PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres")
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-instructions",
        )
        self.start_server()

    def dsn(self, db: str = "postgres") -> str:
        return dsn_with_password(super().dsn(db), self.PASSWORD)


async def test_registry_reads_the_database_password_from_its_file(tmp_path: Path) -> None:
    """central.toml's DSN has no password; the file has it; PostgreSQL asks for it.
    The password appears in no command line and no log line."""
    pg = PasswordPg()
    pg.start()
    fleet = Fleet(tmp_path)
    fleet.broker.start()
    scanner = Pty(tmp_path / "ttyScanner")
    registry: LoggedProcess | None = None
    try:
        dsn = pg.new_database()
        bare = dsn.replace(":" + quote(PasswordPg.PASSWORD, safe="") + "@", "@")
        assert bare != dsn
        config = central_toml(tmp_path, fleet, free_port())
        (tmp_path / "db.password").write_text(PasswordPg.PASSWORD + "\n")
        text = config.read_text().replace(
            '\ndsn = "registry.db"', f'\ndsn = "{bare}"\npassword_file = "db.password"'
        )
        config.write_text(text)
        registry = madoguchi("registry", config, tmp_path / "registry.log")
        registry.start()
        await asyncio.to_thread(registry.wait_log, "registry consuming")
        cmdline = Path(f"/proc/{registry.pid}/cmdline").read_bytes()
        async with running_station(station_config(tmp_path, fleet, scanner)):
            scanner.scan("111122410000012345")
            assert await scanner.aread(1) == b"\x06"
            await asyncio.to_thread(registry.wait_log, "stored")
        assert pg.query(dsn, "SELECT count(*) FROM records") == [(1,)]
        # without the file's password PostgreSQL refuses: the file is what let it in
        config.write_text(text.replace('password_file = "db.password"\n', ""))
        refused = madoguchi("registry", config, tmp_path / "refused.log")
        refused.start()
        assert refused.proc is not None
        assert await asyncio.to_thread(refused.proc.wait, 30) != 0
        refused.close()
        assert "password" in refused.text()
        assert "Traceback" not in refused.text(), refused.text()  # one line that says why
    finally:
        scanner.close()
        if registry is not None:
            registry.stop()
        fleet.broker.stop()
        pg.stop()
    for secret in (PasswordPg.PASSWORD.encode(), quote(PasswordPg.PASSWORD, safe="").encode()):
        assert secret not in cmdline
        assert secret not in (tmp_path / "registry.log").read_bytes()
        assert secret not in (tmp_path / "refused.log").read_bytes()
