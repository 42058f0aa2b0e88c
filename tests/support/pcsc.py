"""Real PC/SC for the tests: a private pcscd with vsmartcard's vpcd driver, and card
emulators speaking the vpcd socket protocol.

pcscd is started by us in the foreground (`pcscd -f -c <dir>`) with its own
reader.conf.d directory (so the vpcd ports are free ports, not the system's
35963) and its own client socket, handed over the systemd socket-activation
way (LISTEN_FDS=1, fd 3): pcscd then skips its "another pcscd is running"
check and the system socket in /run/pcscd is never touched. libpcsclite
reads `PCSCLITE_CSOCK_NAME` once per process, so one socket path serves the
whole test session; pcscd itself is started per test and can be killed and
started again behind the same listening socket, as systemd does.

vpcd protocol (vsmartcard, ifd-vpcd): the card side connects over TCP to the
reader's port; every message is a `!H` length and a payload. A 1-byte payload
is a control byte from the reader: 0 power off, 1 power on, 2 reset, 4 "send
the ATR" (answered by a frame holding the ATR). Any other payload is a C-APDU,
answered by a frame holding the R-APDU. Closing the socket removes the card.
Each vpcd reader entry gives two readers, `<name> 00 00` on port p and
`<name> 00 01` on port p + 1.

Do NOT use Debian's python3-virtualsmartcard (broken imports); this is ours.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.testing import free_port

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
JPKI_AID = bytes.fromhex("D392F000260100000001")
SUPPORT_AID = bytes.fromhex("D3921000310001010408")
JPKI_ISSUER = [
    ("C", "JP"),
    ("O", "JPKI"),
    ("OU", "JPKI for user authentication"),
    ("OU", "Japan Agency for Local Authority Information Systems"),
]
# The test resident. The leak test greps logs and the database for these.
TEST_NAME = "窓口　花子"
TEST_ADDRESS = "埼玉県戸田市上戸田一丁目１８番１号"
TEST_BIRTH = "19850412"
TEST_SEX = "2"
TEST_MY_NUMBER = "123456789018"  # valid check digit (stdnum.jp.in_)
TEST_PIN = "1234"
TEST_AUTH_PIN = "4321"  # the JPKI auth PIN (EF 0018); the leak test greps for it too


def pcscd_binary() -> str:
    if not VPCD_DRIVER.exists():
        pytest.skip("vsmartcard's vpcd is not installed: run `make setup` (apt: vsmartcard-vpcd)")
    run_dir = Path("/run/pcscd")
    if os.geteuid() != 0 and not os.access(run_dir if run_dir.exists() else "/run", os.W_OK):
        # pcscd writes /run/pcscd/pcscd.pid whatever socket it serves
        pytest.skip("pcscd needs root here (it writes /run/pcscd/pcscd.pid)")
    for c in (shutil.which("pcscd"), "/usr/sbin/pcscd"):
        if c and os.access(c, os.X_OK):
            return c
    pytest.skip("pcscd is not installed: run `make setup` (apt: pcscd vsmartcard-vpcd)")


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free (vpcd listens on all interfaces)."""
    for _ in range(200):
        p = free_port("0.0.0.0")
        if p >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", p))
                b.bind(("0.0.0.0", p + 1))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port pair")


# Socket activation the systemd way: the listening socket as fd 3, LISTEN_PID = the
# daemon's own pid (exec keeps it), LISTEN_FDS = 1.
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[2], sys.argv[2:])
"""


PCSCD_ARGS = ("-f", "-d", "-c")  # foreground, debug log (no -a: APDUs would hold PINs)


# -- the daemon ---------------------------------------------------------------------


class ClientSocket:
    """The listening socket pcscd serves (socket activation), for the whole session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.listen(64)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Pcscd:
    """A real pcscd with vpcd readers. `kill()`/`start()` again, `add_reader()` while stopped."""

    def __init__(self, client: ClientSocket, workdir: Path) -> None:
        self.client = client
        self.confdir = workdir / "reader.conf.d"
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.logfile = workdir / "pcscd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._pump: threading.Thread | None = None
        self.ports: dict[str, int] = {}

    def add_reader(self, friendly: str = "Virtual PCD") -> tuple[str, int]:
        """Write the vpcd entry (replacing any): returns (name of slot 0, its port).

        One entry per pcscd: the vpcd driver keeps its sockets per slot number, so a
        second entry would take over the first one's slots. Slot 1 is port + 1.
        """
        for old in self.confdir.glob("vpcd*"):
            old.unlink()
        self.ports.clear()
        port = free_port_pair()
        (self.confdir / "vpcd").write_text(
            f'FRIENDLYNAME "{friendly}"\n'
            f"DEVICENAME /dev/null:0x{port:04X}\n"
            f"LIBPATH {VPCD_DRIVER}\n"
            f"CHANNELID 0x{port:04X}\n"
        )
        name = f"{friendly} 00 00"
        self.ports[name] = port
        self.ports[f"{friendly} 00 01"] = port + 1
        return name, port

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self._ready.clear()
        fd = self.client.sock.fileno()
        log = self.logfile.open("ab")
        conf = str(self.confdir)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ACTIVATE, str(fd), pcscd_binary(), *PCSCD_ARGS, conf],
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._pump = threading.Thread(
            target=self._copy_log, args=(self.proc, log), name="pcscd-log"
        )
        self._pump.start()
        if not self._ready.wait(15):
            self.kill()
            pytest.fail(f"pcscd did not become ready; see {self.logfile}")

    def _copy_log(self, proc: subprocess.Popen[bytes], log: object) -> None:
        assert proc.stdout is not None
        with log:  # type: ignore[attr-defined]
            for line in proc.stdout:
                log.write(line)  # type: ignore[attr-defined]
                log.flush()  # type: ignore[attr-defined]
                if b"daemon ready" in line:
                    self._ready.set()

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=15)
        if self._pump is not None:
            self._pump.join(timeout=15)
            self._pump = None


# -- cards --------------------------------------------------------------------------

SW_OK = b"\x90\x00"
SW_NOT_FOUND = b"\x6a\x82"
SW_SECURITY = b"\x69\x82"
SW_BLOCKED = b"\x69\x83"
SW_INS = b"\x6d\x00"
SW_FUNC = b"\x6a\x81"
SW_OFFSET = b"\x6b\x00"


def atr_with_tck(body: bytes) -> bytes:
    tck = 0
    for b in body[1:]:
        tck ^= b
    return body + bytes([tck])


def storage_card_atr(ss: int, nn: int) -> bytes:
    """PC/SC part 3 ATR of a contactless storage card (FeliCa, MIFARE)."""
    hist = bytes([0x80, 0x4F, 0x0C]) + bytes.fromhex("A000000306") + bytes([ss])
    hist += nn.to_bytes(2, "big") + b"\x00\x00\x00\x00"
    return atr_with_tck(bytes([0x3B, 0x80 | len(hist), 0x80, 0x01]) + hist)


def iso14443b_atr(app_data: bytes) -> bytes:
    """PC/SC part 3 ATR of an ISO 14443-4 Type B card (the My Number card)."""
    hist = app_data[:8]
    return atr_with_tck(bytes([0x3B, 0x80 | len(hist), 0x80, 0x01]) + hist)


@dataclass
class VirtualCard:
    """A card: an ATR and an APDU handler. Keeps every C-APDU it was sent."""

    atr: bytes
    uid: bytes | None = None
    seen: list[bytes] = field(default_factory=list)
    #: close the connection (card pulled out) instead of answering this APDU
    pull_when: Callable[[bytes], bool] | None = None

    def reset(self) -> None:
        """Power on / reset: selections are lost."""

    def process(self, apdu: bytes) -> bytes:
        if apdu[:4] == b"\xff\xca\x00\x00":
            return self.uid + SW_OK if self.uid is not None else SW_FUNC
        return self.handle(apdu)

    def handle(self, apdu: bytes) -> bytes:
        return SW_INS


class FelicaBadge(VirtualCard):
    """A FeliCa staff badge: only the reader's UID pseudo-APDU (IDm) answers."""

    def __init__(self, idm: bytes) -> None:
        super().__init__(atr=storage_card_atr(0x11, 0x003B), uid=idm)


class MifareBadge(VirtualCard):
    def __init__(self, uid: bytes) -> None:
        super().__init__(atr=storage_card_atr(0x03, 0x0001), uid=uid)


@dataclass
class Ef:
    data: bytes
    needs_pin: bool = False


class IsoCard(VirtualCard):
    """An ISO 7816-4 card with applications (by AID) holding elementary files."""

    def __init__(self, atr: bytes, uid: bytes | None, apps: dict[bytes, dict[int, Ef]]) -> None:
        super().__init__(atr=atr, uid=uid)
        self.apps = apps
        self.app: bytes | None = None
        self.ef: int | None = None
        self.verified: set[bytes] = set()
        self.pins: dict[tuple[bytes, int], str] = {}
        self.tries: dict[tuple[bytes, int], int] = {}
        self.reads: list[tuple[bytes | None, int | None, int, int]] = []
        self.verify_count = 0  # VERIFY with data (spends a try), not counter queries
        self.forgot_pin = threading.Event()  # a reset dropped an accepted PIN

    def reset(self) -> None:
        if self.verified:
            self.forgot_pin.set()
        self.app = None
        self.ef = None
        self.verified.clear()

    def handle(self, apdu: bytes) -> bytes:
        cla, ins, p1, p2 = apdu[:4]
        body = apdu[4:]
        if cla != 0x00:
            return b"\x6e\x00"
        if ins == 0xA4:
            return self._select(p1, body)
        if ins == 0xB0:
            return self._read(p1, p2, body)
        if ins == 0x20:
            return self._verify(body)
        return SW_INS

    def _select(self, p1: int, body: bytes) -> bytes:
        if not body or len(body) < 1 + body[0]:
            return b"\x67\x00"
        ident = body[1 : 1 + body[0]]
        if p1 == 0x04:
            if ident not in self.apps:
                return SW_NOT_FOUND
            self.app, self.ef = ident, None
            return SW_OK
        if p1 == 0x02 and len(ident) == 2:
            fid = int.from_bytes(ident, "big")
            if self.app is None or (
                fid not in self.apps[self.app] and (self.app, fid) not in self.pins
            ):
                return SW_NOT_FOUND
            self.ef = fid
            return SW_OK
        return SW_NOT_FOUND

    def _read(self, p1: int, p2: int, body: bytes) -> bytes:
        if self.app is None or self.ef is None or self.ef not in self.apps[self.app]:
            return b"\x69\x86"  # no current EF
        ef = self.apps[self.app][self.ef]
        if ef.needs_pin and self.app not in self.verified:
            return SW_SECURITY
        offset = (p1 << 8) | p2
        le = body[0] if body else 0
        le = 256 if le == 0 else le
        self.reads.append((self.app, self.ef, offset, le))
        if offset >= len(ef.data):
            return SW_OFFSET
        return ef.data[offset : offset + le] + SW_OK

    def _verify(self, body: bytes) -> bytes:
        key = (self.app or b"", self.ef or 0)
        if key not in self.pins:
            return SW_NOT_FOUND
        tries = self.tries[key]
        if not body:  # retry counter query: spends nothing
            if tries == 0:
                return SW_BLOCKED
            return bytes([0x63, 0xC0 | tries])
        self.verify_count += 1
        if tries == 0:
            return SW_BLOCKED
        pin = body[1 : 1 + body[0]].decode("ascii", "replace")
        if pin == self.pins[key]:
            self.tries[key] = 3
            self.verified.add(key[0])
            return SW_OK
        self.tries[key] = tries - 1
        return bytes([0x63, 0xC0 | (tries - 1)])


@dataclass(frozen=True)
class TestCa:
    key: object
    cert: object


_CA: TestCa | None = None


def test_ca() -> TestCa:
    """A test JPKI-like CA (RSA 2048, like the real one), made once per session."""
    global _CA
    if _CA is None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        oid = {"C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME}
        name = x509.Name(
            [
                x509.NameAttribute(oid.get(k, NameOID.ORGANIZATIONAL_UNIT_NAME), v)
                for k, v in JPKI_ISSUER
            ]
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - dt.timedelta(days=3650))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        _CA = TestCa(key, cert)
    return _CA


def make_ca(*, forged: bool = False) -> TestCa:
    """The test anchor (`test_ca()`), or with `forged` a self-made CA with the same DN."""
    if not forged:
        return test_ca()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa

    real = test_ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(real.cert.subject)  # type: ignore[attr-defined]
        .issuer_name(real.cert.subject)  # type: ignore[attr-defined]
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=3650))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TestCa(key, cert)


def anchor_fingerprint(ca: TestCa | None = None) -> str:
    """SHA-256 of the test anchor's DER: what a test config puts in `jpki_anchors`."""
    from cryptography.hazmat.primitives import hashes

    return bytes((ca or test_ca()).cert.fingerprint(hashes.SHA256())).hex()  # type: ignore[attr-defined]


def ca_der(ca: TestCa) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(ca.cert.public_bytes(serialization.Encoding.DER))  # type: ignore[attr-defined]


def holder_key(kind: str = "rsa") -> object:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def auth_certificate(
    serial: int,
    *,
    expired: bool = False,
    key: object | None = None,
    ca: TestCa | None = None,
) -> bytes:
    """A user-authentication certificate (DER) for `key`, issued by `ca` (the test anchor)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    ca = ca or test_ca()
    holder = key if key is not None else holder_key()
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(days=(6 * 365 if expired else 30))
    end = now - dt.timedelta(days=30) if expired else now + dt.timedelta(days=5 * 365)
    usage = dict.fromkeys(
        [
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ],
        False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "JP")]))
        .issuer_name(ca.cert.subject)  # type: ignore[attr-defined]
        .public_key(holder.public_key())  # type: ignore[attr-defined]
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.KeyUsage(digital_signature=True, **usage), critical=True)
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.DER)


def ber_tlv(tag: bytes, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return tag + length + value


def four_attributes(name: str, address: str, birth: str, sex: str) -> bytes:
    """EF 0002 of the 入力補助AP: FF 20 { DF 21 header, DF 22 .. DF 25 }."""
    inner = ber_tlv(b"\xdf\x21", bytes.fromhex("0000000000000000"))
    inner += ber_tlv(b"\xdf\x22", name.encode())
    inner += ber_tlv(b"\xdf\x23", address.encode())
    inner += ber_tlv(b"\xdf\x24", birth.encode())
    inner += ber_tlv(b"\xdf\x25", sex.encode())
    return ber_tlv(b"\xff\x20", inner) + b"\xff" * 8  # files are padded


class MyNumberCard(IsoCard):
    """A My Number card: JPKI AP (token, user-auth cert, signature cert behind its
    PIN) and the 券面事項入力補助AP (4-digit PIN, My Number, 4 attributes)."""

    def __init__(
        self,
        *,
        serial: int = 0x1A2B3C4D5E,
        expired: bool = False,
        tries: int = 3,
        pin: str = TEST_PIN,
        uid: bytes = bytes.fromhex("8a6b1c2d"),
        name: str = TEST_NAME,
        my_number: str = TEST_MY_NUMBER,
        key: str = "rsa",
        forged: bool = False,
        wrong_key: bool = False,
        auth_tries: int = 3,
        auth_pin: str = TEST_AUTH_PIN,
    ) -> None:
        self.auth_key: Any = holder_key(key)
        self.ca = make_ca(forged=forged)
        self.cert = auth_certificate(serial, expired=expired, key=self.auth_key, ca=self.ca)
        if wrong_key:  # the chip holds another key than the certificate says
            self.auth_key = holder_key(key)
        self.signed: list[bytes] = []  # what the card was asked to sign
        jpki = {
            0x0006: Ef(b"JPKIAPICCTOKEN2".ljust(32, b" ")),
            0x000A: Ef(self.cert + b"\xff" * 64),
            0x000B: Ef(ca_der(self.ca) + b"\xff" * 32),
            0x0017: Ef(b"", needs_pin=True),  # the auth private key: select only, never read
            0x0001: Ef(b"\x30\x82\x00\x10" + b"\x00" * 16, needs_pin=True),  # signature
        }
        support = {
            0x0001: Ef(b"\xff\x10\x0c" + my_number.encode() + b"\xff\xff", needs_pin=True),
            0x0002: Ef(four_attributes(name, TEST_ADDRESS, TEST_BIRTH, TEST_SEX), needs_pin=True),
        }
        super().__init__(
            atr=iso14443b_atr(bytes.fromhex("0000000000000000")),
            uid=uid,
            apps={JPKI_AID: jpki, SUPPORT_AID: support},
        )
        self.pins[(SUPPORT_AID, 0x0011)] = pin
        self.tries[(SUPPORT_AID, 0x0011)] = tries
        self.pins[(JPKI_AID, 0x0018)] = auth_pin
        self.tries[(JPKI_AID, 0x0018)] = auth_tries

    @property
    def auth_tries(self) -> int:
        return self.tries[(JPKI_AID, 0x0018)]

    def handle(self, apdu: bytes) -> bytes:
        if apdu[:4] == bytes.fromhex("802A0080"):
            return self._sign(apdu[5 : 5 + apdu[4]] if len(apdu) > 5 else b"")
        return super().handle(apdu)

    def _sign(self, data: bytes) -> bytes:
        """JPKI COMPUTE DIGITAL SIGNATURE on the auth key (EF 0017), after the auth PIN."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        if self.app != JPKI_AID or self.ef != 0x0017:
            return b"\x69\x86"
        if JPKI_AID not in self.verified:
            return SW_SECURITY
        self.signed.append(data)
        if isinstance(self.auth_key, ec.EllipticCurvePrivateKey):
            if len(data) != 48:
                return b"\x67\x00"
            der = self.auth_key.sign(data, ec.ECDSA(utils.Prehashed(hashes.SHA384())))
            r, s = utils.decode_dss_signature(der)
            return r.to_bytes(48, "big") + s.to_bytes(48, "big") + SW_OK
        prefix = bytes.fromhex("3031300d060960864801650304020105000420")
        if len(data) != 51 or not data.startswith(prefix):
            return b"\x6a\x80"
        sig = self.auth_key.sign(data[19:], padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return bytes(sig) + SW_OK

    @property
    def support_tries(self) -> int:
        return self.tries[(SUPPORT_AID, 0x0011)]

    def signature_cert_touched(self) -> bool:
        """Was the signature certificate (JPKI EF 0001) ever selected?"""
        app = None
        for a in self.seen:
            if a[:4] == bytes.fromhex("00A4040C"):
                app = a[5:]
            elif app == JPKI_AID and a[:7] == bytes.fromhex("00A4020C020001"):
                return True
        return False


class UnknownIsoCard(IsoCard):
    """An ISO 14443 card (a bank or a future card) that answers none of the known AIDs."""

    def __init__(self, uid: bytes = bytes.fromhex("0badcafe")) -> None:
        super().__init__(
            atr=iso14443b_atr(bytes.fromhex("0000000000000000")),
            uid=uid,
            apps={bytes.fromhex("A0000000041010"): {0x0001: Ef(b"\x00" * 16)}},
        )


class JukiCard(IsoCard):
    """The old 住基カード: a JPKI AP whose token is `JPKIAPICCTOKEN`."""

    def __init__(self, uid: bytes = bytes.fromhex("51aa0033")) -> None:
        super().__init__(
            atr=iso14443b_atr(bytes.fromhex("0000000000000000")),
            uid=uid,
            apps={JPKI_AID: {0x0006: Ef(b"JPKIAPICCTOKEN".ljust(32, b" "))}},
        )


# -- the card side of one vpcd reader -----------------------------------------------


class CardSlot:
    """Puts a `VirtualCard` into a vpcd reader (connect) and pulls it out (close)."""

    def __init__(self, port: int, reader: str) -> None:
        self.port = port
        self.reader = reader
        self.card: VirtualCard | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def insert(self, card: VirtualCard, *, wait: bool = False) -> None:
        """Put `card` in (after pulling any card out); `wait` until pcscd sees it."""
        self.remove()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self.card, self._sock = card, sock
        self._thread = threading.Thread(
            target=self._serve, args=(sock, card), name=f"vicc:{self.port}"
        )
        self._thread.start()
        if wait:
            wait_reader_state(self.reader, present=True)

    def remove(self, *, wait: bool = True) -> None:
        """Pull the card out; by default wait until pcscd has seen the reader empty
        (a real hand takes longer than pcscd's presence poll; a socket does not)."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            if wait:
                wait_reader_state(self.reader, present=False)

    def _serve(self, sock: socket.socket, card: VirtualCard) -> None:
        try:
            while True:
                head = _recv_exact(sock, 2)
                if head is None:
                    return
                (n,) = struct.unpack("!H", head)
                msg = _recv_exact(sock, n)
                if msg is None:
                    return
                if n == 1:
                    ctrl = msg[0]
                    if ctrl in (1, 2):
                        card.reset()
                    elif ctrl == 4:
                        sock.sendall(struct.pack("!H", len(card.atr)) + card.atr)
                    continue
                card.seen.append(msg)
                if card.pull_when is not None and card.pull_when(msg):
                    with self._lock:
                        if self._sock is sock:
                            self._sock = None
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                    return
                reply = card.process(msg)
                sock.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return


def wait_reader_state(reader: str, *, present: bool, timeout_s: float = 10.0) -> None:
    """Block on SCardGetStatusChange until pcscd reports the reader empty or holding a card."""
    from smartcard import scard as sc

    hr, ctx = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
    if hr != 0:
        return  # pcscd is down: nothing to wait for
    try:
        state = sc.SCARD_STATE_UNAWARE
        want = sc.SCARD_STATE_PRESENT if present else sc.SCARD_STATE_EMPTY
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            left = max(1, int((deadline - time.monotonic()) * 1000))
            hr, new = sc.SCardGetStatusChange(ctx, left, [(reader, state)])
            if hr != 0:
                break
            state = new[0][1] & ~sc.SCARD_STATE_CHANGED
            if state & want:
                return
        raise AssertionError(f"{reader}: pcscd never saw the card {'in' if present else 'out'}")
    finally:
        sc.SCardReleaseContext(ctx)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
        # vpcd writes the length and the payload separately without TCP_NODELAY: ACK at
        # once (Linux re-arms delayed ACKs, so after every read) or each APDU waits ~40 ms
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    return buf


@dataclass
class PcscStack:
    """What a test gets: the daemon, the name of the first reader, and its card slot."""

    pcscd: Pcscd
    reader: str
    slot: CardSlot
    slots: list[CardSlot]


_CLIENT: ClientSocket | None = None


def client_socket() -> ClientSocket:
    """The one pcscd client socket of this test process (libpcsclite caches the path)."""
    global _CLIENT
    if _CLIENT is None:
        import atexit
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="madoguchi-pcsc-"))
        _CLIENT = ClientSocket(base / "pcscd.comm")
        os.environ["PCSCLITE_CSOCK_NAME"] = str(_CLIENT.path)
        atexit.register(lambda: shutil.rmtree(base, ignore_errors=True))
    return _CLIENT


@contextlib.contextmanager
def pcsc_stack(workdir: Path, *, reader: bool = True) -> Iterator[PcscStack]:
    """A fresh pcscd with one vpcd entry (two readers) or none; stopped afterwards."""
    pcscd = Pcscd(client_socket(), workdir)
    slots: list[CardSlot] = []
    name = ""
    if reader:
        name, port = pcscd.add_reader()
        slots = [CardSlot(port, name), CardSlot(port + 1, name[:-5] + "00 01")]
    pcscd.start()
    try:
        yield PcscStack(pcscd, name, slots[0] if slots else None, slots)  # type: ignore[arg-type]
    finally:
        for s in slots:
            s.remove(wait=False)
        pcscd.stop()
