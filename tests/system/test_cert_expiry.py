"""A station whose client certificate is at 95 % of its lifetime, on the shipped TLS
fleet broker: its status carries the expiry, its telemetry one `cert_expiring` alert,
and the dashboard shows version, expiry and the alert; `logs` through the dashboard's
audited command path returns the warning (issue #22, points 4, 5 and 6)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.central.audit import AuditLog
from agent.central.dashboard import Dashboard
from agent.station.diagnostics import agent_version
from agent.testing import Pty, free_port, running_station
from tests.support.central import authorized, desk_guard, running_dashboard
from tests.system.test_broker_acl import Fleet
from tests.system.test_central_tls import NAME, SITE, station_config

pytestmark = pytest.mark.broker


def resign(fleet: Fleet, cert_path: Path, before: datetime, after: datetime) -> None:
    """The same key and name, signed by the fleet CA with a chosen validity."""
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    new = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(fleet.ca.cert.subject)
        .public_key(old.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(old.extensions.get_extension_for_class(x509.BasicConstraints).value, True)
        .add_extension(old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value, False)
        .sign(fleet.ca.key, hashes.SHA256())
    )
    cert_path.write_bytes(new.public_bytes(serialization.Encoding.PEM))


def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers=authorized({"content-type": "application/json"})
    )
    with urllib.request.urlopen(req, timeout=20) as res:
        return json.loads(res.read())


async def test_a_certificate_at_95_percent_is_shown_and_alerted(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.broker.start()
    scanner = Pty(tmp_path / "ttyScanner")
    cfg = station_config(tmp_path, fleet, scanner)
    cert_path = tmp_path / "stations" / f"{SITE}_{NAME}" / "tls.crt"
    now = datetime.now(UTC).replace(microsecond=0)
    not_after = now + timedelta(days=1)
    resign(fleet, cert_path, now - timedelta(days=19), not_after)  # 19 of 20 days gone
    dash = Dashboard(
        "127.0.0.1",
        fleet.broker.port,
        http_port=free_port(),
        tls_context=fleet.tls(*fleet.role("dashboard")),
        guard=desk_guard(),
        audit=AuditLog(tmp_path / "audit.jsonl"),
    )
    base = f"http://127.0.0.1:{dash.http_port}"
    try:
        async with running_dashboard(dash), running_station(cfg):

            async def row() -> dict[str, Any]:
                while True:
                    view = await asyncio.to_thread(http_json, f"{base}/api/fleet")
                    rows = [r for s in view["sites"] for r in s["stations"]]
                    events = [e["type"] for st in dash.fleet.stations.values() for e in st.events]
                    if rows and rows[0]["cert_expires_at"] and "cert_expiring" in events:
                        return rows[0]
                    await asyncio.sleep(0.1)

            got = await asyncio.wait_for(row(), 20)
            assert got["madoguchi"] == agent_version()
            assert got["cert_expires_at"] == not_after.isoformat().replace("+00:00", "Z")
            assert got["cert_lifetime_used"] == pytest.approx(0.95, abs=0.01)
            assert [a["type"] for a in got["alerts"]] == ["cert_expiring"]
            await asyncio.sleep(1.2)  # two more telemetries (0.5 s): no second alert
            [station] = dash.fleet.stations.values()
            assert [e["type"] for e in station.events].count("cert_expiring") == 1

            logs = await asyncio.to_thread(
                http_json, f"{base}/api/command", {"site": SITE, "agent": NAME, "name": "logs"}
            )
            assert logs["ok"] is True
            expiring = [line for line in logs["lines"] if "is expiring" in line]
            assert len(expiring) == 1 and str(cert_path) in expiring[0]
            assert [e["command"] for e in dash.audit.tail()] == ["logs", "logs"]  # type: ignore[union-attr]
    finally:
        fleet.broker.stop()
