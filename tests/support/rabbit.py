"""A real 3-node RabbitMQ cluster on loopback for the `cluster` tests (docs/cluster.md).

Every node gets its own free ports (AMQP, MQTT, Erlang distribution), its own Mnesia and
log directories under one temporary directory, the plugins file of
provisioning/cluster/enabled_plugins (rabbitmq_mqtt) and a private epmd port, so nothing
here touches a system RabbitMQ or another test run. The nodes share one Erlang cookie
through HOME/.erlang.cookie (HOME is the temporary directory). Nodes 2 and 3 join node 1
with `rabbitmqctl join_cluster`. `kill(i)` is a kill -9 of a node's Erlang VM;
`start(i)` brings it back on the same ports and data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.testing import free_port
from tests.support import ROOT

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
PLUGINS_FILE = ROOT / "provisioning" / "cluster" / "enabled_plugins"
NODES = 3


def rabbit_missing() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        return "rabbitmq-server is not installed (make setup: apt package rabbitmq-server)"
    return None


@dataclass
class Node:
    index: int
    name: str
    amqp_port: int
    mqtt_port: int
    dist_port: int
    mqtts_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"


class RabbitCluster:
    """`start_all()`, then `kill(i)` / `start(i)`; `stop_all()` ends every process."""

    def __init__(self, *, mqtt_conf: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="madoguchi-rabbit-"))
        self.epmd_port = free_port()
        self.ctl_port = free_port()
        self.mqtt_conf = mqtt_conf
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text("MADOGUCHITESTCOOKIE")
        cookie.chmod(0o400)
        self.nodes = [
            Node(
                i,
                f"rabbit{i + 1}@localhost",
                free_port(),
                free_port(),
                free_port(),
                free_port(),
                self.dir / f"rabbit{i + 1}",
            )
            for i in range(NODES)
        ]
        self.startup_s = 0.0
        # MQTT over TLS with the certificate CN as the user (mqtt.ssl_cert_login), as
        # provisioning/cluster/rabbitmq-mq*.conf; `ca` issues the stations' certificates
        from tests.support.pki import TestCA

        self.ca = TestCA()
        self.tls_dir = self.dir / "tls"
        self.tls_dir.mkdir()
        self.ca_file = self.ca.write(self.tls_dir / "ca.crt")
        self.server_cert, self.server_key = self.ca.identity("localhost", self.tls_dir, server=True)
        self.epmd: subprocess.Popen[bytes] | None = None

    # -- environment ---------------------------------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {
            "PATH": f"{RABBIT_BIN}:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_port),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_port + 10),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(PLUGINS_FILE),
        }
        if node is not None:
            node.base.mkdir(exist_ok=True)
            conf = node.base / "rabbitmq.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
                        f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
                        f"mqtt.listeners.ssl.default = 127.0.0.1:{node.mqtts_port}",
                        f"ssl_options.cacertfile = {self.ca_file}",
                        f"ssl_options.certfile = {self.server_cert}",
                        f"ssl_options.keyfile = {self.server_key}",
                        "ssl_options.verify = verify_peer",
                        "ssl_options.fail_if_no_peer_cert = true",
                        "mqtt.ssl_cert_login = true",
                        "ssl_cert_login_from = common_name",
                        "mqtt.allow_anonymous = true",
                        "mqtt.durable_queue_type = quorum",
                        "mqtt.exchange = amq.topic",
                        "cluster_partition_handling = pause_minority",
                        "loopback_users = none",
                        "log.console = false",
                        "log.file.level = info",
                        self.mqtt_conf,
                    ]
                )
                + "\n"
            )
            env |= {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.amqp_port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_CONFIG_FILE": str(conf),
                "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.base / "log"),
                "RABBITMQ_PID_FILE": str(node.pid_file),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "advanced.config"),
            }
        return env

    def ctl(self, node: Node | int, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n NODE ARGS`; a failure fails the test with its output."""
        n = self.nodes[node] if isinstance(node, int) else node
        r = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", n.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if r.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl -n {n.name} {' '.join(args)}: rc {r.returncode}\n{r.stdout}{r.stderr}"
            )
        return r.stdout

    def queues(self, node: Node | int, *args: str) -> str:
        n = self.nodes[node] if isinstance(node, int) else node
        r = subprocess.run(
            [str(RABBIT_BIN / "rabbitmq-queues"), "-n", n.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode != 0:
            raise AssertionError(f"rabbitmq-queues {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    # -- lifecycle -----------------------------------------------------------------------

    def _launch(self, node: Node) -> None:
        (node.base / "advanced.config").parent.mkdir(parents=True, exist_ok=True)
        (node.base / "advanced.config").write_text("[].\n")
        log = (node.base / "server.out").open("ab")
        node.proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=self._env(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def _await(self, node: Node, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not node.pid_file.exists():  # written by the node itself
            if node.proc is not None and node.proc.poll() is not None:
                out = (node.base / "server.out").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{node.name} exited at start-up:\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.name}: no pid file after {timeout} s")
            time.sleep(0.1)
        self.ctl(node, "wait", "--timeout", str(int(timeout)), str(node.pid_file), timeout=timeout)
        self.ctl(node, "await_startup", "--timeout", str(int(timeout)), timeout=timeout)

    def _log_tail(self, node: Node) -> str:
        parts = [node.base / "server.out", *sorted((node.base / "log").glob("*.log"))]
        return "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-2000:]}" for p in parts if p.exists()
        )

    def _boot(self, node: Node) -> None:
        """A fresh node up; a first boot that fails is retried once from an empty node.

        Three fresh nodes booting at once on two busy cores have failed once in a
        full fresh-clone run ("rabbit_is_not_running" for one of them) and never
        alone; that is RabbitMQ's start-up, not what these tests test. The retry gets
        new ports: another failed on `eaddrinuse` twice, for a port `free_port` had
        picked from the kernel's ephemeral range, where a connection made meanwhile
        (one lasting, such as a node's own to epmd) may take it as its local port
        (`free_port` now picks below that range; new ports still cover one taken some
        other way). A second failure fails with the node's logs."""
        try:
            self._await(node)
            return
        except AssertionError as first:
            why = f"{first}\n{self._log_tail(node)}"
        print(f"rabbit: {node.name} did not boot, once more from empty: {why[-1500:]}")
        with contextlib.suppress(OSError, ValueError):  # no pid file if it failed early
            os.kill(self.beam_pid(node.index), signal.SIGKILL)
        self._reap(node)
        shutil.rmtree(node.base / "mnesia", ignore_errors=True)
        # nothing has been told these ports yet: each launch writes them into the node's config
        node.amqp_port, node.mqtt_port, node.dist_port, node.mqtts_port = (
            free_port() for _ in range(4)
        )
        self._launch(node)
        try:
            self._await(node)
        except AssertionError as second:
            raise AssertionError(f"{second}\n{self._log_tail(node)}") from None

    def start_all(self) -> None:
        t0 = time.monotonic()
        # our own epmd in the foreground (the nodes would start a daemon nobody stops)
        self.epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_listening(self.epmd_port, self.epmd)
        for n in self.nodes:
            self._launch(n)
        with ThreadPoolExecutor(NODES) as pool:
            list(pool.map(self._boot, self.nodes))
        first = self.nodes[0].name

        # one node at a time, as RabbitMQ's clustering guide does: two joining at once
        # contend for the schema, and once a node's start_app did not return in 60 s
        for n in self.nodes[1:]:
            self.ctl(n, "stop_app")
            self.ctl(n, "join_cluster", first)
            self.ctl(n, "start_app", timeout=180)
        status = self.ctl(0, "cluster_status", "--formatter", "json")
        for n in self.nodes:
            assert n.name in status, f"{n.name} not in the cluster: {status}"
        self.startup_s = time.monotonic() - t0

    def beam_pid(self, i: int) -> int:
        return int(self.nodes[i].pid_file.read_text().strip())

    def kill(self, i: int) -> None:
        """kill -9 of node i's Erlang VM (no clean shutdown, like a host that died)."""
        node = self.nodes[i]
        os.kill(self.beam_pid(i), signal.SIGKILL)
        self._reap(node)

    def _reap(self, node: Node) -> None:
        """After its VM was killed: the node's process group gone, its pid file removed."""
        if node.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(30)
            node.proc = None
        node.pid_file.unlink(missing_ok=True)

    def start(self, i: int) -> None:
        """Node i again, same ports and data; it rejoins the cluster by itself."""
        node = self.nodes[i]
        self._launch(node)
        self._await(node)

    def stop_all(self) -> None:
        for i, n in enumerate(self.nodes):
            if n.proc is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                self.kill(i)
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(10)
            self.epmd = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def list_queues(self, node: Node | int, *columns: str) -> list[dict[str, Any]]:
        out = self.ctl(node, "list_queues", *columns, "--formatter", "json", "--quiet")
        rows = json.loads(out)
        assert isinstance(rows, list)
        return rows

    def quorum_leader(self, queue: str) -> int:
        """Index of the node leading quorum queue `queue` (from a live node)."""
        for n in self.nodes:
            if n.proc is None:
                continue
            for q in self.list_queues(n, "name", "leader"):
                if q["name"] == queue:
                    return next(m.index for m in self.nodes if m.name == q["leader"])
        raise AssertionError(f"queue {queue} has no leader")


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Until something accepts on 127.0.0.1:port (an outside process: no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nothing listening on port {port}") from None
            time.sleep(0.05)


def require_rabbit() -> None:
    why = rabbit_missing()
    if why is not None:
        pytest.skip(why)


class MqttStation:
    """A minimal real-MQTT station (3.1.1, persistent session, QoS 1), for the cluster
    tests: sends `count` records one envelope each, keeps every unacked one and sends it
    again after `resend_after_s`, and on a lost connection goes to the next node's MQTT
    port (what issue #19 point 2 gives the real agent; its `[mqtt]` takes one host today).
    `done` is set when every record is acked."""

    def __init__(
        self,
        site: str,
        agent: str,
        count: int,
        ports: list[int],
        *,
        first: int = 0,
        every_s: float = 0.01,
        resend_after_s: float = 2.0,
        prefix: str = "madoguchi/v1",
    ) -> None:
        from tests.support.central import record

        self.site, self.agent = site, agent
        self.records = [record(seq) for seq in range(1, count + 1)]
        self.ports = ports
        self.node = first
        self.every_s = every_s
        self.resend_after_s = resend_after_s
        self.topic = f"{prefix}/{site}/{agent}/records"
        self.ack_topic = f"{prefix}/{site}/{agent}/ack"
        self.sent_at: dict[str, float] = {}
        self.acked: set[str] = set()
        self.resent = 0
        self.connections = 0
        self.failovers = 0
        self.done = asyncio.Event()
        self.connected = asyncio.Event()

    async def run(self) -> None:
        import aiomqtt

        next_seq = 0
        while not self.done.is_set():
            port = self.ports[self.node % len(self.ports)]
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    port,
                    identifier=f"station-{self.site}-{self.agent}",
                    protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=False,
                    keepalive=5,
                    timeout=5,
                ) as client:
                    await client.subscribe(self.ack_topic, qos=1)
                    self.connections += 1
                    self.connected.set()
                    async with asyncio.TaskGroup() as tg:
                        acks = tg.create_task(self._acks(client), name=f"acks-{self.agent}")
                        while not self.done.is_set():
                            now = time.monotonic()
                            due = [
                                r
                                for r in self.records[:next_seq]
                                if r["id"] not in self.acked
                                and now - self.sent_at[r["id"]] > self.resend_after_s
                            ]
                            for r in due[:50]:
                                self.resent += 1
                                await self._send(client, r)
                            if next_seq < len(self.records):
                                await self._send(client, self.records[next_seq])
                                next_seq += 1
                            await asyncio.sleep(self.every_s)
                        acks.cancel()
            except* (aiomqtt.MqttError, OSError):
                self.connected.clear()
                self.node += 1
                self.failovers += 1
                await asyncio.sleep(0.3)

    async def _send(self, client: Any, r: dict[str, Any]) -> None:
        from tests.support.central import envelope

        self.sent_at[r["id"]] = time.monotonic()
        await client.publish(self.topic, envelope(self.site, self.agent, [r]), qos=1)

    async def _acks(self, client: Any) -> None:
        async for m in client.messages:
            body = json.loads(m.payload)
            self.acked.update(body["ids"])
            if len(self.acked) >= len(self.records) and all(
                r["id"] in self.acked for r in self.records
            ):
                self.done.set()
                return
