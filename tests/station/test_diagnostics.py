"""The Pi part of diagnostics, the log ring's bounds and the certificate's age
(issue #22, points 4 and 5)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.station import diagnostics, logring
from agent.station.diagnostics import CertWatch, parse_throttled, parse_vcgencmd_temp, thermal
from tests.support.pki import TestCA


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=60))
def test_vcgencmd_parsers_never_raise(text: str) -> None:
    t = parse_vcgencmd_temp(text)
    assert t is None or isinstance(t, float)
    got = parse_throttled(text)
    assert got is None or set(got) == {"raw", "flags"}


def test_throttled_bits_are_named() -> None:
    assert parse_throttled("throttled=0x50005") == {
        "raw": "0x50005",
        "flags": ["under_voltage", "throttled", "under_voltage_occurred", "throttling_occurred"],
    }
    assert parse_vcgencmd_temp("temp=48.3'C") == 48.3


def test_thermal_prefers_vcgencmd_then_sysfs_then_says_not_available(tmp_path: Path) -> None:
    answers = {"measure_temp": "temp=61.2'C", "get_throttled": "throttled=0x0"}
    vc = thermal(run=lambda cmd: answers[cmd], root=tmp_path)
    assert vc == {
        "source": "vcgencmd",
        "temperature_c": 61.2,
        "throttled": {"raw": "0x0", "flags": []},
    }
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "temp").write_text("47125\n")
    sysfs = thermal(run=lambda cmd: None, root=tmp_path)
    assert sysfs["temperature_c"] == 47.125 and sysfs["throttled"] == "not available"
    (zone / "temp").write_bytes(b"\xff\x00garbage")  # a hostile or broken zone
    none = thermal(run=lambda cmd: None, root=tmp_path / "nowhere")
    assert none == {k: "not available" for k in ("source", "temperature_c", "throttled")}
    assert thermal(run=lambda cmd: None, root=tmp_path)["source"] == "not available"


def test_disk_of_a_missing_dir_names_it(tmp_path: Path) -> None:
    got = diagnostics.disk(tmp_path / "gone")
    assert str(tmp_path / "gone") in got["error"]
    assert diagnostics.disk(tmp_path)["free_bytes"] > 0


def cert_with(tmp_path: Path, before: datetime, after: datetime) -> Path:
    ca = TestCA()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "station-03")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .sign(ca.key, hashes.SHA256())
    )
    path = tmp_path / "tls.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_certificate_at_95_percent_alerts_once_then_again_when_expired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    path = cert_with(tmp_path, now - timedelta(days=95), now + timedelta(days=5))
    clock = [now.timestamp()]
    watch = CertWatch(path, now=lambda: clock[0])
    with caplog.at_level(logging.WARNING, "agent.station.diagnostics"):
        status = watch.describe()
        assert status["cert_lifetime_used"] == pytest.approx(0.95, abs=1e-3)
        assert status["cert_expires_at"] == (now + timedelta(days=5)).isoformat().replace(
            "+00:00", "Z"
        )
        [alert] = watch.take_alerts()
        assert alert["type"] == "cert_expiring"
        for _ in range(5):  # every telemetry looks; nothing new is said
            watch.describe()
            assert watch.take_alerts() == []
        clock[0] += 6 * 86400
        assert [a["type"] for a in watch.take_alerts()] == ["cert_expired"]
        assert watch.take_alerts() == []
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "is expiring" in said[0] and "has expired" in said[1]


def test_a_young_certificate_is_quiet_and_a_broken_one_is_reported(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    young = CertWatch(cert_with(tmp_path, now - timedelta(days=1), now + timedelta(days=99)))
    assert young.describe()["cert_lifetime_used"] < 0.1 and young.take_alerts() == []
    bad = tmp_path / "broken.crt"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\n\x00\xff\n-----END CERTIFICATE-----\n")
    broken = CertWatch(bad)
    assert broken.describe() == {"cert_expires_at": None, "cert_lifetime_used": None}
    [alert] = broken.take_alerts()
    assert alert["type"] == "cert_unreadable"
    assert CertWatch(None).describe() == {} and CertWatch(None).take_alerts() == []
    assert CertWatch(tmp_path / "missing.crt").take_alerts()[0]["type"] == "cert_unreadable"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=3000), max_size=40), st.integers(-5, 600))
def test_the_ring_never_answers_more_than_its_bounds(lines: list[str], n: int) -> None:
    ring = logring.LogRing(max_lines=20, max_line_chars=500, max_chars=3000)
    ring.setFormatter(logging.Formatter("%(message)s"))
    for text in lines:
        ring.emit(logging.makeLogRecord({"msg": text, "levelno": logging.WARNING}))
    got, cut = ring.tail(n, max_bytes=4096)
    assert len(got) <= min(max(n, 0), 20)
    kept, _ = ring.tail(20, max_bytes=10**9)
    assert sum(map(len, kept)) <= 3000 and ring.dropped == len(lines) - len(kept)
    assert sum(len(x.encode("utf-8", "replace")) + 1 for x in got) <= 4096
    assert all(len(x) <= 500 + len(" …[cut]") for x in got)
    if not cut and n > 0:
        assert len(got) == min(n, len(kept))


def test_a_renewed_certificate_is_read_again(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    path = cert_with(tmp_path, now - timedelta(days=95), now + timedelta(days=5))
    watch = CertWatch(path)
    assert [a["type"] for a in watch.take_alerts()] == ["cert_expiring"]
    (tmp_path / "new").mkdir()
    fresh = cert_with(tmp_path / "new", now - timedelta(days=1), now + timedelta(days=99))
    fresh.replace(path)  # as enroll --install renews it in place
    assert watch.describe()["cert_lifetime_used"] < 0.1
    assert watch.take_alerts() == []


def test_disk_of_a_full_filesystem(tmp_path: Path) -> None:
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(OSError), open(mnt / "fill", "wb") as f:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        got = diagnostics.disk(mnt)
        assert got["free_bytes"] == 0 and got["total_bytes"] == 256 * 1024
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
