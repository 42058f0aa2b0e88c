"""`madoguchi enroll`: key and CSR on the Pi, certificate checked against the key."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.cli.main import main as cli
from agent.errors import EnrollError
from agent.station.enroll import install_cert
from tests.support.pki import TestCA


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def enroll(out: Path, site: str = "toda-city-hall-1f", name: str = "station-03") -> int:
    return cli(["enroll", "--site", site, "--name", name, "--out", str(out)])


def test_key_stays_private_and_csr_names_the_station(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    assert enroll(out) == 0
    key = serialization.load_pem_private_key((out / "tls.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert mode(out / "tls.key") == 0o600
    assert mode(out) == 0o700
    csr = x509.load_pem_x509_csr((out / "tls.csr").read_bytes())
    assert csr.is_signature_valid
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["toda-city-hall-1f/station-03"]
    assert csr.public_key() == key.public_key()
    assert b"PRIVATE" not in (out / "tls.csr").read_bytes()


def test_running_again_keeps_the_key(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    assert enroll(out) == 0
    first = (out / "tls.key").read_bytes()
    (out / "tls.key").chmod(0o644)  # someone loosened it
    assert enroll(out) == 0
    assert (out / "tls.key").read_bytes() == first
    assert mode(out / "tls.key") == 0o600


@pytest.mark.parametrize(
    ("site", "name"), [("Toda", "s1"), ("toda", "a/b"), ("toda", "#"), ("", "x")]
)
def test_names_that_are_not_one_topic_level_are_refused(
    tmp_path: Path, site: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "creds"
    assert enroll(out, site, name) != 0
    assert not (out / "tls.key").exists()


def test_install_checks_the_certificate_against_the_key(tmp_path: Path) -> None:
    ca = TestCA()
    out = tmp_path / "creds"
    assert enroll(out) == 0
    signed = ca.sign_csr(out / "tls.csr", tmp_path / "from-ca.crt")
    assert cli(["enroll", "--install", str(signed), "--out", str(out)]) == 0
    assert (out / "tls.crt").read_bytes() == signed.read_bytes()
    assert mode(out / "tls.crt") == 0o644


def test_certificate_for_another_key_is_not_installed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = TestCA()
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert enroll(mine) == 0
    assert enroll(other) == 0
    wrong = ca.sign_csr(other / "tls.csr", tmp_path / "other.crt")
    assert cli(["enroll", "--install", str(wrong), "--out", str(mine)]) == 1
    assert "does not match the private key" in capsys.readouterr().err
    assert not (mine / "tls.crt").exists()


def test_expired_certificate_is_not_installed(tmp_path: Path) -> None:
    ca = TestCA()
    out = tmp_path / "creds"
    assert enroll(out) == 0
    signed = ca.sign_csr(out / "tls.csr", tmp_path / "from-ca.crt")
    later = datetime.now(UTC) + timedelta(days=30)
    with pytest.raises(EnrollError, match="expired"):
        install_cert(signed, out, now=later)
    assert not (out / "tls.crt").exists()


def test_install_without_a_key_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = TestCA()
    cert, _ = ca.identity("x/y", tmp_path / "elsewhere")
    assert cli(["enroll", "--install", str(cert), "--out", str(tmp_path / "empty")]) == 1
    assert "no private key" in capsys.readouterr().err


def test_unwritable_directory_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert enroll(blocker / "creds") == 1
    err = capsys.readouterr().err
    assert err.startswith("madoguchi enroll: ")
    assert "not-a-dir" in err


def test_the_registry_s_site_level_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "creds"
    assert enroll(out, "_registry", "station-01") != 0
    assert "reserved for the registry" in capsys.readouterr().err
    assert not (out / "tls.key").exists()
