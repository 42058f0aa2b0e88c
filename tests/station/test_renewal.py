"""Renewal timing and an expired certificate refused by the uplink (agent/station/renewal.py,
agent/station/uplink.py); the end-to-end run is tests/system/test_cert_renewal.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import load_config
from agent.errors import UplinkError
from agent.station.diagnostics import CertWatch
from agent.station.enroll import client_identity
from agent.station.renewal import CertRenewer
from agent.station.uplink import tls_context
from tests.support.pki import TestCA, _key_pem


def station(tmp: Path, before: datetime, after: datetime) -> Path:
    ca = TestCA()
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp / "tls.key").write_bytes(_key_pem(key))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a/station-01")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(before)
        .not_valid_after(after)
        .sign(ca.key, hashes.SHA256())
    )
    (tmp / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca.write(tmp / "ca.crt")
    cfg = tmp / "agent.toml"
    cfg.write_text(f"""
[agent]
site = "site-a"
name = "station-01"
data_dir = "{tmp / "data"}"
cert_renew_at = 0.75

[mqtt]
host = "localhost"
tls_ca = "{tmp / "ca.crt"}"
tls_cert = "{tmp / "tls.crt"}"
tls_key = "{tmp / "tls.key"}"
""")
    return cfg


def test_renewal_is_due_at_cert_renew_at_of_the_lifetime(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    cfg = load_config(station(tmp_path, now - timedelta(days=5), now + timedelta(days=5)))
    t = now.timestamp()
    renewer = CertRenewer(cfg, CertWatch(cfg.mqtt.tls_cert, now=lambda: t), now=lambda: t)
    assert renewer.due_in() == pytest.approx(2.5 * 86400)  # 75 % of 10 days, from day 5
    late = t + 3 * 86400
    renewer = CertRenewer(cfg, CertWatch(cfg.mqtt.tls_cert), now=lambda: late)
    assert renewer.due_in() == 0
    assert renewer.describe()["cert_renewal"]["state"] == "idle"


def test_an_expired_certificate_is_refused_with_its_name_not_offered(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    cfg = load_config(station(tmp_path, now - timedelta(days=2), now - timedelta(minutes=1)))
    with pytest.raises(UplinkError, match=r"mqtt.tls_cert: .*tls.crt: expired on .*not used"):
        tls_context(cfg)
    fresh = load_config(station(tmp_path, now - timedelta(days=1), now + timedelta(days=1)))
    assert tls_context(fresh) is not None


def test_the_pair_that_lasts_longer_is_presented(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    cfg = load_config(station(tmp_path, now - timedelta(days=8), now + timedelta(days=2)))
    m = cfg.mqtt
    assert client_identity(m.tls_cert, m.tls_key, cfg.agent.data_dir) == (m.tls_cert, m.tls_key)
    renewed = cfg.agent.data_dir / "credentials"
    renewed.mkdir(parents=True)
    station(renewed, now - timedelta(minutes=5), now + timedelta(days=30))
    assert client_identity(m.tls_cert, m.tls_key, cfg.agent.data_dir) == (
        renewed / "tls.crt",
        renewed / "tls.key",
    )
    # a technician's fresh enroll --install (lasting longer) wins over an older renewal
    station(tmp_path, now - timedelta(minutes=5), now + timedelta(days=365))
    assert client_identity(m.tls_cert, m.tls_key, cfg.agent.data_dir) == (m.tls_cert, m.tls_key)
