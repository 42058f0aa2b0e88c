"""The fleet CA's signer for certificate renewal (`madoguchi fleet ca-serve`, issue #22).

It subscribes to every station's `csr` topic and answers on that station's
`csr/signed`. The broker's ACL lets only a station's own certificate write its `csr`
topic, so the topic names who is asking; the signer then signs only when

- the station (`site/name`) is on the allowlist (one a line, `#` comments; read again
  at each request, so an edit needs no restart),
- the CSR's signature is valid, its key is EC, and its subject is exactly CN=site/name,

and issues a client certificate (clientAuth, not a CA) valid for `days`. Every answer is
one audit line (who: ca-serve, command: sign-csr, outcome signed / refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt

from agent._aio import Backoff
from agent.central.audit import AuditLog
from agent.contract.topics import DEFAULT_PREFIX, Topics
from agent.errors import RenewError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

MAX_CSR_CHARS = 8192


def read_allowlist(path: Path) -> set[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise RenewError(f"{path}: --allow: {e.strerror}") from e
    return {s for line in lines if (s := line.split("#", 1)[0].strip())}


class CsrSigner:
    """Answers CSRs on the fleet broker until `stop` (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_cert: Path,
        ca_key: Path,
        allow: Path,
        days: float = 30.0,
        topic_prefix: str = DEFAULT_PREFIX,
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.ca_cert_path, self.ca_key_path, self.allow = ca_cert, ca_key, allow
        self.days = days
        self.topics = Topics(topic_prefix)
        self.tls_context = tls_context
        self.username, self.password = username, password
        self.audit = audit
        self.signed = 0
        self.refused = 0
        self.ready = asyncio.Event()  # subscribed
        self._ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    def load_ca(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        except (OSError, ValueError) as e:
            raise RenewError(f"{self.ca_cert_path}: --ca-cert: cannot load: {e}") from e
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
        except (OSError, ValueError, TypeError) as e:
            raise RenewError(f"{self.ca_key_path}: --ca-key: cannot load: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise RenewError(f"{self.ca_key_path}: --ca-key: not an EC key")
        if key.public_key() != cert.public_key():
            raise RenewError(f"{self.ca_key_path}: --ca-key: not the key of {self.ca_cert_path}")
        self._ca = (cert, key)

    def answer(self, site: str, agent: str, payload: Any) -> dict[str, Any]:
        """The `csr/signed` body for one request: the certificate, or why not."""
        rid = None
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            rid = body.get("request_id")
            csr = body.get("csr")
            if not isinstance(csr, str) or len(csr) > MAX_CSR_CHARS:
                raise ValueError("csr must be a PEM string")
            cert = self.sign(site, agent, csr)
        except (ValueError, TypeError, RenewError) as e:
            return {"request_id": rid, "ok": False, "error": str(e)[:300]}
        return {"request_id": rid, "ok": True, "cert": cert}

    def sign(self, site: str, agent: str, csr_pem: str) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        station = f"{site}/{agent}"
        if station not in read_allowlist(self.allow):
            raise RenewError(f"{station} is not on the signer's allowlist")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as e:
            raise RenewError(f"not a PEM CSR: {e}") from e
        if not csr.is_signature_valid:
            raise RenewError("the CSR's signature is not valid")
        cns = [str(a.value) for a in csr.subject]
        want = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, station)])
        if csr.subject != want:
            raise RenewError(f"the CSR's subject {cns} is not CN={station} (the topic's station)")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise RenewError("the CSR's key is not an EC key")
        if self._ca is None:
            self.load_ca()
        assert self._ca is not None
        ca_cert, ca_key = self._ca
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(want)
            .issuer_name(ca_cert.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        log.info("signed a certificate for %s, serial %x", station, cert.serial_number)
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    async def run(self, stop: asyncio.Event) -> None:
        """Answer until `stop`; a lost broker is reconnected with backoff."""
        self.load_ca()
        read_allowlist(self.allow)  # a missing allowlist is an error at start, not later
        backoff = Backoff(cap=30.0)
        while not stop.is_set():
            lost: str | None = None
            try:
                await self._connection(stop)
            except* aiomqtt.MqttError as group:  # from the subscribe or the task group
                lost = str(group.exceptions[0])
            if lost is None:
                return
            self.ready.clear()
            delay = backoff.next()
            log.warning(
                "ca-serve: broker %s:%d: %s; again in %.1f s", self.host, self.port, lost, delay
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def _connection(self, stop: asyncio.Event) -> None:
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"madoguchi-ca-serve-{secrets.token_hex(4)}",
            tls_context=self.tls_context,
            username=self.username,
            password=self.password,
        ) as client:
            await client.subscribe(self.topics.all_csr, qos=1)
            self.ready.set()
            log.info("ca-serve: answering CSRs on %s", self.topics.all_csr)
            async with asyncio.TaskGroup() as tg:
                receive = tg.create_task(self._receive(client), name="ca-serve-receive")
                stopping = tg.create_task(stop.wait(), name="ca-serve-stop")
                await asyncio.wait({receive, stopping}, return_when=asyncio.FIRST_COMPLETED)
                receive.cancel()
                stopping.cancel()

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            topic = self.topics.parse(m.topic.value)
            if topic is None or topic.kind != "csr":
                continue
            body = await asyncio.to_thread(self.answer, topic.site, topic.agent, m.payload)
            reply = self.topics.station(topic.site, topic.agent).csr_signed
            await client.publish(reply, json.dumps(body), qos=1)
            ok = body["ok"] is True
            if ok:
                self.signed += 1
            else:
                self.refused += 1
                log.warning("ca-serve: refused %s/%s: %s", topic.site, topic.agent, body["error"])
            if self.audit is not None:
                await asyncio.to_thread(
                    self.audit.record,
                    who="ca-serve",
                    site=topic.site,
                    agent=topic.agent,
                    command="sign-csr",
                    request_id=str(body.get("request_id")),
                    outcome="signed" if ok else "refused",
                    error=None if ok else str(body["error"]),
                )
