"""madoguchi beside the peer, ThingsBoard IoT Gateway 3.8 (issue #18, point 8), in one run.

    .venv/bin/python bench/bench_peer.py [--scans 200] [--backlog 5000] [--kills 5]

Both are fed by a pty scanner (the gateway through its bundled custom serial connector,
extensions/serial, which reads the pty directly), both publish to the same mosquitto,
and one consumer subscribed to both topic trees times every text's first arrival. The
gateway gets what a ThingsBoard server would answer to its `getSessionLimits` RPC
(it forwards nothing before), from this script. madoguchi's records are acked by the
reference registry (in this process) as in production; the gateway's are not
confirmed by anyone (it has no such thing).

The gateway keeps one value per device, key and millisecond (tb-mqtt-client
`_split_message`): scans inside one millisecond collapse. Scans are paced at >= 2 ms
apart here, and any such collapse would be counted with the rest as not delivered.

Measured per peer: scan -> consumer latency p50/p99 at 10 scans/s; idle RSS 8 s after
start; after a 20 s broker outage with 100 scans taken meanwhile, the time from the
broker's return to the last of them delivered; a `--backlog` of scans taken with the
broker down, then delivered (count, and rate from the first to the last); and scans
lost across `--kills` kill -9s of the process during steady scanning (written to the
pty and never delivered). The gateway is installed from PyPI into its own venv
(`--peer-venv`, default ~/.cache/madoguchi-bench/tb-gateway) at first use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.central.registry import tune_gc  # noqa: E402
from agent.testing import (  # noqa: E402
    AgentProcess,
    Broker,
    Pty,
    running_registry,
    serial_scanner,
    write_config,
)

TB_VERSION = "3.8.5"
LIMITS = {
    "maxPayloadSize": 65536,
    "maxInflightMessages": 100,
    "rateLimits": {},
    "gatewayRateLimits": {},
}


def ensure_peer(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                f"thingsboard-gateway=={TB_VERSION}",
                "pyserial",
            ],
            check=True,
        )
        (venv / ".installed").touch()
    return py


def rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return 0.0


class Consumer:
    """One subscriber on both topic trees: the first arrival time of every text."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: dict[str, float] = {}
        self.changed = asyncio.Event()

    def _texts(self, topic: str, body: Any) -> list[str]:
        if topic == "v1/gateway/telemetry" and isinstance(body, dict):
            return [
                e["values"]["text"]
                for v in body.values()
                for e in v
                if "text" in e.get("values", {})
            ]
        if topic.endswith("/records") and isinstance(body, dict):
            return [
                r["data"]["text"] for r in body.get("records", []) if "text" in r.get("data", {})
            ]
        return []

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-consumer") as c:
                    await c.subscribe("v1/#", qos=1)
                    await c.subscribe("madoguchi/v1/+/+/records", qos=1)
                    async for m in c.messages:
                        t = m.topic.value
                        if t.startswith("v1/devices/me/rpc/request/"):
                            body = json.loads(bytes(m.payload))  # type: ignore[arg-type]
                            if body.get("method") == "getSessionLimits":
                                rid = t.rsplit("/", 1)[1]
                                await c.publish(
                                    f"v1/devices/me/rpc/response/{rid}", json.dumps(LIMITS), qos=1
                                )
                            continue
                        try:
                            body = json.loads(bytes(m.payload))  # type: ignore[arg-type]
                        except ValueError:
                            continue
                        now = time.perf_counter()
                        for text in self._texts(t, body):
                            self.seen.setdefault(text, now)
                        self.changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    async def wait_all(self, texts: list[str], timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not all(t in self.seen for t in texts):
                    self.changed.clear()
                    await self.changed.wait()
                return True
        return False


class Peer:
    name = ""

    def __init__(self, work: Path, broker_port: int, pty: Pty) -> None:
        self.work, self.broker_port, self.pty = work, broker_port, pty
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def ready(self, consumer: Consumer, prefix: str) -> None:
        """Started and forwarding: a probe scan arrives."""
        probe = f"{prefix}-probe-{time.monotonic_ns()}"
        for _ in range(120):
            self.pty.scan(probe)
            if await consumer.wait_all([probe], 1.0):
                return
        raise RuntimeError(f"{self.name} never forwarded a scan")


class Madoguchi(Peer):
    name = "madoguchi"

    def __init__(self, work: Path, broker_port: int, pty: Pty) -> None:
        super().__init__(work, broker_port, pty)
        self.cfg = write_config(
            work,
            broker_port,
            devices=serial_scanner(pty.link, host_nak=None),
            site="bench-site",
            name="peer-bench",
            data_dir=work / "madoguchi-data",
            telemetry_interval_s=None,
            mqtt="backoff_max_s = 1",
            outbox="resend_after_s = 30",
        )
        self.agent: AgentProcess | None = None

    def start(self) -> None:
        self.agent = AgentProcess(self.cfg, self.work / "madoguchi.log")
        self.agent.start()
        self.proc = self.agent.proc


class Gateway(Peer):
    name = "ThingsBoard IoT Gateway " + TB_VERSION

    def __init__(self, work: Path, broker_port: int, pty: Pty, python: Path) -> None:
        super().__init__(work, broker_port, pty)
        self.python = python
        cfg = work / "tb-config"
        cfg.mkdir()
        (work / "tb-data").mkdir()
        self.cfg = cfg
        (cfg / "logs.json").write_text(
            json.dumps(
                {
                    "version": 1,
                    "disable_existing_loggers": False,
                    "formatters": {
                        "f": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
                    },
                    "handlers": {
                        "c": {
                            "class": "logging.StreamHandler",
                            "formatter": "f",
                            "level": "WARNING",
                        }
                    },
                    "loggers": {"": {"level": "WARNING", "handlers": ["c"]}},
                }
            )
        )
        (cfg / "tb_gateway.json").write_text(
            json.dumps(
                {
                    "thingsboard": {
                        "host": "127.0.0.1",
                        "port": broker_port,
                        "remoteShell": False,
                        "remoteConfiguration": False,
                        "statistics": {"enable": False, "statsSendPeriodInSeconds": 3600},
                        "deviceFiltering": {"enable": False},
                        "maxPayloadSizeBytes": 65536,
                        "minPackSendDelayMS": 0,
                        "minPackSizeToSend": 500,
                        "checkConnectorsConfigurationInSeconds": 60,
                        "handleDeviceRenaming": False,
                        "security": {"type": "accessToken", "accessToken": "bench"},
                        "qos": 1,
                        "reportStrategy": {"type": "ON_RECEIVED"},
                        "checkingDeviceActivity": {"checkDeviceInactivity": False},
                    },
                    "storage": {  # its durable storage, as a station would need
                        "type": "sqlite",
                        "data_file_path": str(work / "tb-data") + "/",
                        "messages_ttl_check_in_hours": 1,
                        "messages_ttl_in_days": 7,
                        "max_read_records_count": 1000,
                        "size_limit": 1024,
                        "max_db_amount": 10,
                        "oversize_check_period": 1,
                        "writing_batch_size": 1000,
                    },
                    "grpc": {"enabled": False},
                    "connectors": [
                        {
                            "type": "serial",
                            "name": "scanner",
                            "configuration": "serial.json",
                            "class": "SerialConnector",
                        }
                    ],
                }
            )
        )
        (cfg / "serial.json").write_text(
            json.dumps(
                {
                    "name": "scanner",
                    "logLevel": "WARNING",
                    "uplinkQueueSize": 100000,
                    "devices": [
                        {
                            "name": "ticket-scanner",
                            "type": "default",
                            "port": str(pty.link),
                            "baudrate": 9600,
                            "converter": "SerialUplinkConverter",
                            "delimiter": "\r",
                            "telemetry": [
                                {"type": "string", "key": "text", "untilDelimiter": "\r"}
                            ],
                            "attributes": [],
                            "attributeUpdates": [],
                            "serverSideRpc": [],
                        }
                    ],
                }
            )
        )

    def start(self) -> None:
        env = dict(os.environ, TB_GW_CONFIG_DIR=str(self.cfg) + "/")
        log = (self.work / "tb.log").open("ab")
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "thingsboard_gateway.tb_gateway"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )


async def drain_pty(peer: Peer) -> None:
    """Read the ACK bytes madoguchi writes back, so the pty never fills."""
    while True:
        await peer.pty.aread(4096, timeout=1.0)


async def scan_paced(pty: Pty, texts: list[str], interval: float) -> None:
    for t in texts:
        pty.scan(t)
        await asyncio.sleep(interval)


async def measure(
    peer: Peer, broker: Broker, consumer: Consumer, a: argparse.Namespace
) -> dict[str, Any]:
    tag = "m" if isinstance(peer, Madoguchi) else "t"
    out: dict[str, Any] = {}
    peer.start()
    await peer.ready(consumer, tag)
    await asyncio.sleep(8)
    out["idle_rss_mb"] = round(rss_mb(peer.pid), 1)

    # latency at 10 scans/s
    texts = [f"{tag}-lat-{i:06d}" for i in range(a.scans)]
    sent: dict[str, float] = {}
    for t in texts:
        sent[t] = time.perf_counter()
        peer.pty.scan(t)
        await asyncio.sleep(0.1)
    await consumer.wait_all(texts, 30)
    lat = sorted((consumer.seen[t] - sent[t]) * 1000 for t in texts if t in consumer.seen)
    out["latency_p50_ms"] = round(statistics.median(lat), 1)
    out["latency_p99_ms"] = round(lat[int(len(lat) * 0.99) - 1], 1)
    out["latency_lost"] = len(texts) - len(lat)

    # a 20 s broker outage with 100 scans taken meanwhile
    broker.stop()
    outage = [f"{tag}-out-{i:05d}" for i in range(100)]
    await scan_paced(peer.pty, outage, 0.2)
    await asyncio.sleep(max(0.0, 20 - 100 * 0.2))
    broker.start()
    t0 = time.perf_counter()
    ok = await consumer.wait_all(outage, 120)
    got = [consumer.seen[t] for t in outage if t in consumer.seen]
    out["outage_delivered"] = len(got)
    out["outage_recovery_s"] = round(max(got) - t0, 2) if ok else None

    # a backlog taken with the broker down
    broker.stop()
    backlog = [f"{tag}-bl-{i:06d}" for i in range(a.backlog)]
    await scan_paced(peer.pty, backlog, 0.002)
    await asyncio.sleep(2)
    broker.start()
    await consumer.wait_all(backlog, 300)
    times = sorted(consumer.seen[t] for t in backlog if t in consumer.seen)
    out["backlog_delivered"] = len(times)
    out["backlog_rate_per_s"] = (
        round((len(times) - 1) / (times[-1] - times[0])) if len(times) > 1 else 0
    )

    # kill -9 right after steady scanning at 20 scans/s (no scan written while it is down:
    # a pty's input waiting for the next open is not what is measured)
    killed = [f"{tag}-kill-{i:05d}" for i in range(a.kills * 30)]
    for k in range(a.kills):
        await scan_paced(peer.pty, killed[k * 30 : (k + 1) * 30], 0.05)
        peer.kill()
        peer.start()
        await peer.ready(consumer, f"{tag}{k}")
    await consumer.wait_all(killed, 60)
    delivered = sum(t in consumer.seen for t in killed)
    out["kill9_scans"] = len(killed)
    out["kill9_lost"] = len(killed) - delivered
    peer.kill()
    return out


@contextlib.asynccontextmanager
async def background(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", type=int, default=200)
    ap.add_argument("--backlog", type=int, default=5000)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument(
        "--peer-venv", type=Path, default=Path.home() / ".cache/madoguchi-bench/tb-gateway"
    )
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    python = ensure_peer(a.peer_venv)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="madoguchi-peer-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Broker(work / "broker")
        broker.start()
        consumer = Consumer(broker.port)
        try:
            async with (
                background(consumer.run()),
                running_registry(broker.port, work / "registry.db"),
            ):
                for cls in (Madoguchi, Gateway):
                    pty = Pty(work / f"tty-{cls.__name__}")
                    d = work / cls.__name__
                    d.mkdir()
                    peer: Peer = (
                        Madoguchi(d, broker.port, pty)
                        if cls is Madoguchi
                        else Gateway(d, broker.port, pty, python)
                    )
                    async with background(drain_pty(peer)):
                        try:
                            results[peer.name] = await measure(peer, broker, consumer, a)
                        finally:
                            peer.kill()
                            pty.close()
        finally:
            broker.stop()
    print(
        f"peer side by side: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {a.scans} latency scans, backlog {a.backlog}, "
        f"{a.kills} kill -9s"
    )
    keys = list(next(iter(results.values())))
    print("| | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r.get(k)) for r in results.values()) + " |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    tune_gc()  # the registry hosted here runs as `madoguchi registry` does
    asyncio.run(main())
