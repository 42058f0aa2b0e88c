"""Certificate renewal over MQTT (issue #22, point 5) on the shipped TLS fleet broker and
ACL: a station whose certificate is at 81 % of a 20 s life asks `fleet ca-serve` for a
new one; refused while it is not on the allowlist (retried with backoff), signed once it
is; the new key and certificate are used at the next connection without a restart,
after the old certificate has expired; a scan then reaches the registry.

About 9 s: the old certificate must really have expired before the broker restarts.
An expired certificate is reported and never offered (about 4 s)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.central.audit import AuditLog
from agent.central.signer import CsrSigner
from agent.testing import Pty, free_port, running_station, stop_mosquitto
from tests.system.test_broker_acl import Fleet
from tests.system.test_central_tls import NAME, SITE, central_toml, madoguchi, station_config
from tests.system.test_cert_expiry import resign

pytestmark = pytest.mark.broker

LIFETIME_S = 20.0


async def until(check: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_a_certificate_at_81_percent_is_renewed_and_used_on_the_next_connect(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    fleet.broker.start()
    scanner = Pty(tmp_path / "ttyScanner")
    cfg = station_config(tmp_path, fleet, scanner)
    cert_path = tmp_path / "stations" / f"{SITE}_{NAME}" / "tls.crt"
    key_path = cert_path.with_name("tls.key")
    old_key = key_path.read_bytes()
    now = datetime.now(UTC)
    old_after = now + timedelta(seconds=LIFETIME_S * 0.19)
    resign(fleet, cert_path, now - timedelta(seconds=LIFETIME_S * 0.81), old_after)
    allow = tmp_path / "stations.txt"
    allow.write_text("# nobody yet\nother-site/station-01\n")
    ca_key = tmp_path / "ca.key"
    from cryptography.hazmat.primitives import serialization

    ca_key.write_bytes(
        fleet.ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer = CsrSigner(
        "localhost",
        fleet.broker.port,
        ca_cert=fleet.ca_file,
        ca_key=ca_key,
        allow=allow,
        days=1,
        tls_context=fleet.tls(*fleet.role("fleet-ca")),
        audit=AuditLog(tmp_path / "ca-audit.jsonl"),
    )
    registry = madoguchi("registry", central_toml(tmp_path, fleet, free_port()), tmp_path / "r.log")
    stop = asyncio.Event()
    serving = asyncio.create_task(signer.run(stop))
    try:
        registry.start()
        await asyncio.to_thread(registry.wait_log, "registry consuming")
        await asyncio.wait_for(signer.ready.wait(), 10)
        async with running_station(cfg) as run:
            renewer = run.station.renewer
            # not on the allowlist: refused, said so, retried with backoff
            await until(lambda: renewer.attempts >= 1, 10)
            assert renewer.state == "failed"
            assert renewer.last_error is not None
            assert f"{SITE}/{NAME} is not on the signer's allowlist" in renewer.last_error
            assert key_path.read_bytes() == old_key
            assert not (tmp_path / "data" / "credentials" / "tls.crt").exists()
            allow.write_text(f"{SITE}/{NAME}\n")  # read again at the next CSR
            await until(lambda: renewer.state == "renewed", 15)
            # installed in the state directory: the configured pair may be read-only
            # (LoadCredential=) and is left as it was
            assert key_path.read_bytes() == old_key
            renewed = tmp_path / "data" / "credentials"
            assert (renewed / "tls.key").read_bytes() != old_key  # a new key, made here
            new = x509.load_pem_x509_certificate((renewed / "tls.crt").read_bytes())
            assert new.not_valid_after_utc > datetime.now(UTC) + timedelta(hours=23)
            assert run.station.describe()["cert_lifetime_used"] < 0.01
            assert oct((renewed / "tls.key").stat().st_mode & 0o777) == "0o600"
            # the old certificate expires; the broker restarts; the station's next
            # connection can only succeed with the new one
            await until(lambda: datetime.now(UTC) > old_after + timedelta(seconds=1), 15)
            uplink = run.station.uplink
            assert uplink is not None
            sessions = uplink.session
            assert fleet.broker.proc is not None
            stop_mosquitto(fleet.broker.proc)
            fleet.broker.start()
            await until(lambda: uplink.connected and uplink.session > sessions, 15)
            # the restarted broker kept no sessions: scan once the registry is back too
            await asyncio.to_thread(registry.wait_log, "registry consuming", 15, 2)
            scanner.scan("111122410000012345")
            assert await scanner.aread(1) == b"\x06"
            outbox = run.station.outbox
            assert outbox is not None
            async with asyncio.timeout(15):
                while (await outbox.stats()).confirmed != 1:
                    await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
        registry.stop()
        scanner.close()
        fleet.broker.stop()
    with sqlite3.connect(tmp_path / "registry.db") as db:
        assert db.execute("SELECT count(*) FROM records").fetchone() == (1,)
    audit = [json.loads(line) for line in (tmp_path / "ca-audit.jsonl").read_text().splitlines()]
    outcomes = [e["outcome"] for e in audit]
    assert outcomes[0] == "refused" and outcomes[-1] == "signed" and outcomes.count("signed") == 1
    assert {(e["site"], e["agent"], e["command"]) for e in audit} == {(SITE, NAME, "sign-csr")}


async def test_an_expired_certificate_is_reported_and_never_offered(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.broker.start()
    scanner = Pty(tmp_path / "ttyScanner")
    cfg = station_config(tmp_path, fleet, scanner)
    cert_path = tmp_path / "stations" / f"{SITE}_{NAME}" / "tls.crt"
    now = datetime.now(UTC)
    resign(fleet, cert_path, now - timedelta(days=30), now - timedelta(minutes=1))
    try:
        async with running_station(cfg) as run:
            uplink = run.station.uplink
            assert uplink is not None
            await until(lambda: uplink.degraded is not None, 10)
            assert uplink.degraded is not None
            assert f"mqtt.tls_cert: {cert_path}: expired on" in uplink.degraded
            assert not uplink.connected
            described = run.station.describe()
            assert described["cert_lifetime_used"] >= 1.0
            assert [a["type"] for a in run.station.take_alerts()] == ["cert_expired"]
            # stored all the same: scans are never refused for the uplink's sake
            scanner.scan("111122410000012345")
            assert await scanner.aread(1) == b"\x06"
        log = fleet.broker.log.read_text()
    finally:
        scanner.close()
        fleet.broker.stop()
    assert f"{SITE}/{NAME}" not in log  # no handshake with it was ever attempted
