"""The registry's derived station status: one message for consumers that want one source.

A `[station_status]` section in central.toml turns it on. The feed has its own MQTT
connection and identity (CN `registry-status` on the shipped broker, whose ACL lets
it read no records; the registry's record transport is not its business): it listens to
every station's `status`, `telemetry` and `ack`, hears of every record the registry
stores, and publishes `{prefix}/_registry/{consumer}/stations` every
`interval_s` seconds, retained, QoS 1: each station's state as the dashboard
judges it (agent/central/liveness.py): `online`, `offline` (it said so, or its will),
`unreachable` (said online, silent past 1.5 telemetry intervals). Re-published on a
timer, not only on change, because retained messages are node-local on a RabbitMQ
cluster: a consumer on another node gets it within one period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from agent._aio import NO_DELAY, Backoff, raise_if_cancelling
from agent.central.liveness import UNREACHABLE_AFTER, Heard, verdict
from agent.contract.records import iso_ms, utc_now
from agent.contract.topics import DEFAULT_PREFIX, Topics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Station:
    state: str = "unknown"
    session: int = 0
    reason: str | None = None
    heard: Heard = field(default_factory=Heard)


class StationStatusFeed:
    """Derives every station's state and publishes it; `run()` until cancelled."""

    def __init__(
        self,
        host: str,
        port: int,
        consumer: str,
        *,
        interval_s: float = 10.0,
        topic_prefix: str = DEFAULT_PREFIX,
        tls_context: Any = None,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        unreachable_after: float = UNREACHABLE_AFTER,
    ) -> None:
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.topics = Topics(topic_prefix)
        self.topic = self.topics.registry_stations(consumer)
        self.tls_context = tls_context
        self.username = username
        self.password = password
        self.client_id = client_id or f"madoguchi-station-status-{consumer}"
        self.unreachable_after = unreachable_after
        self.stations: dict[tuple[str, str], _Station] = {}
        self.connected = asyncio.Event()
        self.published = 0

    # -- what it hears -------------------------------------------------------------

    def on_stored(self, site: str, agent: str, now: float) -> None:
        """The registry stored one of this station's records."""
        self.stations.setdefault((site, agent), _Station()).heard.records = now

    def on_message(self, topic: str, payload: Any, now: float) -> None:
        where = self.topics.parse(topic)
        if where is None or where.kind not in ("status", "telemetry", "ack"):
            return
        key = (where.site, where.agent)
        if where.kind == "ack":
            if key in self.stations:
                self.stations[key].heard.ack = now
            return
        try:
            body = json.loads(payload)
        except (ValueError, TypeError):
            return
        if not isinstance(body, dict) or not isinstance(session := body.get("session"), int):
            return
        st = self.stations.setdefault(key, _Station())
        if session < st.session:
            return  # a late message (or a stale will) of an older connection
        if where.kind == "telemetry" or body.get("state") == "online":
            st.state, st.session, st.reason = "online", session, None
            st.heard.telemetry = now
            st.heard.said_interval(body.get("telemetry_interval_s"))
        elif body.get("state") == "offline":
            st.state, st.session = "offline", session
            st.reason = str(body.get("reason", "connection lost"))[:200]

    # -- what it says --------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        rows = []
        for (site, agent), st in sorted(self.stations.items()):
            state, silent = verdict(st.state, st.heard, now, self.unreachable_after)
            rows.append(
                {
                    "site": site,
                    "agent": agent,
                    "state": state,
                    "session": st.session,
                    "silent_s": None if silent is None else round(silent, 1),
                    "telemetry_interval_s": st.heard.interval_s,
                    "reason": st.reason if state == "offline" else None,
                }
            )
        return {"ts": iso_ms(utc_now()), "interval_s": self.interval_s, "stations": rows}

    async def run(self) -> None:
        backoff = Backoff(cap=10.0)
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    tls_context=self.tls_context,
                    username=self.username,
                    password=self.password,
                    keepalive=30,
                    socket_options=NO_DELAY,
                ) as client:
                    for t in (self.topics.all_status, self.topics.all_telemetry):
                        await client.subscribe(t, qos=0)
                    await client.subscribe(self.topics.all_acks, qos=0)
                    raise_if_cancelling()  # a stop that aiomqtt's wait_for swallowed (3.11)
                    self.connected.set()
                    backoff.reset()
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._listen(client), name="station-status-listen")
                        tg.create_task(self._publish(client), name="station-status-publish")
            except* aiomqtt.MqttError as group:
                self.connected.clear()
                delay = backoff.next()
                log.warning(
                    "station status: broker %s:%d: %s; retry in %.1f s",
                    self.host,
                    self.port,
                    group.exceptions[0],
                    delay,
                )
                await asyncio.sleep(delay)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            self.on_message(m.topic.value, m.payload, time.time())

    async def _publish(self, client: aiomqtt.Client) -> None:
        while True:
            body = json.dumps(self.snapshot(time.time()), separators=(",", ":"))
            await client.publish(self.topic, body, qos=1, retain=True)
            self.published += 1
            await asyncio.sleep(self.interval_s)
