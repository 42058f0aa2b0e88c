"""`madoguchi dashboard`: the fleet at a glance for the people at the central desk.

One process: an MQTT client fed by every station's retained `status` and its
`telemetry`, an optional read of the registry database (records per minute,
open seq gaps, clock state), and a small web page served by Starlette +
uvicorn (the kiosk's choice too) with no build step. The page polls
`/api/fleet` every second; command buttons go through `/api/command`, which
publishes `cmd/{name}` and waits for its `cmd/{name}/result`.

Online or offline comes from `status` and its `session`: an offline message
whose session is lower than the last online one is a stale will from an old
connection, and must not flip a live station red.

The page and the API carry no personal data (the agent never puts any in
status or telemetry); the dashboard binds to loopback by default: put it
behind the city's TLS proxy to share it. Every API call needs a credential and a
known Host and Origin (dashboard_guard.py); every command is audited first
(audit.py), and without an audit log no command is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from agent._aio import NO_DELAY, Backoff, asgi_server, raise_if_cancelling
from agent.central.audit import AuditLog
from agent.central.dashboard_guard import DashboardGuard, DashboardGuardMiddleware
from agent.central.liveness import UNREACHABLE_AFTER, Heard, verdict
from agent.central.store import AgentSummary, Gap, Problems, RecordStore
from agent.central.stores import open_store
from agent.contract.messages import Command
from agent.contract.topics import DEFAULT_PREFIX, Topics
from agent.errors import AuditError, MadoguchiError, RegistryStoreError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "dashboard_static"
COMMANDS = ("rebirth", "resend", "diagnostics", "ping", "logs")
# a remote camera trigger: offered only with remote_photo, and the station must opt in too
PHOTO_COMMAND = "capture_photo"


@dataclass(slots=True)
class StationView:
    """What the dashboard knows of one station, from MQTT and the registry."""

    site: str
    agent: str
    state: str = "unknown"  # online | offline | unknown
    session: int = 0
    last_seen: float | None = None
    offline_reason: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # alerts the agent raised
    registry: AgentSummary | None = None
    gaps: list[Gap] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # last result per command
    heard: Heard = field(default_factory=Heard)  # telemetry, records, acks: unreachable or not


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a number on the page becomes an alert."""

    stuck_after_s: float = 120.0  # oldest unconfirmed record older than this
    nearly_full_ratio: float = 0.8  # outbox bytes over max_bytes
    gap_timeout_s: float = 300.0  # a seq gap open longer than this
    keep_events_s: float = 3600.0  # agent-raised alerts (expired lot ...) stay this long
    registry_missed_beats: float = 3.0  # registry down: no heartbeat for this many periods
    unreachable_after: float = UNREACHABLE_AFTER  # telemetry intervals of silence (liveness.py)
    registry_grace_s: float = 30.0  # no registry status at all this long after start: down


@dataclass(slots=True)
class RegistryView:
    """One registry consumer, from its retained `_registry/{name}/status`."""

    name: str
    state: str = "unknown"  # online | offline
    session: int = 0
    last_seen: float | None = None
    status: dict[str, Any] = field(default_factory=dict)
    changed_at: float = 0.0


class Fleet:
    """The state machine of the page: pure, fed messages, asked for rows."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.t = thresholds or Thresholds()
        self.stations: dict[tuple[str, str], StationView] = {}
        self.per_minute: list[int] = []
        self.registries: dict[str, RegistryView] = {}
        self.problems: Problems | None = None
        #: when the dashboard began listening (`Dashboard.run`): a registry never heard of
        #: within `registry_grace_s` of it is down too, not "nothing to judge"
        self.started_at: float | None = None

    def on_registry_status(self, name: str, body: dict[str, Any], now: float) -> None:
        """A consumer's status: a will older than its last online session is stale."""
        session = body.get("session")
        state = body.get("state")
        if not isinstance(session, int) or state not in ("online", "offline"):
            return
        view = self.registries.setdefault(name, RegistryView(name))
        if session < view.session:
            return
        view.state, view.session, view.status = str(state), session, body
        view.changed_at = now
        if state == "online":
            view.last_seen = now

    def on_problems(self, problems: Problems) -> None:
        self.problems = problems

    def registry_alerts(self, now: float) -> list[dict[str, Any]]:
        """Registry down (no consumer online, or heartbeats missed), behind (lag), and
        records it refused (dead letters) or found conflicting, in the last hour."""
        out: list[dict[str, Any]] = []
        live = []
        self._forget_old_consumers(now)
        for r in sorted(self.registries.values(), key=lambda r: r.name):
            beat = r.status.get("heartbeat_s")
            beat_s = float(beat) if isinstance(beat, int | float) and beat > 0 else 10.0
            silent = (
                r.last_seen is None or now - r.last_seen > self.t.registry_missed_beats * beat_s
            )
            if r.state == "online" and not silent:
                live.append(r)
        if self.registries and not live:
            down = [r for r in self.registries.values() if r.state == "offline"]
            detail = str(down[0].status.get("reason", "offline")) if down else "no heartbeat"
            out.append({"type": "registry_down", "level": "error", "detail": detail})
        elif (
            not self.registries
            and self.started_at is not None
            and now - self.started_at > self.t.registry_grace_s
        ):
            out.append({"type": "registry_down", "level": "error", "detail": "never seen"})
        lag = max(
            (float(v) for r in live if isinstance(v := r.status.get("lag_s"), int | float)),
            default=0.0,
        )
        for st in self.stations.values():
            age = ((st.telemetry or st.status).get("outbox") or {}).get("oldest_unconfirmed_age_s")
            if st.state == "online" and isinstance(age, int | float):
                lag = max(lag, float(age))
        if live and lag >= self.t.stuck_after_s:
            out.append({"type": "registry_behind", "level": "warn", "detail": f"{lag:.0f} s"})
        p = self.problems
        if p is not None:
            recent = [d for d in p.recent_dead_letters if now - d.at <= self.t.keep_events_s]
            if recent:
                out.append(
                    {
                        "type": "dead_letters",
                        "level": "error",
                        "detail": f"{len(recent)} in the last hour ({p.dead_letters} in all):"
                        f" {recent[0].reason[:120]}",
                    }
                )
            clashes = [c for c in p.recent_conflicts if now - c.at <= self.t.keep_events_s]
            if clashes:
                c = clashes[0]
                out.append(
                    {
                        "type": "conflicts",
                        "level": "error",
                        "detail": f"{len(clashes)} in the last hour ({p.conflicts} in all):"
                        f" {c.site}/{c.agent} record {c.record_id}",
                    }
                )
        return out

    def _forget_old_consumers(self, now: float) -> None:
        """Consumers named after their pid come and go: one offline for longer than
        `keep_events_s` is forgotten while another is online."""
        online = any(r.state == "online" for r in self.registries.values())
        if not online:
            return
        for name, r in list(self.registries.items()):
            if r.state == "offline" and now - r.changed_at > self.t.keep_events_s:
                del self.registries[name]

    def registry_snapshot(self, now: float) -> dict[str, Any]:
        self._forget_old_consumers(now)
        p = self.problems
        return {
            "consumers": [
                {
                    "name": r.name,
                    "state": r.state,
                    "last_seen_age_s": None if r.last_seen is None else now - r.last_seen,
                    **{
                        k: r.status.get(k)
                        for k in ("lag_s", "stored", "duplicates", "conflicts", "dead_letters")
                    },
                }
                for r in sorted(self.registries.values(), key=lambda r: r.name)
            ],
            "dead_letters": None if p is None else p.dead_letters,
            "conflicts": None if p is None else p.conflicts,
            "alerts": self.registry_alerts(now),
        }

    def _station(self, site: str, agent: str) -> StationView:
        key = (site, agent)
        if key not in self.stations:
            self.stations[key] = StationView(site, agent)
        return self.stations[key]

    def on_status(self, site: str, agent: str, body: dict[str, Any], now: float) -> None:
        st = self._station(site, agent)
        session = body.get("session")
        if not isinstance(session, int):
            return
        if body.get("state") == "online":
            if session >= st.session:
                st.state, st.session, st.offline_reason = "online", session, None
                st.status = body
                st.last_seen = st.heard.telemetry = now
                st.heard.said_interval(body.get("telemetry_interval_s"))
        elif body.get("state") == "offline":
            if session < st.session:
                log.debug("stale will of %s/%s session %d ignored", site, agent, session)
                return
            st.state, st.session = "offline", session
            st.offline_reason = str(body.get("reason", "connection lost"))
            st.last_seen = st.last_seen or now

    def on_telemetry(self, site: str, agent: str, body: dict[str, Any], now: float) -> None:
        st = self._station(site, agent)
        session = body.get("session")
        if not isinstance(session, int) or session < st.session:
            return  # a late message from an older connection
        if session > st.session or st.state != "online":
            st.state, st.session, st.offline_reason = "online", session, None
        st.telemetry = body
        st.last_seen = st.heard.telemetry = now
        st.heard.said_interval(body.get("telemetry_interval_s"))
        for alert in body.get("alerts") or []:
            if isinstance(alert, dict):
                st.events.append({**alert, "at": now})
        st.events = [e for e in st.events if now - e["at"] <= self.t.keep_events_s][-20:]

    def on_ack(self, site: str, agent: str, now: float) -> None:
        """The registry acked this station's records: it was sending a moment ago."""
        if (site, agent) in self.stations:  # an ack alone never makes a station up
            self.stations[(site, agent)].heard.ack = now

    def shown_state(self, st: StationView, now: float) -> tuple[str, float | None]:
        """The state for the page: `unreachable` for a silent station said to be online."""
        return verdict(st.state, st.heard, now, self.t.unreachable_after)

    def on_result(self, site: str, agent: str, name: str, body: dict[str, Any]) -> None:
        self._station(site, agent).results[name] = body

    def on_registry(self, agents: list[AgentSummary], gaps: list[Gap]) -> None:
        minutes = max((len(a.per_minute) for a in agents), default=0)
        self.per_minute = [sum(a.per_minute[i] for a in agents) for i in range(minutes)]
        for st in self.stations.values():
            st.registry, st.gaps = None, []
        for a in agents:
            st = self._station(a.site, a.agent)
            st.registry = a
            if a.last_stored_at is not None:
                st.heard.records = a.last_stored_at
        for g in gaps:
            self._station(g.site, g.agent).gaps.append(g)

    def alerts(self, st: StationView, now: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if st.state == "offline":
            out.append({"type": "offline", "level": "error", "detail": st.offline_reason})
        shown, silent = self.shown_state(st, now)
        if shown == "unreachable" and silent is not None:
            out.append(
                {
                    "type": "unreachable",
                    "level": "error",
                    "detail": f"nothing heard for {silent:.0f} s "
                    f"(telemetry every {st.heard.interval_s:g} s; its broker may be down)",
                }
            )
        outbox = (st.telemetry or st.status).get("outbox") or {}
        age = outbox.get("oldest_unconfirmed_age_s")
        if isinstance(age, (int, float)) and age >= self.t.stuck_after_s:
            out.append({"type": "outbox_stuck", "level": "warn", "detail": f"{age:.0f} s"})
        used, cap = outbox.get("db_bytes"), outbox.get("max_bytes")
        full = isinstance(used, int) and isinstance(cap, int) and cap > 0 and used / cap
        if full and full >= self.t.nearly_full_ratio:
            out.append({"type": "outbox_nearly_full", "level": "error", "detail": f"{full:.0%}"})
        for g in st.gaps:
            if now - g.opened_at >= self.t.gap_timeout_s:
                out.append(
                    {
                        "type": "seq_gap",
                        "level": "error",
                        "detail": f"{g.first}..{g.last} ({now - g.opened_at:.0f} s)",
                    }
                )
        if st.registry is not None and st.registry.clock_synced is False:
            out.append({"type": "clock_unsynced", "level": "warn", "detail": None})
        devices = (st.telemetry or st.status).get("devices") or {}
        for name, dev in sorted(devices.items()):
            if st.state == "online" and dev.get("state") in ("error", "disconnected"):
                out.append({"type": "device", "level": "warn", "detail": f"{name}: {dev['state']}"})
        out += cert_alerts(st)
        out += release_alerts(st)
        out += dataset_alerts(st, now)
        out += fleet_alerts(st)
        for e in st.events:
            if now - e["at"] > self.t.keep_events_s or str(e.get("type")).startswith("cert_"):
                continue  # (the certificate's state comes from its status fields above)
            kind = str(e.get("type", "alert"))
            detail = e.get("device")
            if kind == "expired_lot":
                lot = (e.get("fields") or {}).get("10")
                detail = " ".join(str(p) for p in (e.get("device"), lot and f"lot {lot}") if p)
            out.append(
                {
                    "type": kind,
                    "level": "error" if kind == "expired_lot" else "warn",
                    "detail": detail,
                    "age_s": round(now - e["at"]),
                }
            )
        return out

    def snapshot(self, now: float) -> dict[str, Any]:
        sites: dict[str, list[dict[str, Any]]] = {}
        for (site, agent), st in sorted(self.stations.items()):
            src = st.telemetry or st.status
            outbox = src.get("outbox") or {}
            reg = st.registry
            sites.setdefault(site, []).append(
                {
                    "site": site,
                    "agent": agent,
                    "state": self.shown_state(st, now)[0],
                    "session": st.session,
                    "last_seen_age_s": None if st.last_seen is None else now - st.last_seen,
                    "outbox": {
                        k: outbox.get(k)
                        for k in (
                            "pending",
                            "unconfirmed",
                            "oldest_unconfirmed_age_s",
                            "db_bytes",
                            "max_bytes",
                        )
                    },
                    "devices": {
                        name: {k: dev.get(k) for k in ("state", "reads", "errors")}
                        for name, dev in sorted((src.get("devices") or {}).items())
                    },
                    "registry": None
                    if reg is None
                    else {
                        "records": reg.records,
                        "max_seq": reg.max_seq,
                        "last_stored_age_s": None
                        if reg.last_stored_at is None
                        else now - reg.last_stored_at,
                        "per_minute": reg.per_minute,
                        "open_gaps": len(st.gaps),
                    },
                    "datasets": station_datasets(st, now),
                    "alerts": self.alerts(st, now),
                    # log lines are shown to who asked, not repeated in every snapshot
                    "results": {k: v for k, v in st.results.items() if k != "logs"},
                    **station_columns(st),
                }
            )
        return {
            "now": now,
            "sites": [{"site": s, "stations": rows} for s, rows in sorted(sites.items())],
            "per_minute": self.per_minute,
            "registry": self.registry_snapshot(now),
        }


def station_columns(st: StationView) -> dict[str, Any]:
    """Version, rollout state and certificate expiry (issue #22): from the birth, or newer
    telemetry. `release`: the running release and the last rollout's target, state
    (offered ... healthy, rolled_back, refused) and reason (docs/CONTRACT.md "Releases")."""
    src = {**st.status, **st.telemetry}
    keys = (
        "madoguchi",
        "release",
        "cert_expires_at",
        "cert_lifetime_used",
        "cert_renewal",
        "config_revision",
        "config_state",
        "config_rolled_back",
    )
    return {k: src.get(k) for k in keys}


def station_datasets(st: StationView, now: float) -> dict[str, dict[str, Any]]:
    """The reference datasets a station says it holds (issue #20), from its newer report:
    version, rows, age since issue (by the dashboard's clock), stale; and the last
    refusal of a kind, if any."""
    reports = [r for r in (st.status, st.telemetry) if "datasets" in r]  # the newer one
    src = max(reports, key=lambda r: str(r.get("ts", "")), default={})
    sets = _dict(src.get("datasets"))
    held, refused = _dict(sets.get("held")), _dict(sets.get("refused"))
    out: dict[str, dict[str, Any]] = {}
    for kind, h in sorted(held.items()):
        if not isinstance(h, dict):
            continue
        expires = _epoch_or_none(h.get("expires_at"))
        issued = _epoch_or_none(h.get("issued_at"))
        out[str(kind)] = {
            "version": h.get("version"),
            "rows": h.get("rows"),
            "age_s": h.get("age_s") if issued is None else round(now - issued, 1),
            "stale": bool(h.get("stale")) or (expires is not None and now > expires),
        }
    for kind, r in sorted(refused.items()):
        if isinstance(r, dict):
            out.setdefault(str(kind), {"version": None, "rows": None, "age_s": None,
                                       "stale": False})  # fmt: skip
            out[str(kind)]["refused"] = str(r.get("reason"))[:200]
    return out


def dataset_alerts(st: StationView, now: float) -> list[dict[str, Any]]:
    """A stale dataset (still deciding) and a refused version are warnings."""
    out: list[dict[str, Any]] = []
    for kind, d in station_datasets(st, now).items():
        if d["stale"]:
            out.append(
                {"type": "dataset_stale", "level": "warn", "detail": f"{kind} v{d['version']}"}
            )
        if "refused" in d:
            out.append(
                {"type": "dataset_refused", "level": "warn", "detail": f"{kind}: {d['refused']}"}
            )
    return out


def _dict(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _epoch_or_none(iso: object) -> float | None:
    from datetime import UTC, datetime

    if not isinstance(iso, str):
        return None
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def fleet_alerts(st: StationView) -> list[dict[str, Any]]:
    """A configuration the station rolled back, a renewal that keeps failing (issue #22):
    alerts for as long as the station says so."""
    cols = station_columns(st)
    out: list[dict[str, Any]] = []
    rolled = cols["config_rolled_back"]
    if isinstance(rolled, dict):
        detail = f"{rolled.get('revision')}: {rolled.get('reason')}"
        out.append({"type": "config_rolled_back", "level": "warn", "detail": detail[:300]})
    renewal = cols["cert_renewal"]
    if isinstance(renewal, dict) and renewal.get("state") == "failed":
        detail = f"{renewal.get('attempts')} attempt(s): {renewal.get('last_error')}"
        out.append({"type": "cert_renewal_failed", "level": "warn", "detail": detail[:300]})
    return out


def cert_alerts(st: StationView) -> list[dict[str, Any]]:
    """A certificate past 90 % of its lifetime is an alert for as long as it lasts."""
    cols = station_columns(st)
    used, expires = cols["cert_lifetime_used"], cols["cert_expires_at"]
    if "cert_expires_at" in {**st.status, **st.telemetry} and expires is None:
        return [{"type": "cert_unreadable", "level": "error", "detail": None}]
    if not isinstance(used, (int, float)) or used < 0.9:
        return []
    kind = "cert_expired" if used >= 1.0 else "cert_expiring"
    level = "error" if kind == "cert_expired" else "warn"
    return [{"type": kind, "level": level, "detail": f"{used:.0%}, {expires}"}]


def release_alerts(st: StationView) -> list[dict[str, Any]]:
    """The last rollout rolled back or was refused: an alert until the next rollout."""
    rel = station_columns(st)["release"]
    if not isinstance(rel, dict) or rel.get("state") not in ("rolled_back", "refused"):
        return []
    detail = f"{rel.get('target')}: {rel.get('reason')}"[:300]
    return [{"type": f"release_{rel['state']}", "level": "warn", "detail": detail}]


def _failure(result: dict[str, Any]) -> str:
    """A failed result as one audit field: the error, and every problem of a refused
    configuration push (names of files and keys only: no personal data)."""
    problems = result.get("problems")
    if isinstance(problems, list) and problems:
        return f"{result.get('error')}: " + "; ".join(str(p) for p in problems)[:2000]
    return str(result.get("error"))


def diagnostics_file(result: dict[str, Any]) -> dict[str, Any]:
    """A diagnostics result as the download holds it: without the request id."""
    return {k: v for k, v in result.items() if k != "request_id"}


class Dashboard:
    """The MQTT side, the registry poll and the web server, in one event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: RecordStore | Path | str | None = None,
        topic_prefix: str = DEFAULT_PREFIX,
        http_host: str = "127.0.0.1",
        http_port: int = 8780,
        thresholds: Thresholds | None = None,
        db_poll_s: float = 2.0,
        chart_minutes: int = 30,
        command_timeout_s: float = 10.0,
        tls_context: Any = None,
        guard: DashboardGuard | None = None,
        audit: AuditLog | None = None,
        remote_photo: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = topic_prefix
        self.topics = Topics(topic_prefix)
        self.http_host = http_host
        self.http_port = http_port
        self.fleet = Fleet(thresholds)
        self.store: RecordStore | None = (
            None if db is None else db if not isinstance(db, (str, Path)) else open_store(db)
        )
        self.db_poll_s = db_poll_s
        self.chart_minutes = chart_minutes
        self.command_timeout_s = command_timeout_s
        self.tls_context = tls_context
        # no guard given: one that knows no token, so every /api/ call is refused
        self.guard = guard or DashboardGuard(listen_host=http_host)
        self.audit = audit
        self.commands = COMMANDS + ((PHOTO_COMMAND,) if remote_photo else ())
        self.username = username
        self.password = password
        self.connected = asyncio.Event()
        self.serving = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # -- MQTT ----------------------------------------------------------------------

    async def _mqtt(self) -> None:
        backoff = Backoff(cap=10.0)
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=f"madoguchi-dashboard-{socket.gethostname()}-{os.getpid()}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    tls_context=self.tls_context,
                    username=self.username,
                    password=self.password,
                    keepalive=30,
                    socket_options=NO_DELAY,
                ) as client:
                    for topic in (
                        self.topics.all_status,
                        self.topics.all_telemetry,
                        self.topics.all_command_results,
                    ):
                        await client.subscribe(topic, qos=1)
                        raise_if_cancelling()  # a stop that wait_for swallowed (3.11)
                    # the registry's acks: a station's records flowing (liveness.py), QoS 0
                    await client.subscribe(self.topics.all_acks, qos=0)
                    raise_if_cancelling()
                    self._client = client
                    self.connected.set()
                    backoff.reset()
                    log.info("dashboard listening on %s:%d", self.host, self.port)
                    async for m in client.messages:
                        self.on_message(m.topic.value, m.payload, time.time())
            except aiomqtt.MqttError as e:
                self._client = None
                self.connected.clear()
                delay = backoff.next()
                log.warning("dashboard: broker %s:%d: %s", self.host, self.port, e)
                await asyncio.sleep(delay)

    def on_message(self, topic: str, payload: Any, now: float) -> None:
        where = self.topics.parse(topic)
        if where is not None and where.kind == "ack":
            self.fleet.on_ack(where.site, where.agent, now)  # its body does not matter here
            return
        if where is None or where.kind not in (
            "status",
            "telemetry",
            "cmd_result",
            "registry_status",
        ):
            return
        site, agent = where.site, where.agent
        if where.kind == "registry_status" and not payload:
            return  # a consumer cleared its retained status at a clean stop
        try:
            body = json.loads(payload)
        except (ValueError, TypeError):
            log.warning("dashboard: not JSON on %s", topic)
            return
        if not isinstance(body, dict):
            return
        if where.kind == "registry_status":
            self.fleet.on_registry_status(agent, body, now)
        elif where.kind == "status":
            self.fleet.on_status(site, agent, body, now)
        elif where.kind == "telemetry":
            self.fleet.on_telemetry(site, agent, body, now)
        else:
            self.fleet.on_result(site, agent, str(where.command), {**body, "at": now})
            fut = self._pending.pop(str(body.get("request_id")), None)
            if fut is not None and not fut.done():
                fut.set_result(body)

    async def command(
        self,
        site: str,
        agent: str,
        name: str,
        who: str = "dashboard",
        args: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Publish `cmd/{name}` and wait for its result, audited before and after."""
        request_id = str(uuid.uuid4())
        if self.audit is not None:  # on disk before it is sent; AuditError: nothing is sent
            await asyncio.to_thread(
                self.audit.record,
                who=who,
                site=site,
                agent=agent,
                command=name,
                request_id=request_id,
                outcome="sent",
            )
        result = await self._command(site, agent, name, request_id, args or {})
        if self.audit is not None:
            try:
                await asyncio.to_thread(
                    self.audit.record,
                    who=who,
                    site=site,
                    agent=agent,
                    command=name,
                    request_id=request_id,
                    outcome="ok" if result.get("ok") is True else "failed",
                    error=None if result.get("ok") is True else _failure(result),
                )
            except AuditError as e:  # sent and answered: say so, the "sent" line is on disk
                log.error("dashboard: %s: outcome of %s %s not audited", e, name, request_id)
        return result

    async def _command(
        self, site: str, agent: str, name: str, request_id: str, args: dict[str, Any]
    ) -> dict[str, Any]:
        client = self._client
        if client is None:
            return {"ok": False, "error": "dashboard not connected to the broker"}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            await client.publish(
                self.topics.station(site, agent).command(name),
                Command(name, request_id, args).encode(),
                qos=1,
            )
            return await asyncio.wait_for(fut, self.command_timeout_s)
        except TimeoutError:
            return {"ok": False, "error": f"no answer in {self.command_timeout_s:.0f} s"}
        except aiomqtt.MqttError as e:
            return {"ok": False, "error": f"broker: {e}"}
        finally:
            self._pending.pop(request_id, None)

    # -- registry ------------------------------------------------------------------

    async def _poll_registry(self) -> None:
        store = self.store
        if store is None:
            return
        opened = False
        try:
            while True:
                try:
                    if not opened:
                        await store.open()
                        opened = True
                    agents = await store.agents(self.chart_minutes)
                    gaps = await store.open_gaps()
                    self.fleet.on_registry(agents, gaps)
                    self.fleet.on_problems(await store.problems())
                except RegistryStoreError as e:
                    log.warning("dashboard: registry database: %s", e)
                await asyncio.sleep(self.db_poll_s)
        finally:
            if opened:
                await store.close()

    # -- HTTP ----------------------------------------------------------------------

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse
        from starlette.routing import Route

        headers = {
            "cache-control": "no-store",
            "x-content-type-options": "nosniff",
            "x-frame-options": "DENY",
            "referrer-policy": "no-referrer",
        }

        async def index(request: Request) -> FileResponse:
            return FileResponse(
                STATIC / "index.html",
                headers={
                    **headers,
                    "content-security-policy": "default-src 'self'; style-src 'self' "
                    "'unsafe-inline'; script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
                },
            )

        async def fleet(request: Request) -> JSONResponse:
            return JSONResponse(
                {"broker": self.connected.is_set(), **self.fleet.snapshot(time.time())},
                headers=headers,
            )

        async def command(request: Request) -> JSONResponse:
            # JSON only: a cross-site form cannot send it without a preflight we never allow
            if request.headers.get("content-type", "").split(";")[0] != "application/json":
                return JSONResponse({"ok": False, "error": "JSON only"}, 415, headers=headers)
            try:
                body = await request.json()
                site, agent, name = str(body["site"]), str(body["agent"]), str(body["name"])
            except (ValueError, KeyError, TypeError):
                return JSONResponse({"ok": False, "error": "bad request"}, 400, headers=headers)
            if self.audit is None:
                return JSONResponse(
                    {"ok": False, "error": "no audit log: commands are off"}, 503, headers=headers
                )
            if name == PHOTO_COMMAND and name not in self.commands:
                return JSONResponse(
                    {"ok": False, "error": "remote photo is off (dashboard.remote_photo)"},
                    403,
                    headers=headers,
                )
            if name not in self.commands or (site, agent) not in self.fleet.stations:
                return JSONResponse({"ok": False, "error": "unknown"}, 404, headers=headers)
            who = request.scope.get("state", {}).get("user")
            if not who:  # the guard lets no anonymous call through; say so if it ever did
                return JSONResponse({"ok": False, "error": "unauthorized"}, 401, headers=headers)
            try:
                result = await self.command(site, agent, name, who=who)
            except AuditError as e:
                log.error("dashboard: %s: command %s not sent", e, name)
                return JSONResponse(
                    {"ok": False, "error": "audit log unavailable: not sent"}, 503, headers=headers
                )
            return JSONResponse(result, headers=headers)

        async def config(request: Request) -> JSONResponse:
            """A configuration push (cmd/config, docs/fleet-config.md): the whole file."""
            if request.headers.get("content-type", "").split(";")[0] != "application/json":
                return JSONResponse({"ok": False, "error": "JSON only"}, 415, headers=headers)
            try:
                body = await request.json()
                site, agent, text = str(body["site"]), str(body["agent"]), body["toml"]
                if not isinstance(text, str):
                    raise TypeError
                digest = hashlib.sha256(text.encode()).hexdigest()
                revision = str(body.get("revision") or digest[:12])[:64]
            except (ValueError, KeyError, TypeError):
                return JSONResponse({"ok": False, "error": "bad request"}, 400, headers=headers)
            if self.audit is None:
                return JSONResponse(
                    {"ok": False, "error": "no audit log: commands are off"}, 503, headers=headers
                )
            if (site, agent) not in self.fleet.stations:
                return JSONResponse({"ok": False, "error": "unknown"}, 404, headers=headers)
            who = request.scope.get("state", {}).get("user")
            if not who:
                return JSONResponse({"ok": False, "error": "unauthorized"}, 401, headers=headers)
            args = {"toml": text, "revision": revision, "sha256": digest}
            try:
                result = await self.command(site, agent, "config", who=who, args=args)
            except AuditError as e:
                log.error("dashboard: %s: config push not sent", e)
                return JSONResponse(
                    {"ok": False, "error": "audit log unavailable: not sent"}, 503, headers=headers
                )
            return JSONResponse(result, headers=headers)

        async def audit(request: Request) -> JSONResponse:
            entries = [] if self.audit is None else await asyncio.to_thread(self.audit.tail, 50)
            return JSONResponse({"entries": entries}, headers=headers)

        return Starlette(
            routes=[
                Route("/", index),
                Route("/api/fleet", fleet),
                Route("/api/command", command, methods=["POST"]),
                Route("/api/config", config, methods=["POST"]),
                Route("/api/audit", audit),
                *self._diagnostics_routes(headers),
            ],
            middleware=[Middleware(DashboardGuardMiddleware, guard=self.guard)],
        )

    def _diagnostics_routes(self, headers: dict[str, str]) -> list[Any]:
        """A station's last diagnostics as a JSON file, and the favicon."""
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse, Response
        from starlette.routing import Route

        async def diagnostics(request: Request) -> Response:
            site, agent = request.path_params["site"], request.path_params["agent"]
            st = self.fleet.stations.get((site, agent))
            result = None if st is None else st.results.get("diagnostics")
            if result is None:
                return JSONResponse(
                    {"ok": False, "error": f"no diagnostics from {site}/{agent} yet"},
                    404,
                    headers=headers,
                )
            body = {"site": site, "agent": agent, **diagnostics_file(result)}
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(float(result.get("at") or 0)))
            name = re.sub(r"[^A-Za-z0-9._-]", "_", f"diagnostics-{site}-{agent}-{stamp}.json")
            return Response(
                json.dumps(body, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
                media_type="application/json",
                headers={
                    **headers,
                    "content-disposition": f'attachment; filename="{name}"',
                },
            )

        async def favicon(request: Request) -> FileResponse:
            return FileResponse(
                STATIC / "favicon.svg",
                media_type="image/svg+xml",
                headers={"cache-control": "max-age=86400"},
            )

        return [
            Route("/api/diagnostics/{site}/{agent}", diagnostics),
            Route("/favicon.svg", favicon),
        ]

    async def _serve(self, stop: asyncio.Event) -> None:
        # the process owns signals and the socket: not serve(), and no sys.exit on a bind error
        family = socket.AF_INET6 if ":" in self.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.http_host, self.http_port))
        except OSError as e:
            sock.close()
            raise MadoguchiError(
                f"dashboard: cannot listen on {self.http_host}:{self.http_port}: {e.strerror}"
            ) from e
        self.http_port = int(sock.getsockname()[1])
        self.guard.bind(self.http_port)
        try:
            async with asgi_server(self.app(), [sock], timeout_graceful_shutdown=2):
                log.info("dashboard on http://%s:%d/", self.http_host, self.http_port)
                self.serving.set()
                await stop.wait()
        finally:
            sock.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set."""
        self.fleet.started_at = time.time()
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(self._mqtt(), name="dashboard-mqtt"),
                tg.create_task(self._poll_registry(), name="dashboard-registry"),
            ]
            tg.create_task(self._serve(stop), name="dashboard-http")
            await stop.wait()
            for task in background:
                task.cancel()
