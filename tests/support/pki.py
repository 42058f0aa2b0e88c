"""A test certificate authority made with `cryptography`, the way a fleet CA would sign."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """Self-signed root; signs CSRs (stations) and keys it makes itself (broker, roles)."""

    __test__ = False

    def __init__(self, cn: str = "madoguchi test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem())
        return path

    def issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        *,
        server: bool = False,
        days: int = 7,
    ) -> bytes:
        now = datetime.now(UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def sign_csr(self, csr_path: Path, out: Path, days: int = 7) -> Path:
        """What the fleet CA does with a station's CSR."""
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
        assert csr.is_signature_valid
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        out.write_bytes(self.issue(csr.subject, key, days=days))
        return out

    def identity(self, cn: str, directory: Path, *, server: bool = False) -> tuple[Path, Path]:
        """A key and certificate for the broker or a role (registry, dashboard)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        safe = cn.replace("/", "_")
        key_path = directory / f"{safe}.key"
        cert_path = directory / f"{safe}.crt"
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        cert_path.write_bytes(self.issue(_name(cn), key.public_key(), server=server))
        return cert_path, key_path
