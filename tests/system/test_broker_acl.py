"""The fleet broker configuration (provisioning/broker/) on a real mosquitto with TLS.

Stations get their identity from `madoguchi enroll`, signed by a test CA; the
registry and dashboard roles get theirs from the same CA. Every refusal is
checked against a marker sent after it on the same path, so "not delivered"
is a fact observed in order, not a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.cli.main import main as cli
from agent.testing import (
    Pty,
    free_port,
    running_registry,
    running_station,
    start_mosquitto,
    stop_mosquitto,
)
from tests.support.pki import TestCA

ROOT = Path(__file__).resolve().parents[2]
BROKER_DIR = ROOT / "provisioning" / "broker"
P = "madoguchi/v1"

pytestmark = pytest.mark.broker


class TlsBroker:
    """mosquitto with the shipped madoguchi.conf and acl, paths moved into a temp dir."""

    def __init__(self, workdir: Path, ca: TestCA, acl: str | None = None) -> None:
        # Started as root, mosquitto drops to its own user, which cannot enter
        # pytest's 0700 temp root: give it a directory of its own, as in /etc.
        self.owner = _mosquitto_user() if os.geteuid() == 0 else None
        if self.owner is not None:
            self.dir = Path(tempfile.mkdtemp(prefix="madoguchi-broker-"))
        else:
            self.dir = workdir / "mosquitto"
            self.dir.mkdir()
        self.port = free_port()
        ca.write(self.dir / "ca.crt")
        cert, key = ca.identity("localhost", self.dir, server=True)
        cert.rename(self.dir / "broker.crt")
        key.rename(self.dir / "broker.key")
        (self.dir / "acl").write_text((BROKER_DIR / "acl").read_text() if acl is None else acl)
        conf = (BROKER_DIR / "madoguchi.conf").read_text()
        assert "listener 8883\n" in conf
        conf = conf.replace("/etc/mosquitto/madoguchi/", f"{self.dir}/")
        conf = conf.replace("listener 8883\n", f"listener {self.port} 127.0.0.1\n")
        self.log = self.dir / "mosquitto.log"
        conf += f"log_dest file {self.log}\nlog_type all\n"
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(conf)
        if self.owner is not None:
            for p in [self.dir, *self.dir.iterdir()]:
                os.chown(p, *self.owner)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_mosquitto(self.conf, self.port, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_mosquitto(self.proc)
        if self.owner is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _mosquitto_user() -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


class Fleet:
    def __init__(self, tmp: Path, acl: str | None = None) -> None:
        self.tmp = tmp
        self.ca = TestCA()
        self.ca_file = self.ca.write(tmp / "fleet-ca.crt")
        self.broker = TlsBroker(tmp, self.ca, acl)

    def enroll_station(self, site: str, name: str) -> tuple[Path, Path]:
        """As on a Pi: enroll makes key + CSR, the CA signs, enroll installs the cert."""
        out = self.tmp / "stations" / f"{site}_{name}"
        assert cli(["enroll", "--site", site, "--name", name, "--out", str(out)]) == 0
        signed = self.ca.sign_csr(out / "tls.csr", self.tmp / f"{site}_{name}-signed.crt")
        assert cli(["enroll", "--install", str(signed), "--out", str(out)]) == 0
        return out / "tls.crt", out / "tls.key"

    def role(self, cn: str) -> tuple[Path, Path]:
        return self.ca.identity(cn, self.tmp / "roles")

    def tls(self, cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def client(
        self, ident: tuple[Path, Path], client_id: str, will: aiomqtt.Will | None = None
    ) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.broker.port,
            identifier=client_id,
            tls_context=self.tls(*ident),
            will=will,
            timeout=10,
        )

    def persistent(self, ident: tuple[Path, Path], client_id: str) -> aiomqtt.Client:
        """MQTT 5, clean_start false, a session that outlives the connection (as the
        registry's single consumer connects)."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        return aiomqtt.Client(
            "127.0.0.1",
            self.broker.port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            tls_context=self.tls(*ident),
            timeout=10,
        )

    def connected_as(self) -> list[str]:
        """The client ids the broker logged connections under, in order."""
        return re.findall(r"New client connected from \S+ as (\S+) ", self.broker.log.read_text())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    f.broker.start()
    yield f
    f.broker.stop()


async def collect_until(
    client: aiomqtt.Client, marker: bytes, timeout: float = 15.0
) -> list[tuple[str, bytes]]:
    """Every message this client gets, up to and including the one whose payload is marker."""
    got: list[tuple[str, bytes]] = []

    async def run() -> None:
        async for m in client.messages:
            assert isinstance(m.payload, bytes)
            got.append((str(m.topic), m.payload))
            if m.payload == marker:
                return

    await asyncio.wait_for(run(), timeout)
    return got


@contextlib.asynccontextmanager
async def connected(*clients: aiomqtt.Client) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        yield


async def test_station_records_reach_the_registry(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    registry = fleet.client(fleet.role("registry"), "registry")
    async with connected(a, registry):
        await registry.subscribe(f"{P}/+/+/records", qos=1)
        await a.publish(f"{P}/site1/a/records", b"batch-from-a", qos=1)
        got = await collect_until(registry, b"batch-from-a")
    assert got == [(f"{P}/site1/a/records", b"batch-from-a")]


async def test_photo_blobs_flow_between_a_station_and_the_registry_only(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    b = fleet.client(fleet.enroll_station("site1", "b"), "station-b")
    registry = fleet.client(fleet.role("registry"), "registry")
    rid = "0190c8e4-0000-7000-8000-000000000001"
    async with connected(a, b, registry):
        await registry.subscribe(f"{P}/+/+/blobs/+/+", qos=1)
        await a.subscribe(f"{P}/site1/a/blobs/+/missing", qos=1)
        await b.subscribe(f"{P}/site1/a/blobs/#", qos=1)  # another station: refused
        await b.publish(f"{P}/site1/a/blobs/{rid}/0", b"forged chunk", qos=1)
        await a.publish(f"{P}/site1/a/blobs/{rid}/manifest", b"manifest", qos=1)
        await a.publish(f"{P}/site1/a/blobs/{rid}/0", b"chunk-0", qos=1)
        seen_by_registry = await collect_until(registry, b"chunk-0")
        await registry.publish(f"{P}/site1/a/blobs/{rid}/missing", b"missing-1", qos=1)
        seen_by_a = await collect_until(a, b"missing-1")
        await registry.publish(f"{P}/site1/b/blobs/{rid}/missing", b"for-b", qos=1)
        await b.subscribe(f"{P}/site1/b/blobs/+/missing", qos=1)
        await registry.publish(f"{P}/site1/b/blobs/{rid}/missing", b"for-b-2", qos=1)
        seen_by_b = await collect_until(b, b"for-b-2")
    assert seen_by_registry == [
        (f"{P}/site1/a/blobs/{rid}/manifest", b"manifest"),
        (f"{P}/site1/a/blobs/{rid}/0", b"chunk-0"),
    ]
    assert seen_by_a == [(f"{P}/site1/a/blobs/{rid}/missing", b"missing-1")]
    assert seen_by_b == [(f"{P}/site1/b/blobs/{rid}/missing", b"for-b-2")]  # none of A's


async def test_station_cannot_publish_as_another_station(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    fleet.enroll_station("site1", "b")
    registry = fleet.client(fleet.role("registry"), "registry")
    dashboard = fleet.client(fleet.role("dashboard"), "dashboard")
    async with connected(a, registry, dashboard):
        await registry.subscribe(f"{P}/#", qos=1)
        await dashboard.subscribe(f"{P}/#", qos=1)
        for suffix in ("records", "status", "telemetry", "cmd/ping/result"):
            await a.publish(f"{P}/site1/b/{suffix}", b"forged", qos=1)
            await a.publish(f"{P}/site2/a/{suffix}", b"forged", qos=1)
        await a.publish(f"{P}/site1/a/records", b"marker", qos=1)
        await a.publish(f"{P}/site1/a/status", b"marker-status", qos=1)
        seen_by_registry = await collect_until(registry, b"marker-status")
        seen_by_dashboard = await collect_until(dashboard, b"marker-status")
    assert seen_by_registry == [
        (f"{P}/site1/a/records", b"marker"),
        (f"{P}/site1/a/status", b"marker-status"),
    ]
    assert seen_by_dashboard == [(f"{P}/site1/a/status", b"marker-status")]


async def test_station_cannot_read_another_stations_acks(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    b = fleet.client(fleet.enroll_station("site1", "b"), "station-b")
    registry = fleet.client(fleet.role("registry"), "registry")
    async with connected(a, b, registry):
        await b.subscribe(f"{P}/site1/b/ack", qos=1)
        for topic in (f"{P}/site1/b/ack", f"{P}/site1/+/ack", f"{P}/#", "#"):
            await a.subscribe(topic, qos=1)
        await a.subscribe(f"{P}/site1/a/ack", qos=1)
        await registry.publish(f"{P}/site1/b/ack", b'{"ids": ["for-b"]}', qos=1)
        await registry.publish(f"{P}/site1/a/ack", b"for-a", qos=1)
        seen_by_a = await collect_until(a, b"for-a")
        seen_by_b = await collect_until(b, b'{"ids": ["for-b"]}')
    assert seen_by_b == [(f"{P}/site1/b/ack", b'{"ids": ["for-b"]}')]  # it was delivered ...
    assert all(payload == b"for-a" for _, payload in seen_by_a)  # ... but not to A
    assert (f"{P}/site1/a/ack", b"for-a") in seen_by_a


async def test_station_cannot_publish_acks(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    b = fleet.client(fleet.enroll_station("site1", "b"), "station-b")
    registry = fleet.client(fleet.role("registry"), "registry")
    async with connected(a, b, registry):
        await a.subscribe(f"{P}/site1/a/ack", qos=1)
        await b.subscribe(f"{P}/site1/b/ack", qos=1)
        # A forged ack would make a station purge records the registry never stored.
        await a.publish(f"{P}/site1/a/ack", b"forged", qos=1)
        await a.publish(f"{P}/site1/b/ack", b"forged", qos=1)
        await registry.publish(f"{P}/site1/a/ack", b"real", qos=1)
        await registry.publish(f"{P}/site1/b/ack", b"real", qos=1)
        seen_by_a = await collect_until(a, b"real")
        seen_by_b = await collect_until(b, b"real")
    assert seen_by_a == [(f"{P}/site1/a/ack", b"real")]
    assert seen_by_b == [(f"{P}/site1/b/ack", b"real")]
    # The broker says so in its log (what the end-to-end test checks is absent).
    assert "Denied PUBLISH from site1/a" in fleet.broker.log.read_text()  # the CN is the id


async def test_commands_only_from_the_dashboard(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    b = fleet.client(fleet.enroll_station("site1", "b"), "station-b")
    dashboard = fleet.client(fleet.role("dashboard"), "dashboard")
    async with connected(a, b, dashboard):
        await b.subscribe(f"{P}/site1/b/cmd/#", qos=1)
        await dashboard.subscribe(f"{P}/+/+/cmd/+/result", qos=1)
        await a.publish(f"{P}/site1/b/cmd/resend", b"forged", qos=1)
        await dashboard.publish(f"{P}/site1/b/cmd/ping", b"ping-1", qos=1)
        seen_by_b = await collect_until(b, b"ping-1")
        await b.publish(f"{P}/site1/b/cmd/ping/result", b"pong-1", qos=1)
        seen_by_dashboard = await collect_until(dashboard, b"pong-1")
    assert seen_by_b == [(f"{P}/site1/b/cmd/ping", b"ping-1")]
    assert seen_by_dashboard == [(f"{P}/site1/b/cmd/ping/result", b"pong-1")]


def mqtt_connect_over_tls(ctx: ssl.SSLContext, port: int) -> bytes:
    """TLS handshake, MQTT 3.1.1 CONNECT, and the first bytes back (a CONNACK if let in).

    Done on a plain socket because the TLS 1.3 alert that refuses a client
    certificate arrives after the handshake, and aiomqtt only reports a timeout.
    """
    client_id = b"probe"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(body)]) + body
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(packet)
        return tls.recv(4)


def test_fleet_certificate_gets_a_connack(fleet: Fleet) -> None:
    """The control for the two refusals below: same probe, a good certificate."""
    ctx = fleet.tls(*fleet.enroll_station("site1", "a"))
    assert mqtt_connect_over_tls(ctx, fleet.broker.port) == b"\x20\x02\x00\x00"


def refused(ctx: ssl.SSLContext, broker: TlsBroker) -> str:
    """Probe with TLS 1.3 (the alert may race the close) and TLS 1.2 (the exact alert)."""
    try:
        answer = mqtt_connect_over_tls(ctx, broker.port)
    except OSError:  # ssl.SSLError included
        answer = b""
    assert answer == b"", "got an answer instead of being disconnected"
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError) as err:
        mqtt_connect_over_tls(ctx, broker.port)
    return str(err.value)


def test_certificate_of_another_ca_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    stranger = TestCA("some other CA")
    cert, key = stranger.identity("site1/a", tmp_path / "stranger")
    assert "UNKNOWN_CA" in refused(fleet.tls(cert, key), fleet.broker)
    assert "certificate verify failed" in fleet.broker.log.read_text()


def test_no_client_certificate_is_refused(fleet: Fleet) -> None:
    ctx = ssl.create_default_context(cafile=str(fleet.ca_file))
    alert = refused(ctx, fleet.broker)
    assert "HANDSHAKE_FAILURE" in alert or "CERTIFICATE_REQUIRED" in alert
    assert "peer did not return a certificate" in fleet.broker.log.read_text()


async def test_agent_and_registry_end_to_end_under_the_acl(fleet: Fleet, tmp_path: Path) -> None:
    """The real agent (enrolled identity) and the reference registry (its role) on the
    fleet broker: records are stored and acked, and the broker denied nothing."""
    cert, key = fleet.enroll_station("toda-city-hall-1f", "station-03")
    scanner = Pty(tmp_path / "ttyScanner")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
site = "toda-city-hall-1f"
name = "station-03"
data_dir = "{tmp_path / "data"}"
telemetry_interval_s = 0.2

[mqtt]
host = "localhost"
port = {fleet.broker.port}
tls_ca = "{fleet.ca_file}"
tls_cert = "{cert}"
tls_key = "{key}"
backoff_max_s = 1

[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
port = "{scanner.link}"
host_ack = "\\u0006"
""")
    texts = ["111122410000012345", "111122410000012346"]
    try:
        async with (
            running_registry(
                fleet.broker.port,
                tmp_path / "registry.db",
                host="localhost",
                tls_context=fleet.tls(*fleet.role("registry")),
            ) as probe,
            running_station(cfg) as run,
        ):
            for t in texts:
                scanner.scan(t)
                assert await scanner.aread(1) == b"\x06"
            got = await probe.wait_for(len(texts))
            assert [r["data"]["text"] for r in got] == texts
            outbox = run.station.outbox
            assert outbox is not None
            for _ in range(200):  # the acks come back through the ACL
                if (await outbox.stats()).confirmed == len(texts):
                    break
                await asyncio.sleep(0.05)
            assert (await outbox.stats()).confirmed == len(texts)
    finally:
        scanner.close()
    log = fleet.broker.log.read_text()
    assert "toda-city-hall-1f/station-03" in log  # the CN became the user name
    assert "Denied" not in log, [line for line in log.splitlines() if "Denied" in line]


# -- identity is the certificate: the client id is the CN (use_username_as_clientid) ------


def test_shipped_config_forces_the_client_id_to_the_certificate_cn() -> None:
    conf = (BROKER_DIR / "madoguchi.conf").read_text().split("listener 8883\n", 1)[1]
    settings = {
        line.split()[0]: line.split()[1:] for line in conf.splitlines() if line[:1].isalpha()
    }
    assert settings["use_identity_as_username"] == ["true"]
    assert settings["use_username_as_clientid"] == ["true"]
    assert settings["require_certificate"] == ["true"]


async def test_client_ids_become_the_certificate_cn(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "whatever-a-asks-for")
    registry = fleet.client(fleet.role("registry"), "madoguchi-registry")
    async with connected(a, registry):
        await registry.subscribe(f"{P}/+/+/records", qos=1)
        await a.publish(f"{P}/site1/a/records", b"from-a", qos=1)
        await collect_until(registry, b"from-a")
    assert fleet.connected_as() == ["site1/a", "registry"]


# the id `madoguchi registry` asks for, and the one the broker gives it (its CN)
@pytest.mark.parametrize("stolen_id", ["madoguchi-registry", "registry"])
async def test_station_cannot_take_the_registrys_persistent_session(
    fleet: Fleet, stolen_id: str
) -> None:
    """A station connecting with the registry's client id (clean_start false, as the
    registry does) gets a session of its own: the 3 records queued for the registry
    while it was away still reach it."""
    registry_id = fleet.role("registry")
    station = fleet.client(fleet.enroll_station("site1", "a"), "madoguchi-site1-a")
    evil = fleet.persistent(fleet.enroll_station("site1", "evil"), stolen_id)
    dashboard = fleet.client(fleet.role("dashboard"), "dashboard")

    async with fleet.persistent(registry_id, "madoguchi-registry") as registry:
        await registry.subscribe(f"{P}/+/+/records", qos=1)
    # the registry is away; its session queues what the station sends
    async with station:
        for n in (1, 2, 3):
            await station.publish(f"{P}/site1/a/records", f"record-{n}".encode(), qos=1)
    async with connected(evil, dashboard):
        # the attacker is in (a command for it proves the path), and got nothing else
        await evil.subscribe(f"{P}/site1/evil/cmd/#", qos=1)
        await dashboard.publish(f"{P}/site1/evil/cmd/ping", b"evil-is-connected", qos=1)
        seen_by_evil = await collect_until(evil, b"evil-is-connected")
    assert seen_by_evil == [(f"{P}/site1/evil/cmd/ping", b"evil-is-connected")]

    async with fleet.persistent(registry_id, "madoguchi-registry") as registry, station:
        await station.publish(f"{P}/site1/a/records", b"live-after-reconnect", qos=1)
        seen_by_registry = await collect_until(registry, b"live-after-reconnect")
    assert [payload for _, payload in seen_by_registry] == [
        b"record-1",
        b"record-2",
        b"record-3",
        b"live-after-reconnect",
    ]
    assert fleet.connected_as().count("site1/evil") == 1
    assert "madoguchi-registry" not in fleet.connected_as()


async def test_station_cannot_kick_another_station_off(fleet: Fleet) -> None:
    """A station using another station's client id neither disconnects it nor makes the
    broker publish its will."""
    victim_status = f"{P}/site1/b/status"
    victim = fleet.client(
        fleet.enroll_station("site1", "b"),
        "madoguchi-site1-b",
        will=aiomqtt.Will(victim_status, b'{"state": "offline"}', qos=1, retain=True),
    )
    attacker = fleet.client(fleet.enroll_station("site1", "a"), "madoguchi-site1-b")
    dashboard = fleet.client(fleet.role("dashboard"), "dashboard")
    async with connected(victim, dashboard):
        await dashboard.subscribe(f"{P}/+/+/status", qos=1)
        await victim.subscribe(f"{P}/site1/b/cmd/#", qos=1)
        await victim.publish(victim_status, b"online-before", qos=1)
        assert await collect_until(dashboard, b"online-before") == [
            (victim_status, b"online-before")
        ]
        async with attacker:
            # the attacker is connected (CONNACK); the victim still is, both ways
            await victim.publish(victim_status, b"still-online", qos=1)
            seen_by_dashboard = await collect_until(dashboard, b"still-online")
            await dashboard.publish(f"{P}/site1/b/cmd/ping", b"ping-victim", qos=1)
            seen_by_victim = await collect_until(victim, b"ping-victim")
        await victim.publish(victim_status, b"after-attacker-left", qos=1)
        seen_after = await collect_until(dashboard, b"after-attacker-left")
    assert seen_by_dashboard == [(victim_status, b"still-online")]  # no offline will
    assert seen_by_victim == [(f"{P}/site1/b/cmd/ping", b"ping-victim")]
    assert seen_after == [(victim_status, b"after-attacker-left")]
    assert fleet.connected_as() == ["site1/b", "dashboard", "site1/a"]


async def test_each_central_role_does_only_its_part(fleet: Fleet) -> None:
    """The identity is the certificate for the central side too: the dashboard's CN
    cannot read records or forge acks (a station would purge unstored records; it may
    read them, as a sign of a station's life), the
    registry's cannot send commands, and neither can take the other's session."""
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    registry = fleet.client(fleet.role("registry"), "registry")
    dashboard = fleet.client(fleet.role("dashboard"), "registry")  # asks for the registry's id
    async with connected(a, registry, dashboard):
        await dashboard.subscribe(f"{P}/+/+/records", qos=1)
        await dashboard.subscribe(f"{P}/+/+/ack", qos=1)
        await a.subscribe(f"{P}/site1/a/ack", qos=1)
        await a.subscribe(f"{P}/site1/a/cmd/#", qos=1)
        await registry.subscribe(f"{P}/+/+/records", qos=1)
        await dashboard.publish(f"{P}/site1/a/ack", b"forged-by-dashboard", qos=1)
        await registry.publish(f"{P}/site1/a/cmd/resend", b"forged-by-registry", qos=1)
        await a.publish(f"{P}/site1/a/records", b"records-of-a", qos=1)
        assert await collect_until(registry, b"records-of-a") == [
            (f"{P}/site1/a/records", b"records-of-a")
        ]
        await registry.publish(f"{P}/site1/a/ack", b"real-ack", qos=1)
        await dashboard.publish(f"{P}/site1/a/cmd/ping", b"real-cmd", qos=1)
        seen_by_a = await collect_until(a, b"real-cmd")
        await a.publish(f"{P}/site1/a/status", b"marker", qos=1)
        await dashboard.subscribe(f"{P}/+/+/status", qos=1)
        await a.publish(f"{P}/site1/a/status", b"marker-2", qos=1)
        seen_by_dashboard = await collect_until(dashboard, b"marker-2")
    assert seen_by_a == [(f"{P}/site1/a/ack", b"real-ack"), (f"{P}/site1/a/cmd/ping", b"real-cmd")]
    assert seen_by_dashboard == [  # no records; the real ack (liveness), not the forged one
        (f"{P}/site1/a/ack", b"real-ack"),
        (f"{P}/site1/a/status", b"marker-2"),
    ]
    assert fleet.connected_as() == ["site1/a", "registry", "dashboard"]
    log = fleet.broker.log.read_text()
    assert "Denied PUBLISH from dashboard" in log and "Denied PUBLISH from registry" in log


async def test_the_registry_status_role_reads_liveness_and_writes_only_its_feed(
    fleet: Fleet,
) -> None:
    """`registry-status` ([station_status], issue #19) hears status, telemetry and acks and
    publishes `_registry/+/stations`; it reads no records and can forge no ack, status
    or command."""
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    registry = fleet.client(fleet.role("registry"), "registry")
    feed = fleet.client(fleet.role("registry-status"), "registry-status")
    async with connected(a, registry, feed):
        for leaf in ("records", "status", "telemetry", "ack"):
            await feed.subscribe(f"{P}/+/+/{leaf}", qos=1)
        await a.subscribe(f"{P}/site1/a/ack", qos=1)
        await a.subscribe(f"{P}/site1/a/cmd/#", qos=1)
        await feed.publish(f"{P}/site1/a/ack", b"forged-ack", qos=1)
        await feed.publish(f"{P}/site1/a/cmd/resend", b"forged-cmd", qos=1)
        await feed.publish(f"{P}/site1/a/status", b"forged-status", qos=1)
        await a.publish(f"{P}/site1/a/records", b"records-of-a", qos=1)
        await a.publish(f"{P}/site1/a/telemetry", b"telemetry-of-a", qos=1)
        await registry.publish(f"{P}/site1/a/ack", b"real-ack", qos=1)
        await feed.subscribe(f"{P}/_registry/+/stations", qos=1)
        await feed.publish(f"{P}/_registry/registry/stations", b"the-feed", qos=1)
        heard = await collect_until(feed, b"the-feed")
        seen_by_a = await collect_until(a, b"real-ack")
    assert heard == [  # no records, not its own forged status
        (f"{P}/site1/a/telemetry", b"telemetry-of-a"),
        (f"{P}/site1/a/ack", b"real-ack"),
        (f"{P}/_registry/registry/stations", b"the-feed"),
    ]
    assert seen_by_a == [(f"{P}/site1/a/ack", b"real-ack")]  # no forged ack, no command
    assert "Denied PUBLISH from registry-status" in fleet.broker.log.read_text()


async def test_station_cannot_command_any_station_itself_included(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    b = fleet.client(fleet.enroll_station("site1", "b"), "station-b")
    dashboard = fleet.client(fleet.role("dashboard"), "dashboard")
    async with connected(a, b, dashboard):
        await a.subscribe(f"{P}/site1/a/cmd/#", qos=1)
        await b.subscribe(f"{P}/site1/b/cmd/#", qos=1)
        for cmd in ("resend", "rebirth", "diagnostics", "capture_photo"):
            await a.publish(f"{P}/site1/a/cmd/{cmd}", b"forged", qos=1)
            await a.publish(f"{P}/site1/b/cmd/{cmd}", b"forged", qos=1)
            await a.publish(f"{P}/site2/c/cmd/{cmd}", b"forged", qos=1)
        await dashboard.publish(f"{P}/site1/a/cmd/ping", b"real-a", qos=1)
        await dashboard.publish(f"{P}/site1/b/cmd/ping", b"real-b", qos=1)
        seen_by_a = await collect_until(a, b"real-a")
        seen_by_b = await collect_until(b, b"real-b")
    assert seen_by_a == [(f"{P}/site1/a/cmd/ping", b"real-a")]
    assert seen_by_b == [(f"{P}/site1/b/cmd/ping", b"real-b")]
    assert "Denied PUBLISH from site1/a" in fleet.broker.log.read_text()


async def test_station_cannot_read_other_stations_records(fleet: Fleet) -> None:
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    b = fleet.client(fleet.enroll_station("site1", "b"), "station-b")
    c = fleet.client(fleet.enroll_station("site2", "c"), "station-c")
    registry = fleet.client(fleet.role("registry"), "registry")
    async with connected(a, b, c, registry):
        await registry.subscribe(f"{P}/+/+/records", qos=1)
        for topic in (
            f"{P}/site1/b/records",
            f"{P}/site1/+/records",
            f"{P}/+/+/records",
            f"$share/steal/{P}/+/+/records",
            f"{P}/#",
            "#",
        ):
            await a.subscribe(topic, qos=1)
        await a.subscribe(f"{P}/site1/a/ack", qos=1)
        await b.publish(f"{P}/site1/b/records", b"records-of-b", qos=1)
        await c.publish(f"{P}/site2/c/records", b"records-of-c", qos=1)
        seen_by_registry = await collect_until(registry, b"records-of-c")
        await registry.publish(f"{P}/site1/a/ack", b"sentinel-for-a", qos=1)
        seen_by_a = await collect_until(a, b"sentinel-for-a")
    # the records were there to be read (the registry got them) ...
    assert seen_by_registry == [
        (f"{P}/site1/b/records", b"records-of-b"),
        (f"{P}/site2/c/records", b"records-of-c"),
    ]
    # ... and A, subscribed every way it could, got only its own ack
    assert {payload for _, payload in seen_by_a} == {b"sentinel-for-a"}


def acl_with_more_consumers(*cns: str) -> str:
    """The shipped acl with the `user registry` stanza copied for each of cns, as the
    acl's comment tells the operator to do for `madoguchi registry --shared`."""
    text = (BROKER_DIR / "acl").read_text()
    stanza = text.split("\nuser registry\n", 1)[1].split("\n\n", 1)[0]
    assert stanza.startswith("topic read ") and "user" not in stanza
    return text + "".join(f"\nuser {cn}\n{stanza}\n" for cn in cns)


def shared_consumer(fleet: Fleet, ident: tuple[Path, Path], client_id: str) -> aiomqtt.Client:
    """As `Registry(shared=...)` connects: MQTT 5, clean start, no session kept."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    return aiomqtt.Client(
        "127.0.0.1",
        fleet.broker.port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        properties=props,
        tls_context=fleet.tls(*ident),
        timeout=10,
    )


async def test_shared_consumers_with_one_certificate_each_share_the_records(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path, acl_with_more_consumers("registry-2"))
    fleet.broker.start()
    try:
        station = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
        one = shared_consumer(fleet, fleet.role("registry"), "madoguchi-registry-g-host-1")
        two = shared_consumer(fleet, fleet.role("registry-2"), "madoguchi-registry-g-host-2")
        sent = [f"record-{n}".encode() for n in range(10)]
        got: dict[str, list[bytes]] = {"registry": [], "registry-2": []}
        all_in = asyncio.Event()

        async def consume(name: str, client: aiomqtt.Client) -> None:
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                got[name].append(m.payload)
                if sum(map(len, got.values())) == len(sent):
                    all_in.set()

        async with connected(station, one, two):
            for c in (one, two):
                await c.subscribe(f"$share/registry/{P}/+/+/records", qos=1)
            tasks = [
                asyncio.create_task(consume(n, c))
                for n, c in (("registry", one), ("registry-2", two))
            ]
            for payload in sent:
                await station.publish(f"{P}/site1/a/records", payload, qos=1)
            await asyncio.wait_for(all_in.wait(), 15)
            for t in tasks:
                assert not t.done()  # neither consumer was disconnected
                t.cancel()
        assert sorted(got["registry"] + got["registry-2"]) == sorted(sent)  # each once
        assert got["registry"] and got["registry-2"]  # both took a share
        assert fleet.connected_as() == ["site1/a", "registry", "registry-2"]
        assert "Denied" not in fleet.broker.log.read_text()
    finally:
        fleet.broker.stop()


async def test_two_consumers_on_one_certificate_take_the_session_from_each_other(
    fleet: Fleet,
) -> None:
    """Why each consumer needs its own certificate: the client id is the CN."""
    ident = fleet.role("registry")
    first = shared_consumer(fleet, ident, "madoguchi-registry-g-host-1")
    second = shared_consumer(fleet, ident, "madoguchi-registry-g-host-2")
    async with first:
        await first.subscribe(f"$share/registry/{P}/+/+/records", qos=1)
        async with second:
            with pytest.raises(aiomqtt.MqttError):
                await collect_until(first, b"never sent")  # ends: first was disconnected
    assert fleet.connected_as() == ["registry", "registry"]


async def test_sighup_reloads_the_brokers_certificate_and_the_acl(fleet: Fleet) -> None:
    """What docs/central.md tells the operator: renew broker.crt/.key or edit the acl,
    then `kill -HUP`; connected clients stay, new handshakes get the new certificate,
    and the new acl applies to every client, connected ones included."""
    station = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    registry = fleet.client(fleet.role("registry"), "registry")
    second = fleet.client(fleet.role("registry-2"), "registry-2")  # not in the acl yet
    old_cert = (fleet.broker.dir / "broker.crt").read_bytes()
    async with connected(station, registry, second):
        await second.subscribe(f"{P}/+/+/records", qos=1)
        # renew the broker's certificate (new key too) and add registry-2's stanza
        new_cert, new_key = fleet.ca.identity("localhost", fleet.tmp / "renewed", server=True)
        (fleet.broker.dir / "broker.crt").write_bytes(new_cert.read_bytes())
        (fleet.broker.dir / "broker.key").write_bytes(new_key.read_bytes())
        (fleet.broker.dir / "acl").write_text(acl_with_more_consumers("registry-2"))
        assert fleet.broker.proc is not None
        fleet.broker.proc.send_signal(signal.SIGHUP)
        await wait_for_log(fleet.broker.log, "Reloading config")
        # the connections made before the reload still work, both ways
        await registry.subscribe(f"{P}/site1/a/records", qos=1)
        await station.subscribe(f"{P}/site1/a/ack", qos=1)
        await station.publish(f"{P}/site1/a/records", b"after-reload", qos=1)
        assert await collect_until(registry, b"after-reload") == [
            (f"{P}/site1/a/records", b"after-reload")
        ]
        assert await collect_until(second, b"after-reload") == [
            (f"{P}/site1/a/records", b"after-reload")
        ]
        await registry.publish(f"{P}/site1/a/ack", b"ack-after-reload", qos=1)
        await collect_until(station, b"ack-after-reload")
    served = served_certificate(fleet, fleet.enroll_station("site1", "b"))
    assert served == ssl.PEM_cert_to_DER_cert(new_cert.read_text())
    assert served != ssl.PEM_cert_to_DER_cert(old_cert.decode())


async def wait_for_log(log: Path, text: str, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while text not in log.read_text():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def served_certificate(fleet: Fleet, ident: tuple[Path, Path]) -> bytes:
    ctx = fleet.tls(*ident)
    with (
        socket.create_connection(("127.0.0.1", fleet.broker.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def write_crl(
    ca: TestCA, path: Path, revoked: list[x509.Certificate], owner: tuple[int, int] | None
) -> None:
    now = datetime.now(UTC)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + timedelta(days=1))
    )
    for cert in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - timedelta(minutes=1))
            .build()
        )
    path.write_bytes(b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    if owner is not None:
        os.chown(path, *owner)


async def test_revoked_station_cannot_connect_after_sighup(tmp_path: Path) -> None:
    """A stolen Pi: its certificate in the CRL, `kill -HUP`, and it is refused."""
    fleet = Fleet(tmp_path)
    crl = fleet.broker.dir / "crl.pem"
    write_crl(fleet.ca, crl, [], fleet.broker.owner)
    conf = fleet.broker.conf.read_text()
    fleet.broker.conf.write_text(
        conf.replace("require_certificate true\n", f"require_certificate true\ncrlfile {crl}\n")
    )
    fleet.broker.start()
    try:
        stolen = fleet.enroll_station("site1", "stolen")
        assert mqtt_connect_over_tls(fleet.tls(*stolen), fleet.broker.port) == b"\x20\x02\x00\x00"
        write_crl(
            fleet.ca,
            crl,
            [x509.load_pem_x509_certificate(stolen[0].read_bytes())],
            fleet.broker.owner,
        )
        assert fleet.broker.proc is not None
        fleet.broker.proc.send_signal(signal.SIGHUP)
        await wait_for_log(fleet.broker.log, "Reloading config")
        other = fleet.enroll_station("site1", "other")
        assert mqtt_connect_over_tls(fleet.tls(*other), fleet.broker.port) == b"\x20\x02\x00\x00"
        assert "REVOKED" in refused(fleet.tls(*stolen), fleet.broker)
    finally:
        fleet.broker.stop()


async def test_renewal_topics_are_each_stations_own_and_only_the_signer_answers(
    fleet: Fleet,
) -> None:
    """csr: a station writes only its own (so the topic names who asks) and reads only
    its own csr/signed; only the `fleet-ca` identity reads CSRs and answers them."""
    a = fleet.client(fleet.enroll_station("site1", "a"), "station-a")
    b = fleet.client(fleet.enroll_station("site1", "b"), "station-b")
    signer = fleet.client(fleet.role("fleet-ca"), "fleet-ca")
    dashboard = fleet.client(fleet.role("dashboard"), "dashboard")
    async with connected(a, b, signer, dashboard):
        await signer.subscribe(f"{P}/+/+/csr", qos=1)
        await b.subscribe(f"{P}/site1/b/csr/signed", qos=1)
        for topic in (f"{P}/site1/b/csr/signed", f"{P}/site1/+/csr/signed", f"{P}/site1/b/csr"):
            await a.subscribe(topic, qos=1)
        await a.subscribe(f"{P}/site1/a/csr/signed", qos=1)
        # forged: A asking as B, B answering itself, the dashboard answering A
        await a.publish(f"{P}/site1/b/csr", b"forged-csr", qos=1)
        await b.publish(f"{P}/site1/b/csr/signed", b"forged-cert", qos=1)
        await dashboard.publish(f"{P}/site1/a/csr/signed", b"forged-cert", qos=1)
        await a.publish(f"{P}/site1/a/csr", b"csr-a", qos=1)
        seen_by_signer = await collect_until(signer, b"csr-a")
        await signer.publish(f"{P}/site1/b/csr/signed", b"cert-b", qos=1)
        await signer.publish(f"{P}/site1/a/csr/signed", b"cert-a", qos=1)
        seen_by_a = await collect_until(a, b"cert-a")
        seen_by_b = await collect_until(b, b"cert-b")
    assert seen_by_signer == [(f"{P}/site1/a/csr", b"csr-a")]
    assert seen_by_a == [(f"{P}/site1/a/csr/signed", b"cert-a")]
    assert seen_by_b == [(f"{P}/site1/b/csr/signed", b"cert-b")]
