"""Certificate renewal over MQTT (issue #22, point 5).

From `[agent] cert_renew_at` of its lifetime (default 80 %), the station makes a new key
and CSR in `<data_dir>/renewal/` (`make_key_and_csr`, the path `madoguchi enroll` takes;
the key is kept across retries, never sent), publishes the CSR on its own `csr` topic
(the broker's ACL lets only this station's certificate write there) and waits for the
fleet signer's answer on `csr/signed` (`madoguchi fleet ca-serve`). A signed certificate
is checked against the new key and the station's CN, then key and certificate are
installed in `<data_dir>/credentials/` (the configured pair may be read-only: the
shipped unit hands it in with LoadCredential=); from its next connect the uplink
presents whichever pair lasts longer (`enroll.client_identity`), without a restart.
A refusal, no answer or no broker is retried with backoff (2 s doubling to 5 min).
From 90 % CertWatch alerts; an expired certificate is refused by the uplink itself
with a one-line error (agent/station/uplink.py), never silently offered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent._aio import Backoff
from agent.config import Config
from agent.contract.topics import Topics
from agent.errors import EnrollError, RenewError, UplinkError
from agent.station.diagnostics import CertWatch
from agent.station.enroll import (
    CERT_FILE,
    KEY_FILE,
    RENEWED_DIR,
    install_renewed,
    make_key_and_csr,
    station_cn,
)

if TYPE_CHECKING:
    from agent.station.uplink import Uplink

log = logging.getLogger(__name__)

MAX_CERT_CHARS = 16_384


class CertRenewer:
    """Renews the client certificate named by `[mqtt] tls_cert` / `tls_key`."""

    answer_timeout_s = 30.0
    retry_first_s = 2.0
    retry_cap_s = 300.0
    idle_check_s = 3600.0  # a certificate that cannot be read is looked at again this often

    def __init__(
        self, config: Config, watch: CertWatch, *, now: Callable[[], float] = time.time
    ) -> None:
        m, a = config.mqtt, config.agent
        self.enabled = m.tls_cert is not None and m.tls_key is not None
        # installed here, not over the configured pair (read-only under the shipped unit);
        # the uplink presents whichever pair lasts longer (enroll.client_identity)
        self.key_path = a.data_dir / RENEWED_DIR / KEY_FILE
        self.cert_path = a.data_dir / RENEWED_DIR / CERT_FILE
        self.watch = watch
        self.renew_at = a.cert_renew_at
        self.site, self.name = a.site, a.name
        self.topics = Topics(m.topic_prefix).station(a.site, a.name)
        self.staging = a.data_dir / "renewal"
        self._now = now
        self.state = "idle"  # idle / due / requested / renewed / failed
        self.attempts = 0
        self.last_error: str | None = None
        self.renewed_at: float | None = None
        self._waiting: tuple[str, asyncio.Future[dict[str, Any]]] | None = None

    def describe(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "cert_renewal": {
                "state": self.state,
                "attempts": self.attempts,
                "last_error": self.last_error,
                "renewed_at": self.renewed_at,
            }
        }

    def due_in(self) -> float | None:
        """Seconds until the certificate reaches `renew_at` of its life (0: now)."""
        nb, na = self.watch.not_before, self.watch.not_after
        if nb is None or na is None:
            return None
        return max(0.0, nb + (na - nb) * self.renew_at - self._now())

    async def handle(self, topic: str, payload: Any) -> bool:
        """The signer's answer on `csr/signed` (an uplink subscription)."""
        if topic != self.topics.csr_signed:
            return False
        try:
            body = json.loads(payload)
        except (TypeError, ValueError):
            log.warning("csr/signed: not JSON, ignored")
            return True
        waiting = self._waiting
        if (
            isinstance(body, dict)
            and waiting is not None
            and body.get("request_id") == waiting[0]
            and not waiting[1].done()
        ):
            waiting[1].set_result(body)
        return True

    async def run(self, uplink: Uplink) -> None:
        if not self.enabled:
            return
        backoff = Backoff(first=self.retry_first_s, cap=self.retry_cap_s)
        while True:
            self.watch.describe()  # reads the certificate again if it was replaced
            wait = self.due_in()
            if wait is None or wait > 0:
                # a known instant (or an unreadable certificate): a timed wait, no polling
                await asyncio.sleep(self.idle_check_s if wait is None else min(wait, 86_400))
                continue
            self.state = "due"
            await uplink.wait_connected()
            try:
                await self._renew(uplink)
            except (RenewError, EnrollError, UplinkError, TimeoutError) as e:
                self.attempts += 1
                self.state = "failed"
                self.last_error = (
                    str(e) or f"no answer from the fleet signer in {self.answer_timeout_s:.0f} s"
                )
                delay = backoff.next()
                log.warning(
                    "certificate renewal failed (attempt %d): %s; again in %.0f s",
                    self.attempts,
                    self.last_error,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                backoff.reset()
            finally:
                self._waiting = None

    async def _renew(self, uplink: Uplink) -> None:
        _, csr_path, _ = await asyncio.to_thread(
            make_key_and_csr, self.site, self.name, self.staging
        )
        rid = secrets.token_hex(8)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting = (rid, answer)
        csr = csr_path.read_text()
        await uplink.publish_or_raise(
            self.topics.csr, json.dumps({"request_id": rid, "csr": csr}).encode()
        )
        self.state = "requested"
        async with asyncio.timeout(self.answer_timeout_s):
            body = await answer
        if body.get("ok") is not True:
            raise RenewError(f"the fleet signer refused the CSR: {str(body.get('error'))[:200]}")
        cert = body.get("cert")
        if not isinstance(cert, str) or len(cert) > MAX_CERT_CHARS:
            raise RenewError("the fleet signer's answer holds no certificate")
        (self.staging / "signed.crt").write_text(cert)
        cn = station_cn(self.site, self.name)
        self.cert_path.parent.mkdir(mode=0o700, exist_ok=True)
        await asyncio.to_thread(install_renewed, self.staging, self.key_path, self.cert_path, cn)
        self.state, self.renewed_at, self.last_error = "renewed", self._now(), None
        self.watch.switch(self.cert_path)
        log.info(
            "client certificate renewed: %s, not after %s; used from the next connection",
            self.cert_path,
            self.watch.describe_plain()["cert_expires_at"],
        )
