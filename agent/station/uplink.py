"""The uplink: the outbox's records to the broker, the registry's acks back.

It keeps no queue of its own: every batch is read from the outbox, and a
record only stops being sent when the registry's ack marks it confirmed.
`publish()` returning (the broker's PUBACK) marks a batch `sent`; a timeout
or a lost connection simply leaves it to be sent again, with the same ids.

Topics and payloads are the MQTT contract v1 (docs/CONTRACT.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent._aio import NO_DELAY, Backoff, raise_if_cancelling
from agent._paho_tables import share as share_paho_tables
from agent.config import Config
from agent.contract.messages import MessageError, command_result, parse_ack, parse_command
from agent.contract.records import Record, envelope_of, iso_ms, utc_now
from agent.contract.topics import Topics
from agent.errors import MadoguchiError, UplinkError
from agent.logrepeat import Repeats
from agent.station.blobs import BlobSender, BlobStore
from agent.station.diagnostics import collect
from agent.station.enroll import client_identity
from agent.station.outbox import Outbox, Outgoing

log = logging.getLogger(__name__)

CommandHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
InboundHandler = Callable[[str, Any], Awaitable[bool]]


class StationView(Protocol):
    """What the uplink needs to know of the station for status and telemetry."""

    def describe(self) -> dict[str, Any]: ...

    def take_alerts(self) -> list[dict[str, Any]]: ...


class Resolver(Protocol):
    """A broker name to the addresses to try, in order (`getaddrinfo` in real life)."""

    async def __call__(self, host: str, port: int) -> list[str]: ...


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every TCP address of `host`, in the resolver's order, each once; the name itself
    when it does not resolve (the connection attempt then says why)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [host]
    out: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in out:
            out.append(address)
    return out or [host]


@dataclass(frozen=True, slots=True)
class Target:
    """One place to connect to: a configured broker and one of its addresses."""

    host: str
    port: int
    address: str

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def describe(self) -> str:
        return self.name if self.address == self.host else f"{self.name} ({self.address})"


@dataclass(slots=True)
class InFlight:
    """What a published message stands for until its PUBACK: its seqs (marked sent then)
    and the records the blob sender wants; not the records' bytes, which are in the
    message itself (holding both doubled the window's memory)."""

    seqs: list[int]
    records: list[Record]


class Window:
    """How many records messages may await their PUBACK at once. `low` while PUBACKs come
    back quickly (a LAN: the drain's memory stays small, issue #18 point 2); up to `high`
    while they take LONG_RTT_S or more (a WAN: bytes queued on the link keep it busy
    through its round trips and retransmissions, point 5); back to `low` below
    SHORT_RTT_S. The round trip is smoothed (EWMA) so one quick PUBACK changes nothing."""

    LONG_RTT_S = 0.03
    SHORT_RTT_S = 0.015
    _WEIGHT = 0.2

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, max(low, high)
        self.size = low
        self.rtt_s: float | None = None

    def observe(self, rtt_s: float) -> None:
        """One message's publish-to-PUBACK time."""
        old = rtt_s if self.rtt_s is None else self.rtt_s
        self._resize(old + self._WEIGHT * (rtt_s - old))

    def observe_waiting(self, elapsed_s: float) -> None:
        """A PUBACK still outstanding after `elapsed_s`: the round trip is at least that."""
        self._resize(max(self.rtt_s or 0.0, elapsed_s))

    def _resize(self, rtt_s: float) -> None:
        self.rtt_s = rtt_s
        size = self.size
        if rtt_s >= self.LONG_RTT_S:
            size = self.high
        elif rtt_s < self.SHORT_RTT_S:
            size = self.low
        if size != self.size:
            log.info(
                "uplink: PUBACKs take %.0f ms: %d records message(s) in flight at once",
                rtt_s * 1000,
                size,
            )
            self.size = size

    def describe(self) -> dict[str, Any]:
        return {
            "window": self.size,
            "puback_rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 1),
        }


class _Stop(Exception):
    """Raised inside the connection's task group to end it for shutdown."""


class BrokerTLS(ssl.SSLContext):
    """A client TLS context that checks the certificate against `verify_name`, whatever
    address the socket went to: a broker name with several addresses is connected to
    address by address, and each must still prove it is that name."""

    verify_name: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if self.verify_name is not None:
            kwargs["server_hostname"] = self.verify_name
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(config: Config) -> BrokerTLS | None:
    m = config.mqtt
    if m.tls_ca is None and m.tls_cert is None:
        return None
    ctx = BrokerTLS(ssl.PROTOCOL_TLS_CLIENT)  # what ssl.create_default_context sets up
    try:
        if m.tls_ca is not None:
            ctx.load_verify_locations(cafile=str(m.tls_ca))
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as e:
        raise UplinkError(f"mqtt.tls_ca: cannot load: {e}") from e
    # the configured pair, or the one certificate renewal installed (renewal.py)
    cert, key = client_identity(m.tls_cert, m.tls_key, config.agent.data_dir)
    if cert is not None:
        _refuse_expired(cert)
        try:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as e:
            raise UplinkError(f"mqtt.tls_cert / mqtt.tls_key: cannot load: {e}") from e
    return ctx


def _refuse_expired(path: Path) -> None:
    """An expired client certificate is an error that names it, not a handshake the
    broker refuses without saying why (issue #22: never lapse silently)."""
    from datetime import UTC, datetime

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return  # load_cert_chain says what is wrong with it
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise UplinkError(
            f"mqtt.tls_cert: {path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "not used (renew it: madoguchi enroll, then enroll --install)"
        )


def read_password(config: Config) -> str | None:
    pf = config.mqtt.password_file
    if pf is None:
        return None
    try:
        return pf.read_text().splitlines()[0] if pf.read_text() else ""
    except OSError as e:
        raise UplinkError(f"{pf}: mqtt.password_file: {e.strerror}") from e


class InboundFaults:
    """What went wrong with inbound messages: counts by kind, the last reason, and whether
    faults keep coming (`degraded`). Logged at WARNING once per change of kind or after a
    quiet minute, never one line per hostile message; the rest goes to DEBUG."""

    window_s = 300.0  # faults within this window count towards `degraded`
    degraded_after = 5  # this many within the window: the station says it is degraded
    quiet_s = 60.0  # a fault of the same kind after this long is logged again

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.counts: dict[str, int] = {"oversize": 0, "malformed": 0, "failed": 0}
        self.last: str | None = None
        # times of the faults within the window, bounded: a flood costs O(1) per message
        self._recent: collections.deque[float] = collections.deque(maxlen=10_000)
        self._logged: tuple[str, float] | None = None
        self._unlogged = 0

    def fault(self, kind: str, reason: str) -> None:
        now = self.clock()
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.last = f"{kind}: {reason[:200]}"
        self._expire(now)
        self._recent.append(now)
        logged = self._logged
        if logged is None or logged[0] != kind or now - logged[1] >= self.quiet_s:
            more = f" ({self._unlogged} more inbound fault(s) since the last line)"
            log.warning(
                "inbound message dropped: %s%s; %s so far",
                self.last,
                more if self._unlogged else "",
                self._total(),
            )
            self._logged = (kind, now)
            self._unlogged = 0
        else:
            self._unlogged += 1
            log.debug("inbound message dropped: %s", self.last)

    def _expire(self, now: float) -> None:
        while self._recent and now - self._recent[0] >= self.window_s:
            self._recent.popleft()

    def _total(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.counts.items())

    @property
    def degraded(self) -> str | None:
        """Why the station is degraded, or None: repeated faults say so, they never restart."""
        self._expire(self.clock())
        recent = len(self._recent)
        if recent < self.degraded_after:
            return None
        return f"{recent} inbound faults in {self.window_s:.0f} s; last {self.last}"

    def describe(self) -> dict[str, Any]:
        return {**self.counts, "last_fault": self.last, "degraded": self.degraded}


def _kind(topic: str, topics: Any) -> str:
    """A topic as it may be logged: its kind, never what a sender put in it."""
    if topic == topics.ack:
        return "ack"
    if (name := topics.command_name(topic)) is not None:
        return f"cmd/{name[:40]!r}"
    return "blob request"


class Uplink:
    """Connects, publishes batches in seq order, applies acks, answers commands."""

    offline_timeout_s = 1.5  # the offline status at shutdown: a frozen broker never answers
    shutdown_grace_s = 3.0  # stop -> connection closed, whatever the broker does
    status_check_s = 1.0  # how soon a disk_full / degraded change is noticed
    status_min_interval_s = 5.0  # a flapping state republishes the retained status this often

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        station: StationView,
        *,
        blobs: BlobStore | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix).station(config.agent.site, config.agent.name)
        self.outbox = outbox
        self.station = station
        self.connected = False
        self.up = asyncio.Event()  # set while connected (the release health check waits on it)
        self.acked = asyncio.Event()  # set by the first registry ack of this process
        self.on_connection: Callable[[bool], None] | None = None  # the station's events
        self.session = 0
        self.published_records = 0
        self.window = Window(config.mqtt.inflight_messages, config.mqtt.inflight_messages_max)
        self.connect_failures = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._recheck = asyncio.Event()  # something may have changed disk_full / degraded
        self._status_said: tuple[bool, str | None, str] | None = None  # in the retained status
        self._status_at = 0.0  # monotonic time of the last retained status
        self._commands: dict[str, CommandHandler] = {
            "ping": self._cmd_ping,
            "rebirth": self._cmd_rebirth,
            "resend": self._cmd_resend,
            "diagnostics": self._cmd_diagnostics,
        }
        self._client: aiomqtt.Client | None = None
        # set at each connection (after the birth) and each registry ack: what a
        # configuration on trial waits for (agent/station/remote_config.py)
        self.progress = asyncio.Event()
        self.acks_received = 0
        self._after_result: list[Callable[[], None]] = []
        self._status_forced = False  # republish_status() was called
        self._subscriptions: list[tuple[str, InboundHandler]] = []
        self._started = time.monotonic()
        self.inbound = InboundFaults()
        self.fault: str | None = None  # the last failure that was not the broker's
        #: where a name's addresses come from (a fake in tests: agent.testing.StaticResolver)
        self.resolve: Resolver = resolve_addresses
        self.brokers = config.mqtt.brokers()
        self.broker: Target | None = None  # connected to, or None
        self._turn = 0  # which of the targets the next attempt goes to
        self._attempt: Target | None = None  # the target of the attempt under way
        self._fault_logged: str | None = None
        # photos: chunked blob transfer beside the records (agent/station/blobs.py)
        self.blobs = None if blobs is None else BlobSender(blobs, self.topics)

    # -- for the station ---------------------------------------------------------

    def wake(self) -> None:
        """New records are in the outbox."""
        self._wake.set()
        self._recheck.set()

    def add_subscription(self, topic_filter: str, handler: InboundHandler) -> None:
        """Other parts of the agent take their own inbound topics (e.g. reference datasets):
        subscribed at every connection; `handler(topic, payload)` says True when it was its."""
        self._subscriptions.append((topic_filter, handler))

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """For other parts of the agent (a release download's `missing`): False when
        not connected (the caller asks again later)."""
        client = self._client
        if client is None or not self.connected:
            return False
        try:
            await client.publish(topic, payload, qos=qos)
        except aiomqtt.MqttError:
            return False
        return True

    def add_command(self, name: str, handler: CommandHandler) -> None:
        """Other parts of the agent answer their own `cmd/{name}` (e.g. capture_photo)."""
        self._commands[name] = handler

    async def publish_or_raise(self, topic: str, payload: bytes) -> None:
        """One QoS 1 message on the current connection, awaiting its PUBACK (certificate
        renewal's CSR); UplinkError when there is none or it fails (`publish` says False)."""
        client = self._client
        if client is None or not self.connected:
            raise UplinkError("not connected")
        try:
            await client.publish(topic, payload, qos=1, timeout=self.config.mqtt.publish_timeout_s)
        except aiomqtt.MqttError as e:
            raise UplinkError(f"broker {self.config.mqtt.host}:{self.config.mqtt.port}: {e}") from e

    def republish_status(self) -> None:
        """Something in the station's description changed that the retained status should
        say (a configuration confirmed): published again, within the status rate limit."""
        self._status_forced = True
        self._recheck.set()

    def after_result(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the result of the command being answered is published (or its
        publish failed): cmd/config restarts the station only after saying so."""
        self._after_result.append(fn)

    async def wait_connected(self) -> None:
        await self.up.wait()

    def _set_connected(self, connected: bool) -> None:
        changed = connected != self.connected
        self.connected = connected
        if connected:
            self.up.set()
        else:
            self.up.clear()
        if changed and self.on_connection is not None:
            self.on_connection(connected)

    def describe(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "broker": None if self.broker is None else self.broker.name,
            "broker_address": None if self.broker is None else self.broker.address,
            "session": self.session,
            "published_records": self.published_records,
            **self.window.describe(),
            "connect_failures": self.connect_failures,
            "last_error": self.last_error,
            "inbound": self.inbound.describe(),
            "degraded": self.degraded,
            **({} if self.blobs is None else self.blobs.describe()),
        }

    # -- the connection loop ---------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop` is set; then say offline and disconnect, in bounded time.

        Whatever the broker does (frozen, half-open, slow to CONNACK), the connection gets
        `shutdown_grace_s` after `stop` to say offline and close; then it is cancelled and the
        broker publishes our will (offline) whenever it answers again.
        """
        conn = asyncio.create_task(self._run(stop), name="uplink-connection")
        stopping = asyncio.create_task(stop.wait(), name="uplink-stopping")
        try:
            await asyncio.wait({conn, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not conn.done():
                await asyncio.wait({conn}, timeout=self.shutdown_grace_s)
            if not conn.done():
                log.warning(
                    "broker %s did not let us close within %.1f s; closing the connection",
                    "?" if self._attempt is None else self._attempt.describe(),
                    self.shutdown_grace_s,
                )
                conn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await conn
                return
            await conn
        finally:
            stopping.cancel()
            conn.cancel()

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(cap=self.config.mqtt.backoff_max_s)
        # an unreachable broker is logged once per change, then summarised (agent/logrepeat.py)
        names = ", ".join(Target(h, p, h).name for h, p in self.brokers)
        repeats = Repeats(log, f"broker{'s' if len(self.brokers) > 1 else ''} {names}")
        failed_in_turn = 0  # targets that failed one after another since the last connection
        while not stop.is_set():
            targets = await self._targets()
            target = self._attempt = targets[self._turn % len(targets)]
            try:
                # read each attempt: a key or password file fixed in place heals the uplink
                tls = tls_context(self.config)
                password = read_password(self.config)
                self.session = await self.outbox.bump_session()
            except MadoguchiError as e:  # a bad key file, a failing outbox: say so, retry
                self._fault(str(e))
            else:
                if tls is not None:
                    tls.verify_name = target.host
                client = self._client_for(self.session, tls, password, target)
                next_now = False
                try:
                    async with client:
                        self._client = client
                        self.broker = target
                        failed_in_turn = 0
                        self._set_connected(True)
                        self.last_error = None
                        self.fault = self._fault_logged = None
                        backoff.reset()
                        repeats.ok("reachable again")
                        stopping = False
                        try:
                            await self._connected(client, stop)
                        except* _Stop:
                            stopping = True
                        if stopping:
                            await self._say_offline(client)
                            return
                except* aiomqtt.MqttError as group:
                    # which of several: the log line's subject names them all
                    where = f"{target.describe()}: " if len(targets) > 1 else ""
                    self.last_error = f"{where}{group.exceptions[0]}"
                    self.connect_failures += 1
                    repeats.failed("unreachable", self.last_error)
                    # the next attempt goes to the next broker / address; once each has
                    # failed in turn, the backoff below waits as it does for one broker
                    self._turn += 1
                    failed_in_turn += 1
                    next_now = failed_in_turn % len(targets) != 0
                except* MadoguchiError as group:  # the outbox failing under a batch or an ack
                    self._fault(str(group.exceptions[0]))
                except* Exception as group:  # a bug: logged with its traceback, never a restart
                    bug = group.exceptions[0]
                    self._fault(f"{type(bug).__name__}: {bug}", bug)
                finally:
                    self._set_connected(False)
                    self._client = None
                    self.broker = None
                if next_now:
                    continue
            delay = backoff.next()
            log.debug("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _targets(self) -> list[Target]:
        """Every broker's addresses, in the configured order, resolved again each time (a
        cluster's DNS name may change its addresses while the station runs)."""
        out: list[Target] = []
        for host, port in self.brokers:
            out += [Target(host, port, a) for a in await self.resolve(host, port)]
        return out

    def _fault(self, reason: str, bug: BaseException | None = None) -> None:
        """A failure that is not the broker's: the uplink stays, retries, and says why."""
        self.last_error = self.fault = reason[:300]
        self._recheck.set()
        self.connect_failures += 1
        if self.fault != self._fault_logged:
            log.error("uplink: %s; retrying with backoff", self.fault, exc_info=bug)
            self._fault_logged = self.fault

    @property
    def degraded(self) -> str | None:
        """Why the uplink is not doing its whole job, or None (status, telemetry, STATUS=)."""
        if self.fault is not None and not self.connected:
            return f"uplink: {self.fault}"
        return self.inbound.degraded

    def _client_for(
        self, session: int, tls: ssl.SSLContext | None, password: str | None, target: Target
    ) -> aiomqtt.Client:
        """The client of one attempt. A persistent session (`mqtt.persistent_session`) keeps
        the subscriptions, and the acks sent to them while we are away, on the broker under
        our stable client id: 3.1.1 clean_session=false, 5 clean_start=false with an expiry."""
        m = self.config.mqtt
        will = aiomqtt.Will(
            self.topics.status,
            json.dumps({"state": "offline", "session": session}),
            qos=1,
            retain=True,
        )
        protocol = aiomqtt.ProtocolVersion.V5 if m.protocol == "5" else aiomqtt.ProtocolVersion.V311
        v5 = m.protocol == "5"
        options: dict[str, Any] = {}
        if v5:
            share_paho_tables()  # paho builds a Properties for every MQTT 5 packet
        if v5 and m.persistent_session:
            expiry = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            expiry.SessionExpiryInterval = m.session_expiry_s
            options = {"clean_start": False, "properties": expiry}
        client = aiomqtt.Client(
            target.address,
            target.port,
            identifier=f"madoguchi-{self.config.agent.site}-{self.config.agent.name}",
            protocol=protocol,
            clean_session=None if v5 else not m.persistent_session,
            **options,
            will=will,
            keepalive=m.keepalive_s,
            tls_context=tls,
            username=m.username,
            password=password,
            timeout=m.publish_timeout_s,
            max_queued_outgoing_messages=64,
            # paho holds back publishes past its own in-flight limit (20 by default)
            max_inflight_messages=self.window.high + 8,
            socket_options=NO_DELAY,
        )
        # the window of envelopes, the birth, telemetry and blob chunks are all awaited
        # publishes: aiomqtt warns above 10 pending, which a full window reaches
        client.pending_calls_threshold = self.window.high + 16
        return client

    async def _connected(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        await client.subscribe(self.topics.ack, qos=1)
        await client.subscribe(self.topics.commands, qos=1)
        if self.blobs is not None:
            await client.subscribe(self.topics.blobs_missing, qos=1)
        for topic_filter, _ in self._subscriptions:
            await client.subscribe(topic_filter, qos=1)
        await self._birth(client)
        # said once subscribed and born: a command or ack sent from now on is received
        where = "?" if self.broker is None else self.broker.describe()
        log.info("connected to %s (session %d)", where, self.session)
        await self.outbox.reset_sent()
        self._wake.set()
        self.progress.set()

        async def until_stop() -> None:
            await stop.wait()
            raise _Stop

        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._receive(client), name="uplink-receive")
            tg.create_task(self._send(client), name="uplink-send")
            tg.create_task(self._telemetry(client), name="uplink-telemetry")
            tg.create_task(self._status_on_change(client), name="uplink-status")
            tg.create_task(until_stop(), name="uplink-stop")
            if self.blobs is not None:
                tg.create_task(self.blobs.run(client, self.outbox), name="uplink-blobs")

    def _status_state(self) -> tuple[bool, str | None, str]:
        """What the retained status says beyond the birth itself: full disk, degraded, and
        the dataset versions held and refused (so `madoguchi refdata status` and the
        dashboard see a version applied after the connect)."""
        sets = self.station.describe().get("datasets") or {}
        held = sorted((k, v.get("version")) for k, v in (sets.get("held") or {}).items())
        refused = sorted((k, v.get("version")) for k, v in (sets.get("refused") or {}).items())
        return self.outbox.disk_full, self.degraded, repr((held, refused))

    async def _birth(self, client: aiomqtt.Client) -> None:
        said = self._status_state()
        stats = await self.outbox.stats()
        body = {
            "state": "online",
            "session": self.session,
            "ts": iso_ms(utc_now()),
            "broker": None if self.broker is None else self.broker.name,
            "telemetry_interval_s": self.config.agent.telemetry_interval_s,
            **self.station.describe(),
            "outbox": stats.as_dict(),
            "degraded": said[1],
        }
        await client.publish(self.topics.status, json.dumps(body), qos=1, retain=True)
        self._status_said, self._status_at = said, time.monotonic()

    async def _status_on_change(self, client: aiomqtt.Client) -> None:
        """Republish the retained status when disk_full or degraded changes, so that a
        dashboard (or anyone reading the retained message) learns of a disk that filled
        after the connect; at most every `status_min_interval_s`, then with the latest
        state. The outbox has no event for its state, so it is also looked at every
        `status_check_s` (two attribute reads)."""
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancel at stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.status_check_s):
                    await self._recheck.wait()
            self._recheck.clear()
            if self._status_state() == self._status_said and not self._status_forced:
                continue
            pause = self._status_at + self.status_min_interval_s - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)  # rate limit
            if self._status_state() != self._status_said or self._status_forced:
                self._status_forced = False
                await self._birth(client)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        body = {
            "state": "offline",
            "session": self.session,
            "ts": iso_ms(utc_now()),
            "reason": "shutdown",
        }
        try:
            await client.publish(
                self.topics.status,
                json.dumps(body),
                qos=1,
                retain=True,
                timeout=self.offline_timeout_s,
            )
        except aiomqtt.MqttError as e:
            log.warning("could not publish offline status: %s", e)

    # -- records out -------------------------------------------------------------------

    async def _send(self, client: aiomqtt.Client) -> None:
        """Publish what the outbox holds, in seq order, with up to `self.window.size`
        messages awaiting their PUBACK; a message's records are marked sent at its PUBACK.
        Records in flight are not read again (`after_seq`); resends wait for an empty window."""
        m = self.config.mqtt
        resend_after = self.config.outbox.resend_after_s
        window: collections.deque[tuple[InFlight, asyncio.Task[float]]] = collections.deque()
        try:
            while True:
                raise_if_cancelling()
                self._wake.clear()
                after = window[-1][0].seqs[-1] if window else 0
                batch = await self.outbox.next_wire_batch(
                    m.batch_max_records, resend_after, after_seq=after
                )
                if batch:
                    messages = self._split(batch)
                    # each record's wire bytes are in its envelope now: the window holds
                    # them once, not twice (RSS while draining, issue #18)
                    del batch
                    messages.reverse()
                    while messages:
                        sent, payload = messages.pop()
                        publish = self._publish_timed(client, payload)
                        del payload
                        # tasks start in creation order: the wire order is seq order
                        window.append((sent, asyncio.create_task(publish, name="publish")))
                        while len(window) >= self.window.size:
                            if not await self._oldest_slow(window[0][1]):
                                await self._settle(*window.popleft())
                    continue
                if window:
                    while window:
                        await self._settle(*window.popleft())
                    continue  # the window is empty: resends are due again
                due = await self.outbox.next_resend_at(resend_after)
                timeout = None if due is None else max(0.0, due - time.time()) + 0.01
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
                # coincides with its timeout, and this loop would then never end (shutdown hang)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
        finally:
            for _, task in window:  # the connection is going: all is sent again on the next
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the failure that ends it is already raised
                task.cancel()

    async def _publish_timed(self, client: aiomqtt.Client, payload: bytes) -> float:
        """Publish one records message (QoS 1); its publish-to-PUBACK time."""
        t0 = time.monotonic()
        await client.publish(
            self.topics.records, payload, qos=1, timeout=self.config.mqtt.publish_timeout_s
        )
        return time.monotonic() - t0

    async def _oldest_slow(self, oldest: asyncio.Task[float]) -> bool:
        """Wait for the oldest message's PUBACK; True (the window has grown) if it takes
        LONG_RTT_S and the window can grow: a WAN's first round trip need not be waited
        out with a LAN's window."""
        w = self.window
        if oldest.done() or w.size >= w.high:
            return False
        done, _ = await asyncio.wait({oldest}, timeout=w.LONG_RTT_S)
        if done:
            return False
        w.observe_waiting(w.LONG_RTT_S)
        return True

    async def _settle(self, sent: InFlight, publish: asyncio.Task[float]) -> None:
        """A message's PUBACK (or its failure, which ends the connection): its records are sent."""
        self.window.observe(await publish)
        await self.outbox.mark_sent(sent.seqs)
        self.published_records += len(sent.seqs)
        if self.blobs is not None:
            self.blobs.records_sent(sent.records)

    def _split(self, batch: list[Outgoing]) -> list[tuple[InFlight, bytes]]:
        """Cut a batch into messages of at most `batch_max_bytes` (one record at the least)."""
        site, name = self.config.agent.site, self.config.agent.name
        limit = self.config.mqtt.batch_max_bytes
        out: list[tuple[InFlight, bytes]] = []
        sent = InFlight([], [])
        parts: list[bytes] = []
        size = 120
        for record in batch:
            part = record.wire
            rsize = len(part) + 1
            if parts and size + rsize > limit:
                out.append((sent, envelope_of(site, name, parts)))
                sent, parts, size = InFlight([], []), [], 120
            sent.seqs.append(record.seq)
            if record.record is not None:
                sent.records.append(record.record)
            parts.append(part)
            size += rsize
        if parts:
            out.append((sent, envelope_of(site, name, parts)))
        return out

    # -- acks and commands in ------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Every inbound message, whatever its bytes: one that is too big, malformed or whose
        handler fails is counted and logged once per change, and the loop goes on. Only the
        connection's own errors (aiomqtt.MqttError) and cancellation end it."""
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            size = len(payload) if isinstance(payload, bytes | bytearray | str) else 0
            if size > self.config.mqtt.max_inbound_bytes:
                self.inbound.fault(
                    "oversize",
                    f"{_kind(topic, self.topics)}: {size} bytes over the "
                    f"mqtt.max_inbound_bytes cap of {self.config.mqtt.max_inbound_bytes}",
                )
                continue
            try:
                await self._dispatch(client, topic, payload)
            except aiomqtt.MqttError:
                raise
            except Exception as e:  # no input may end the station
                self.inbound.fault(
                    "failed", f"{_kind(topic, self.topics)} handler: {type(e).__name__}: {e}"
                )
            self._recheck.set()  # an ack may have written (disk back), a fault may degrade
            raise_if_cancelling()

    async def _dispatch(self, client: aiomqtt.Client, topic: str, payload: Any) -> None:
        topics = self.topics
        if topic == topics.ack:
            await self._apply_ack(payload)
        elif (name := topics.command_name(topic)) is not None:
            await self._command(client, name, payload)
        elif await self._subscribed(topic, payload):
            pass
        elif self.blobs is not None:
            self.blobs.handle(topic, payload)

    async def _subscribed(self, topic: str, payload: Any) -> bool:
        for _, handler in self._subscriptions:
            if await handler(topic, payload):
                return True
        return False

    async def _apply_ack(self, payload: Any) -> None:
        try:
            ids = parse_ack(payload, self.config.mqtt.max_inbound_bytes).ids
        except MessageError as e:
            self.inbound.fault("malformed", f"ack: {e}")
            return
        n = await self.outbox.confirm(ids)
        self.acked.set()
        self.acks_received += 1
        self.progress.set()
        log.debug("registry confirmed %d of %d ids", n, len(ids))
        if self.blobs is not None:
            await self.blobs.confirmed(ids)

    async def _command(self, client: aiomqtt.Client, name: str, payload: Any) -> None:
        request_id = None
        try:
            command = parse_command(name, payload, self.config.mqtt.max_inbound_bytes)
            request_id, body = command.request_id, command.args
            handler = self._commands.get(name)
            if handler is None:
                result: dict[str, Any] = {
                    "ok": False,
                    "error": f"unknown command '{name}'; known: {sorted(self._commands)}",
                }
            else:
                result = {"ok": True, **await handler(body)}
        except MessageError as e:
            self.inbound.fault("malformed", f"cmd/{name}: {e}")
            result = {"ok": False, "error": f"bad command payload: {e}"}
        except ValueError as e:
            result = {"ok": False, "error": f"bad command payload: {str(e)[:200]}"}
        except aiomqtt.MqttError:
            raise
        except Exception as e:  # answered, counted; never ends the connection
            self.inbound.fault("failed", f"cmd/{name}: {type(e).__name__}: {e}")
            result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        try:
            await client.publish(
                self.topics.command_result(name), command_result(request_id, result), qos=1
            )
        finally:
            after, self._after_result = self._after_result, []
            for fn in after:
                fn()
        raise_if_cancelling()  # the receive loop would otherwise wait for the next message

    async def _cmd_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "ts": iso_ms(utc_now()), "session": self.session}

    async def _cmd_rebirth(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._client is None:
            raise UplinkError("not connected")
        await self._birth(self._client)
        return {"session": self.session}

    async def _cmd_resend(self, body: dict[str, Any]) -> dict[str, Any]:
        n = await self.outbox.reset_sent()
        self._wake.set()
        return {"requeued": n}

    async def _cmd_diagnostics(self, body: dict[str, Any]) -> dict[str, Any]:
        import platform
        import sys

        stats = await self.outbox.stats()
        return {
            "outbox": stats.as_dict(),
            **self.station.describe(),
            "uplink": self.describe(),
            "madoguchi": _version("madoguchi"),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "aiomqtt": _version("aiomqtt"),
            "paho-mqtt": _version("paho-mqtt"),
            # versions, disk, temperature / throttling, clock (issue #22)
            **await asyncio.to_thread(collect, self.config.agent.data_dir),
        }

    # -- telemetry -----------------------------------------------------------------

    async def _telemetry(self, client: aiomqtt.Client) -> None:
        interval = self.config.agent.telemetry_interval_s
        while True:
            await asyncio.sleep(interval)
            await client.publish(self.topics.telemetry, json.dumps(await self.telemetry()), qos=0)

    async def telemetry(self) -> dict[str, Any]:
        stats = await self.outbox.stats()
        return {
            "ts": iso_ms(utc_now()),
            "session": self.session,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "telemetry_interval_s": self.config.agent.telemetry_interval_s,
            "rss_bytes": rss_bytes(),
            "outbox": stats.as_dict(),
            "uplink": self.describe(),
            **self.station.describe(),
            "alerts": self.station.take_alerts(),
        }


def rss_bytes() -> int:
    """Resident set size from /proc (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
