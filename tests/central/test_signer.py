"""`fleet ca-serve`'s decisions without a broker: allowlist, CN = the topic's station,
a valid CSR signed as a client certificate by the fleet CA (agent/central/signer.py)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.central.signer import CsrSigner
from agent.station.enroll import make_key_and_csr
from tests.support.pki import TestCA


def signer(tmp: Path, allowed: str) -> tuple[CsrSigner, TestCA]:
    ca = TestCA()
    key = tmp / "ca.key"
    key.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp / "allow.txt").write_text(allowed)
    s = CsrSigner(
        "127.0.0.1", 1, ca_cert=ca.write(tmp / "ca.crt"), ca_key=key, allow=tmp / "allow.txt"
    )
    return s, ca


def csr(tmp: Path, site: str, name: str) -> str:
    return make_key_and_csr(site, name, tmp / f"{site}_{name}")[1].read_text()


def ask(s: CsrSigner, site: str, agent: str, pem: str) -> dict[str, object]:
    return s.answer(site, agent, json.dumps({"request_id": "r", "csr": pem}))


def test_a_valid_csr_from_an_allowlisted_station_is_signed(tmp_path: Path) -> None:
    s, ca = signer(tmp_path, "# stations\nsite-a/station-01  # counter 1\n")
    got = ask(s, "site-a", "station-01", csr(tmp_path, "site-a", "station-01"))
    assert got["ok"] is True and got["request_id"] == "r"
    assert isinstance(got["cert"], str)
    cert = x509.load_pem_x509_certificate(got["cert"].encode())
    assert cert.subject.rfc4514_string() == "CN=site-a/station-01"
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_csr_for_another_station_or_off_the_allowlist_is_refused(tmp_path: Path) -> None:
    s, _ = signer(tmp_path, "site-a/station-01\nsite-a/station-02\n")
    # station-02's certificate publishing a CSR for station-01: the topic names station-02
    other = ask(s, "site-a", "station-02", csr(tmp_path, "site-a", "station-01"))
    assert other["ok"] is False
    assert "is not CN=site-a/station-02 (the topic's station)" in str(other["error"])
    off = ask(s, "site-b", "station-09", csr(tmp_path, "site-b", "station-09"))
    assert off == {
        "request_id": "r",
        "ok": False,
        "error": "site-b/station-09 is not on the signer's allowlist",
    }
    junk = s.answer("site-a", "station-01", b'{"csr": "not a csr"}')
    assert junk["ok"] is False and "not a PEM CSR" in str(junk["error"])
    assert s.answer("site-a", "station-01", b"[1]")["ok"] is False
