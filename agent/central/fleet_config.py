"""`madoguchi fleet config push`: a new agent.toml to one station over `cmd/config`,
audited, and (with `wait_s`) followed until the station confirms it or rolls it back.

The station does the checking and the rollback (agent/station/remote_config.py); this
side sends the text with its revision id and sha256, waits for the command's result,
then watches the station's status and telemetry for `config_revision` /
`config_rolled_back`. Every step is one line in the audit log (agent/central/audit.py):
`sent` before the publish (no audit, nothing sent), then `refused` (with every problem),
`applied`, and `confirmed` or `rolled_back` or `unknown` (the wait ran out).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from agent.central.audit import AuditLog
from agent.contract.messages import Command
from agent.contract.topics import DEFAULT_PREFIX, Topics


@dataclass
class PushOutcome:
    """What happened to one push: the station's result, then what it reported."""

    outcome: str  # refused / applied / confirmed / rolled_back / unknown / failed
    result: dict[str, Any]
    reason: str | None = None
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome in ("applied", "confirmed")


def config_command(text: str, revision: str, request_id: str) -> Command:
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Command("config", request_id, {"toml": text, "revision": revision, "sha256": digest})


class ConfigPusher:
    """One broker connection as the dashboard role (its certificate and ACL)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        audit: AuditLog,
        who: str,
        topic_prefix: str = DEFAULT_PREFIX,
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        result_timeout_s: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        self.audit = audit
        self.who = who
        self.topics = Topics(topic_prefix)
        self.tls_context = tls_context
        self.username, self.password = username, password
        self.result_timeout_s = result_timeout_s

    def _audit(self, site: str, agent: str, rid: str, outcome: str, error: str | None) -> None:
        self.audit.record(
            who=self.who,
            site=site,
            agent=agent,
            command="config",
            request_id=rid,
            outcome=outcome,
            error=error,
        )

    async def push(
        self, site: str, agent: str, text: str, revision: str, *, wait_s: float = 0.0
    ) -> PushOutcome:
        rid = f"config-{revision}-{secrets.token_hex(4)}"
        st = self.topics.station(site, agent)
        await asyncio.to_thread(self._audit, site, agent, rid, "sent", f"revision {revision}")
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"madoguchi-fleet-config-{secrets.token_hex(4)}",
            tls_context=self.tls_context,
            username=self.username,
            password=self.password,
            timeout=self.result_timeout_s,
        ) as client:
            await client.subscribe(st.command_result("config"), qos=1)
            await client.subscribe(st.status, qos=1)
            await client.subscribe(st.telemetry, qos=0)
            await client.publish(
                st.command("config"), config_command(text, revision, rid).encode(), qos=1
            )
            outcome = await self._follow(client, st, rid, revision, wait_s)
        error = outcome.reason
        if outcome.outcome == "refused" and outcome.result.get("problems"):
            error = "; ".join(str(p) for p in outcome.result["problems"])[:2000]
        await asyncio.to_thread(self._audit, site, agent, rid, outcome.outcome, error)
        return outcome

    async def _follow(
        self, client: aiomqtt.Client, st: Any, rid: str, revision: str, wait_s: float
    ) -> PushOutcome:
        result: dict[str, Any] | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.result_timeout_s
        messages = aiomqtt_messages(client)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                async for topic, body in messages:
                    if topic == st.command_result("config") and body.get("request_id") == rid:
                        result = body
                        break
        if result is None:
            return PushOutcome("unknown", {}, f"no answer in {self.result_timeout_s:.0f} s")
        if not result.get("ok"):
            return PushOutcome("refused", result, str(result.get("error")))
        if wait_s <= 0:
            return PushOutcome("applied", result)
        heard: tuple[float, dict[str, Any]] | None = None  # the station's last word
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for topic, body in messages:
                    if topic not in (st.status, st.telemetry):
                        continue
                    heard = (loop.time(), body)
                    rolled = body.get("config_rolled_back")
                    if isinstance(rolled, dict) and rolled.get("revision") == revision:
                        return PushOutcome("rolled_back", result, str(rolled.get("reason")))
                    if (
                        body.get("config_revision") == revision
                        and body.get("config_state") == "confirmed"
                    ):
                        return PushOutcome("confirmed", result)
        return PushOutcome(
            "unknown",
            result,
            f"neither confirmed nor rolled back in {wait_s} s; {_last(heard, loop)}",
        )


def _last(heard: tuple[float, dict[str, Any]] | None, loop: asyncio.AbstractEventLoop) -> str:
    """What the desk needs to judge an unknown outcome: when the station last spoke, and
    what it said of its configuration (its status or telemetry, never a record)."""
    if heard is None:
        return "nothing heard from the station since its result (offline, or on the new broker)"
    at, body = heard
    fields = [
        f"{k} {body.get(k)}"
        for k in ("state", "config_revision", "config_state")
        if body.get(k) is not None
    ]
    said = ", ".join(fields) or "no configuration fields"
    return f"last heard {loop.time() - at:.0f} s ago: {said}"


async def aiomqtt_messages(client: aiomqtt.Client) -> Any:
    """(topic, JSON object) of each message; anything else is skipped."""
    async for m in client.messages:
        try:
            body = json.loads(m.payload)
        except (TypeError, ValueError):
            continue
        if isinstance(body, dict):
            yield m.topic.value, body
