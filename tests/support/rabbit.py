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
                self.dir / f"rabbit{i + 1}",
            )
            for i in range(NODES)
        ]
        self.startup_s = 0.0
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
            list(pool.map(self._await, self.nodes))
        first = self.nodes[0].name

        def join(n: Node) -> None:
            self.ctl(n, "stop_app")
            self.ctl(n, "join_cluster", first)
            self.ctl(n, "start_app")

        with ThreadPoolExecutor(NODES) as pool:
            list(pool.map(join, self.nodes[1:]))
        status = self.ctl(0, "cluster_status", "--formatter", "json")
        for n in self.nodes:
            assert n.name in status, f"{n.name} not in the cluster: {status}"
        self.startup_s = time.monotonic() - t0

    def beam_pid(self, i: int) -> int:
        return int(self.nodes[i].pid_file.read_text().strip())

    def kill(self, i: int) -> None:
        """kill -9 of node i's Erlang VM (no clean shutdown, like a host that died)."""
        node = self.nodes[i]
        pid = self.beam_pid(i)
        os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
            try:
                self.kill(i)
            except (OSError, ValueError):
                pass
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(10)
            self.epmd = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def quorum_leader(self, queue: str) -> int:
        """Index of the node leading quorum queue `queue` (from a live node)."""
        for n in self.nodes:
            if n.proc is None:
                continue
            out = self.ctl(n, "list_queues", "name", "leader", "--formatter", "tsv", "--quiet")
            for line in out.splitlines():
                name, _, leader = line.partition("\t")
                if name == queue:
                    return next(m.index for m in self.nodes if m.name == leader.strip())
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
