"""The registry on a real 3-node RabbitMQ cluster (issue #19, docs/cluster.md): stations
on the cluster's MQTT listeners, registry processes on AMQP from the quorum queue, into
PostgreSQL; the queue leader's node and a registry process are killed -9 mid-stream and
the node is left down. Every record must be stored exactly once, without a seq gap.

Two kinds of station: tests/support/rabbit.py's MqttStation (real MQTT 3.1.1, persistent
session, QoS 1, re-send of what is unacked, next node on a lost connection), four of them
at once for load; and the real station (pty scanner, outbox, uplink with `[mqtt] hosts`),
whose own node is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.central.amqp import RECORDS_QUEUE, declare_records_queue, records_binding
from agent.station.outbox import Outbox
from agent.testing import LOOPBACK, LoggedProcess, Pty, running_station, with_brokers, write_config
from tests.support import ROOT
from tests.support.central import PgCluster
from tests.support.rabbit import MqttStation, RabbitCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]


def registry_config(tmp: Path, name: str, cluster: RabbitCluster, dsn: str) -> Path:
    urls = ", ".join(f'"amqp://guest@127.0.0.1:{n.amqp_port}/"' for n in cluster.nodes)
    (tmp / "amqp-password").write_text("guest\n")
    conf = tmp / f"{name}.toml"
    conf.write_text(
        f"""[broker]
host = "127.0.0.1"
port = {cluster.nodes[0].mqtt_port}

[database]
dsn = "{dsn}"

[registry]
transport = "amqp"
quiet = true
batch_max_messages = 64

[amqp]
url = [{urls}]
password_file = "amqp-password"
prefetch = 128
"""
    )
    return conf


def registry_process(conf: Path, log: Path) -> LoggedProcess:
    p = LoggedProcess([sys.executable, "-m", "agent", "registry", "--config", str(conf)], log)
    p.what = f"registry {conf.stem}"
    return p


def test_cluster_has_three_nodes_and_routes_mqtt_records_to_the_quorum_queue(
    rabbit_cluster: RabbitCluster,
) -> None:
    status = rabbit_cluster.ctl(0, "cluster_status", "--formatter", "json")
    for n in rabbit_cluster.nodes:
        assert f'"{n.name}"' in status
    print(f"3-node cluster start-up: {rabbit_cluster.startup_s:.1f} s")
    assert records_binding("madoguchi/v1") == "madoguchi.v1.*.*.records"


async def test_leader_node_and_a_registry_killed_every_record_stored_once_no_gap(
    rabbit_cluster: RabbitCluster, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    cluster = rabbit_cluster
    await declare_records_queue(cluster.nodes[0].url)
    await declare_records_queue(cluster.nodes[1].url)  # idempotent
    queues = cluster.list_queues(0, "name", "type")
    assert {"name": RECORDS_QUEUE, "type": "quorum"} in queues
    leader = cluster.quorum_leader(RECORDS_QUEUE)
    dsn = pg_cluster.new_database()
    registries = [
        registry_process(registry_config(tmp_path, f"reg{i}", cluster, dsn), tmp_path / f"r{i}.log")
        for i in range(2)
    ]
    mqtt_ports = [n.mqtt_port for n in cluster.nodes]
    per_station = 250
    # two stations on the leader's node, one on each other node
    homes = [leader, leader, (leader + 1) % 3, (leader + 2) % 3]
    stations = [
        MqttStation("site1", f"st{i}", per_station, mqtt_ports, first=home)
        for i, home in enumerate(homes)
    ]
    try:
        for r in registries:
            r.start()
        for r in registries:
            r.wait_log("registry consuming", 30)
        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(s.run(), name=f"station-{s.agent}") for s in stations]
            # a third of the way: kill -9 the queue leader's node (left down)
            await _until(lambda: sum(len(s.acked) for s in stations) >= per_station)
            cluster.kill(leader)
            killed_at = sum(len(s.acked) for s in stations)
            # then a registry process, mid-batch
            await _until(lambda: sum(len(s.acked) for s in stations) >= killed_at + per_station)
            registries[0].kill9()
            async with asyncio.timeout(150):
                await asyncio.gather(*(s.done.wait() for s in stations))
            for t in tasks:
                t.cancel()
        took = time.monotonic() - t0
        registries[1].check_running()
        rows = pg_cluster.query(
            dsn,
            "SELECT agent, count(*), count(DISTINCT id), min(seq), max(seq) "
            "FROM records GROUP BY agent ORDER BY agent",
        )
        assert rows == [(f"st{i}", per_station, per_station, 1, per_station) for i in range(4)]
        ids = {r["id"] for s in stations for r in s.records}
        stored = {row[0] for row in pg_cluster.query(dsn, "SELECT id FROM records")}
        assert stored == ids
        # the registry's own gap book: every gap that opened while records came out of
        # order has closed, and each station's count is its seq range
        assert pg_cluster.query(dsn, "SELECT count(*) FROM gaps") == [(0,)]
        agents = pg_cluster.query(dsn, "SELECT agent, max_seq, records FROM agents ORDER BY agent")
        assert agents == [(f"st{i}", per_station, per_station) for i in range(4)]
        moved = [s.agent for s in stations if s.failovers]
        assert moved, "no station lost its node: the kill did not hit the leader's stations"
        print(
            f"{4 * per_station} records in {took:.1f} s, node {leader + 1} (leader) and "
            f"registry 0 killed; failovers {[s.failovers for s in stations]}, "
            f"re-sent {sum(s.resent for s in stations)}"
        )
    finally:
        for r in registries:
            r.close()
        if cluster.nodes[leader].proc is None:
            cluster.start(leader)  # the next test gets three nodes again


async def _until(cond: object, timeout: float = 60) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_the_real_station_fails_over_when_its_node_dies_and_confirms_everything(
    rabbit_cluster: RabbitCluster, pg_cluster: PgCluster, pty_port: Pty, tmp_path: Path
) -> None:
    """The real station (scanner on a pty, outbox, uplink) with `[mqtt] hosts` = the
    three nodes, MQTT 3.1.1 and a persistent session (docs/cluster.md): its own node is
    killed -9 and left down, then a registry process; scans are taken before, while its
    node is dead, and after. Every scan is stored once in PostgreSQL with no seq gap, and
    the station's outbox ends with every record confirmed by the registry's acks."""
    cluster = rabbit_cluster
    await declare_records_queue(cluster.nodes[0].url)
    leader = cluster.quorum_leader(RECORDS_QUEUE)
    home = (leader + 1) % 3  # the station's node, not the queue leader (the test above)
    order = [home, (home + 1) % 3, (home + 2) % 3]
    dsn = pg_cluster.new_database()
    registries = [
        registry_process(registry_config(tmp_path, f"reg{i}", cluster, dsn), tmp_path / f"r{i}.log")
        for i in range(2)
    ]
    cfg = with_brokers(
        write_config(tmp_path, cluster.nodes[home].mqtt_port, scanner=pty_port.link,
                     outbox="resend_after_s = 3"),
        [f"{LOOPBACK}:{cluster.nodes[i].mqtt_port}" for i in order],
        'protocol = "3.1.1"\npersistent_session = true\n',
    )  # fmt: skip

    async def scan(label: str, n: int) -> None:
        for i in range(n):
            pty_port.scan(f"{label}-{i}")
            assert await asyncio.wait_for(pty_port.aread(1), 10) == b"\x06"

    try:
        for r in registries:
            r.start()
        for r in registries:
            r.wait_log("registry consuming", 30)
        async with running_station(cfg) as run:
            uplink, outbox = run.station.uplink, run.station.outbox
            assert uplink is not None and outbox is not None
            await scan("before", 20)
            await _confirmed(outbox, 20)
            gone = f"{LOOPBACK}:{cluster.nodes[home].mqtt_port}"
            assert uplink.describe()["broker"] == gone
            cluster.kill(home)
            killed = time.monotonic()
            await scan("while-down", 20)  # taken and ACKed to the scanner at once
            await _until(lambda: uplink.describe()["broker"] not in (None, gone))
            moved_s = time.monotonic() - killed
            await _confirmed(outbox, 40, timeout=90)
            registries[0].kill9()
            await scan("after", 20)
            await _confirmed(outbox, 60, timeout=90)
            stats = await outbox.stats()
            assert (stats.confirmed, stats.pending, stats.sent) == (60, 0, 0)
        registries[1].check_running()
        rows = pg_cluster.query(
            dsn, "SELECT agent, count(*), count(DISTINCT id), min(seq), max(seq) FROM records "
            "GROUP BY agent"
        )  # fmt: skip
        assert rows == [("station-03", 60, 60, 1, 60)]
        assert pg_cluster.query(dsn, "SELECT count(*) FROM gaps") == [(0,)]
        print(f"station on another node {moved_s:.2f} s after its node's kill -9")
    finally:
        for r in registries:
            r.close()
        if cluster.nodes[home].proc is None:
            cluster.start(home)


async def _confirmed(outbox: Outbox, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (got := (await outbox.stats()).confirmed) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{got} of {n} confirmed after {timeout:.0f} s")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("login", ["certificate", "password"])
async def test_station_permissions_own_topics_only(
    rabbit_cluster: RabbitCluster, tmp_path: Path, login: str
) -> None:
    """provisioning/cluster/station-permissions.sh on the live cluster: a station may
    publish its own records and read its own ack, and cannot publish as another station,
    subscribe to another's ack, or ack for another. `certificate`: MQTT over TLS with a
    client certificate of CN "site9/p1" (mqtt.ssl_cert_login, no password), as in
    production; `password`: the same user over TCP with a password the test sets."""
    import aio_pika
    import aiomqtt

    cluster = rabbit_cluster
    node = cluster.nodes[0]
    env = {**cluster._env(), "RABBITMQCTL": f"rabbitmqctl -n {node.name}"}
    for agent in ("p1", "p2"):
        r = subprocess.run(
            [str(ROOT / "provisioning" / "cluster" / "station-permissions.sh"), "site9", agent],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        if login == "password":
            cluster.ctl(0, "change_password", f"site9/{agent}", "pw")
    tls = None
    if login == "certificate":
        cert, key = cluster.ca.identity("site9/p1", tmp_path)
        tls = ssl.create_default_context(cafile=str(cluster.ca_file))
        tls.load_cert_chain(str(cert), str(key))
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        spy = await channel.declare_queue(exclusive=True, auto_delete=True)
        await spy.bind("amq.topic", routing_key="madoguchi.v1.site9.#")
        seen: list[str] = []
        got_own = asyncio.Event()

        async def note(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.append(m.routing_key or "")
            if m.routing_key == "madoguchi.v1.site9.p1.records":
                got_own.set()
            await m.ack()

        await spy.consume(note)

        def station() -> aiomqtt.Client:
            if tls is not None:  # no user name: the certificate's CN is the user
                return aiomqtt.Client(
                    "127.0.0.1",
                    node.mqtts_port,
                    identifier=f"perm-test-p1-{login}",
                    tls_context=tls,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    timeout=5,
                )
            return aiomqtt.Client(
                "127.0.0.1",
                node.mqtt_port,
                identifier=f"perm-test-p1-{login}",
                username="site9/p1",
                password="pw",
                protocol=aiomqtt.ProtocolVersion.V311,
                timeout=5,
            )

        async with station() as c:
            own = await c.subscribe("madoguchi/v1/site9/p1/ack", qos=1)
            assert own == [1] or getattr(own[0], "value", own[0]) == 1
        # RabbitMQ 3.10 answers a refused subscription by closing the connection
        refused: list[object] = []
        try:
            async with station() as c:
                other = await c.subscribe("madoguchi/v1/site9/p2/ack", qos=1)
                refused = [getattr(q, "value", q) for q in other]
        except aiomqtt.MqttError as e:
            refused = [str(e)]
        assert refused and refused != [1], refused
        for forged in ("madoguchi/v1/site9/p2/records", "madoguchi/v1/site9/p2/ack"):
            with contextlib.suppress(aiomqtt.MqttError):
                async with station() as c:
                    await c.publish(forged, b"{}", qos=1)
        async with station() as c:
            await c.publish("madoguchi/v1/site9/p1/records", b"{}", qos=1)
        await asyncio.wait_for(got_own.wait(), 10)
        assert seen == ["madoguchi.v1.site9.p1.records"]


async def test_amqp_registry_in_process_dead_letters_poison_and_settles_the_batch(
    rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    """The same validation as on MQTT: a message that is not an envelope is a dead letter
    (never acked to anyone), a valid one beside it is stored and acked over amq.topic, and
    both are settled (nothing left in the queue to come back)."""
    import aio_pika

    from agent.central.amqp import AmqpTransport
    from agent.central.registry import Registry
    from tests.support.central import envelope, record

    node = rabbit_cluster.nodes[1]
    await declare_records_queue(node.url)
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.get_queue(RECORDS_QUEUE)
        await queue.purge()
        acks = await channel.declare_queue(exclusive=True, auto_delete=True)
        await acks.bind("amq.topic", routing_key="madoguchi.v1.site7.a1.ack")
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_ack(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            await m.ack()
            got.put_nowait(m.body)

        await acks.consume(on_ack)
        transport = AmqpTransport([node.url], prefetch=16)
        async with Registry(
            "127.0.0.1", node.mqtt_port, tmp_path / "r.db", transport=transport
        ) as reg:
            task = asyncio.create_task(reg.run(), name="amqp-registry")
            try:
                await asyncio.wait_for(reg.connected.wait(), 20)
                exchange = await channel.get_exchange("amq.topic")
                good = record(1)
                for body in (b"not json", envelope("site7", "a1", [good])):
                    await exchange.publish(
                        aio_pika.Message(body), routing_key="madoguchi.v1.site7.a1.records"
                    )
                ack = json.loads(await asyncio.wait_for(got.get(), 20))
                assert ack == {"ids": [good["id"]]}
                assert reg.dead_letters == 1 and reg.stored_new == 1
                await _until(lambda: transport.settled == 2, 10)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = await channel.declare_queue(RECORDS_QUEUE, passive=True)
        assert left.declaration_result.message_count == 0
