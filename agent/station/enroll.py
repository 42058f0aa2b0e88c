"""Enrolment: the station's own TLS identity for the broker.

`madoguchi enroll --site S --name N --out DIR` makes an EC P-256 private key
on the Pi (mode 0600; it never leaves the station) and a certificate signing
request whose CN is `S/N`. The broker takes the CN as the MQTT user name
(`use_identity_as_username`), and its ACL lets that user publish and read only
below `madoguchi/v1/S/N/`, so a station can only ever speak for itself.

`madoguchi enroll --install CERT --out DIR` checks that the certificate the CA
returned belongs to that key before installing it, so a mixed-up certificate
is caught on the Pi and not by a broker refusing every connection later.
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import NAME_PATTERN
from agent.contract.topics import REGISTRY_SITE
from agent.errors import EnrollError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

# cryptography is imported where it is used: `madoguchi run` builds this command's
# parser too, and should not carry ~6 MB of RSS it never needs.

DEFAULT_DIR = Path("/etc/madoguchi/credentials")
KEY_FILE = "tls.key"
CSR_FILE = "tls.csr"
CERT_FILE = "tls.crt"


def station_cn(site: str, name: str) -> str:
    for what, value in (("--site", site), ("--name", name)):
        if not re.fullmatch(NAME_PATTERN, value):
            raise EnrollError(f"{what} {value!r}: only a-z, 0-9, '-' and '_' (it is a topic level)")
    if site == REGISTRY_SITE:  # its certificate could write the registry's status (the ACL)
        raise EnrollError(f"--site {site!r}: reserved for the registry's own topics")
    return f"{site}/{name}"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a sibling temp file with its final mode, then rename: never a half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise EnrollError(
            f"{path}: no private key (run `madoguchi enroll --site --name`)"
        ) from None
    except PermissionError:
        raise EnrollError(f"{path}: not readable (run as root)") from None
    except ValueError as e:
        raise EnrollError(f"{path}: not a PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EnrollError(f"{path}: not an EC key")
    return key


def make_key_and_csr(site: str, name: str, out: Path) -> tuple[Path, Path, bool]:
    """Key (kept if already there) and a fresh CSR. Returns (key, csr, key_was_new)."""
    cn = station_cn(site, name)
    try:
        return _make_key_and_csr(cn, out)
    except OSError as e:
        raise EnrollError(f"{e.filename or out}: {e.strerror}") from None


def _make_key_and_csr(cn: str, out: Path) -> tuple[Path, Path, bool]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = out / KEY_FILE
    new = not key_path.exists()
    if new:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomic(key_path, pem, 0o600)
    else:
        key = _load_key(key_path)
        os.chmod(key_path, 0o600)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    csr_path = out / CSR_FILE
    _write_atomic(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    return key_path, csr_path, new


def install_cert(cert_file: Path, out: Path, now: datetime | None = None) -> tuple[Path, str]:
    """Check the certificate against the station's key, then install it. Returns (path, CN)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        data = cert_file.read_bytes()
    except OSError as e:
        raise EnrollError(f"{cert_file}: {e.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise EnrollError(f"{cert_file}: not a PEM certificate: {e}") from None
    cert = chain[0]
    key = _load_key(out / KEY_FILE)
    if cert.public_key() != key.public_key():
        raise EnrollError(
            f"{cert_file}: does not match the private key {out / KEY_FILE} "
            "(a certificate for another station or another key?)"
        )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    now = now or datetime.now(UTC)
    if cert.not_valid_after_utc <= now:
        raise EnrollError(f"{cert_file}: expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    dest = out / CERT_FILE
    try:
        _write_atomic(dest, data, 0o644)
    except OSError as e:
        raise EnrollError(f"{e.filename or dest}: {e.strerror}") from None
    return dest, cn


def install_renewed(staging: Path, key_dest: Path, cert_dest: Path, cn: str) -> None:
    """Certificate renewal (agent/station/renewal.py): the signed certificate in
    `staging` was checked against the staging key by `install_cert`; check its CN, then
    put key and certificate where the configuration names them (key first: the uplink
    reads both at its next connect)."""
    got_cn = install_cert(staging / "signed.crt", staging)[1]
    if got_cn != cn:
        raise EnrollError(f"{staging / 'signed.crt'}: CN {got_cn!r} is not this station ({cn})")
    try:
        _write_atomic(key_dest, (staging / KEY_FILE).read_bytes(), 0o600)
        _write_atomic(cert_dest, (staging / CERT_FILE).read_bytes(), 0o644)
        for name in (KEY_FILE, CSR_FILE, CERT_FILE, "signed.crt"):
            with contextlib.suppress(FileNotFoundError):
                (staging / name).unlink()
    except OSError as e:
        raise EnrollError(f"{e.filename or cert_dest}: {e.strerror}") from None


#: where certificate renewal installs the new pair, under [agent] data_dir: the shipped
#: unit hands the configured pair in read-only (LoadCredential=), the state directory
#: is the agent's own and survives restarts
RENEWED_DIR = "credentials"


def _not_after(path: Path) -> float | None:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None


def client_identity(
    cert: Path | None, key: Path | None, data_dir: Path
) -> tuple[Path | None, Path | None]:
    """The certificate and key the uplink presents: the configured pair, or the pair
    renewal installed in `<data_dir>/credentials/` when that one lasts longer (so a
    technician's fresh `enroll --install` still wins over an older renewal)."""
    if cert is None or key is None:
        return cert, key
    renewed_cert = data_dir / RENEWED_DIR / CERT_FILE
    renewed_key = data_dir / RENEWED_DIR / KEY_FILE
    if not (renewed_cert.exists() and renewed_key.exists()):
        return cert, key
    theirs = _not_after(renewed_cert)
    if theirs is not None and theirs > (_not_after(cert) or float("-inf")):
        return renewed_cert, renewed_key
    return cert, key
