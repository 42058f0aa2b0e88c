"""No input ends the station (issue #15, points 4-7 and 10), on real processes.

A real `madoguchi run` process, a real mosquitto, the reference registry and a pty
scanner: hostile payloads on the ack, cmd and blob topics; idle and slow-header
sockets against the kiosk API; a second agent on the same data_dir; file modes
under umask 022; SIGTERM while the broker is frozen (SIGSTOP).

Not under the contract spy: these tests send what the contract forbids on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import httpx
import pytest

from agent.contract.topics import DEFAULT_PREFIX, Topics
from agent.testing import (
    LOOPBACK,
    AgentProcess,
    Broker,
    Pty,
    RegistryProbe,
    free_port,
    mqtt_collect,
    payload,
    write_config,
)

pytestmark = [pytest.mark.broker]

ACK = b"\x06"
TOPICS = Topics(DEFAULT_PREFIX).station("toda-city-hall-1f", "station-03")


def _with_api(cfg: Path, port: int, extra: str = "") -> Path:
    cfg.write_text(cfg.read_text() + f"\n[api]\nport = {port}\n{extra}\n")
    return cfg


@contextlib.contextmanager
def _agent(cfg: Path, log: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(cfg, log)
    try:
        agent.start()
        yield agent
    finally:
        agent.close()


async def _ready(agent: AgentProcess, needle: str = "connected to 127.0.0.1") -> None:
    await asyncio.to_thread(agent.wait_log, needle, 20.0)


async def _scan_acked(pty: Pty, text: str) -> None:
    pty.scan(text)
    assert await pty.aread(1, timeout=5) == ACK, f"no ACK for {text!r}"


# -- point 4: hostile MQTT input -------------------------------------------------------

HOSTILE: list[bytes] = [
    b"[" * 200_000,  # RecursionError in json
    b'{"ids":' * 100_000,
    b"\xff\xfe\x00garbage",  # not UTF-8
    b"",
    b"null",
    b"[1, 2, 3]",
    b'{"ids": 5}',
    b'{"ids": [1, {"a": 2}]}',
    b'{"ids": ["' + b"x" * 10_000 + b'"]}',
    b'{"request_id": [1], "device": {"x": 1}}',
    b"9" * 100_000,  # int too long to convert
    b"x" * (2 * 1_048_576),  # over mqtt.max_inbound_bytes
]


async def test_hostile_payloads_leave_the_agent_acking_and_delivering(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, outbox="resend_after_s = 2")
    with _agent(cfg, tmp_path / "agent.log") as agent:
        await _ready(agent)
        await asyncio.to_thread(agent.wait_connected)  # its open() flushes input
        await _scan_acked(pty_port, "before-0")
        topics = [
            TOPICS.ack,
            TOPICS.command("ping"),
            TOPICS.command("capture_photo"),
            TOPICS.command("diagnostics"),
            TOPICS.command("x" * 300),
            f"{TOPICS.base}/blobs/00000000-0000-0000-0000-000000000000/missing",
        ]
        async with aiomqtt.Client(LOOPBACK, broker.port) as c:
            for _ in range(3):
                for topic in topics:
                    for body in HOSTILE:
                        await c.publish(topic, body, qos=1)
        for i in range(5):
            await _scan_acked(pty_port, f"after-{i}")
        got = await registry.wait_for(6, timeout=20)
        assert {r["data"]["text"] for r in got} >= {"before-0", *(f"after-{i}" for i in range(5))}
        agent.check_running()

        # the commands still answer, and the station says it is degraded and why
        async with aiomqtt.Client(LOOPBACK, broker.port) as c:
            await c.subscribe(TOPICS.command_result("ping"), qos=1)
            await c.publish(TOPICS.command("ping"), b'{"request_id": "p1"}', qos=1)
            async with asyncio.timeout(10):
                async for m in c.messages:
                    body = payload(m)
                    if body.get("request_id") == "p1":
                        assert body["ok"] is True
                        break
        tele = [payload(m) for m in await mqtt_collect(broker.port, TOPICS.telemetry, 2.5)]
        assert tele, "no telemetry"
        inbound = tele[-1]["uplink"]["inbound"]
        assert inbound["oversize"] >= 3 * len(topics)
        assert inbound["malformed"] >= 10
        assert inbound["degraded"] and "inbound faults" in inbound["degraded"]
        agent.check_running()
    log = agent.text()
    assert "Traceback" not in log
    # one line per change of fault kind, not one per hostile message (216 were sent)
    assert log.count("inbound message dropped") < 60, log.count("inbound message dropped")


# -- point 5: the kiosk API bounded -------------------------------------------------------


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_idle_and_slow_header_sockets_do_not_jam_the_kiosk(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    api_port = free_port()
    cfg = _with_api(
        write_config(tmp_path, broker.port, scanner=pty_port.link),
        api_port,
        "header_timeout_s = 6\nmax_connections = 64",
    )
    sockets: list[socket.socket] = []
    with _agent(cfg, tmp_path / "agent.log") as agent:
        await _ready(agent)
        await _ready(agent, "api: serving the kiosk")
        token = (cfg.parent / "data-station-03" / "api-token").read_text().strip()
        base = f"http://127.0.0.1:{api_port}"
        headers = {"Authorization": f"Bearer {token}"}
        try:
            for _ in range(100):  # idle: connect, send nothing
                sockets.append(socket.create_connection((LOOPBACK, api_port)))
            slow = []
            for _ in range(200):  # slow header: a request line, then a byte now and then
                s = socket.create_connection((LOOPBACK, api_port))
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                sockets.append(s)
                slow.append(s)
            latencies = []
            async with httpx.AsyncClient(base_url=base, timeout=5) as kiosk:
                for i in range(10):
                    for s in slow[i::10]:
                        with contextlib.suppress(OSError):
                            s.send(b"X")
                    t0 = time.monotonic()
                    r = await kiosk.get("/v1/status", headers=headers)
                    latencies.append(time.monotonic() - t0)
                    assert r.status_code == 200, r.text
                    await _scan_acked(pty_port, f"during-{i}")
                    await asyncio.sleep(0.3)
            assert max(latencies) < 2.0, latencies
            # the agent holds max_connections sockets at most (plus its own ~40), not 300
            fds = _open_fds(agent.pid)
            assert fds < 64 + 60, f"{fds} descriptors open with 300 hostile sockets"
            # the slow ones are closed by the header deadline, not kept forever
            await asyncio.sleep(3.0)
            closed = 0
            for s in slow:
                s.settimeout(0.01)
                try:
                    closed += s.recv(1) == b""
                except (TimeoutError, BlockingIOError):
                    pass
                except OSError:
                    closed += 1
            assert closed == len(slow), f"{closed} of {len(slow)} slow sockets closed"
            await registry.wait_for(10, timeout=20)
            agent.check_running()
        finally:
            for s in sockets:
                s.close()
    print(f"kiosk latency max {max(latencies) * 1000:.0f} ms, agent fds {fds}")
    log = agent.text()
    assert log.count("api:") < 20, log  # a count, not a line per connection


async def test_a_small_descriptor_limit_caps_connections_before_accept_fails(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    """nofile=256 with api.max_connections=512 and 300 sockets: the cap comes down to what
    fits, accept() never fails, the kiosk's requests and the scans go on."""
    api_port = free_port()
    cfg = _with_api(
        write_config(tmp_path, broker.port, scanner=pty_port.link),
        api_port,
        "header_timeout_s = 60\nmax_connections = 512",
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.argv = ["prlimit", "--nofile=256:256", *agent.argv]
    sockets: list[socket.socket] = []
    latencies: list[float] = []
    try:
        agent.start()
        await _ready(agent)
        await _ready(agent, "api: serving the kiosk")
        token = (cfg.parent / "data-station-03" / "api-token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(300):
            sockets.append(socket.create_connection((LOOPBACK, api_port)))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as k:
            for i in range(5):
                t0 = time.monotonic()
                r = await k.get("/v1/status", headers=headers)
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
                await _scan_acked(pty_port, f"nofile-{i}")
        await registry.wait_for(5, timeout=20)
        agent.check_running()
        fds = _open_fds(agent.pid)
        assert fds <= 256 - 64, fds
    finally:
        for s in sockets:
            s.close()
        agent.close()
    log = agent.text()
    print(f"nofile=256: kiosk latency max {max(latencies) * 1000:.0f} ms, agent fds {fds}")
    assert "max_connections=512 does not fit the descriptor limit 256; using 64" in log, log
    assert "Too many open files" not in log and "cannot accept" not in log, log
    assert max(latencies) < 2.0, latencies


# -- point 6: one agent per data_dir -------------------------------------------------------


async def test_second_run_on_the_same_data_dir_exits_1_naming_the_pid(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    with _agent(cfg, tmp_path / "first.log") as first:
        await _ready(first)
        second = AgentProcess(cfg, tmp_path / "second.log")
        second.start()
        try:
            assert second.proc is not None
            code = await asyncio.to_thread(second.proc.wait, 15)
        finally:
            second.close()
        lines = [line for line in second.text().splitlines() if line.strip()]
        assert code == 1
        assert len(lines) == 1, lines
        assert f"pid {first.pid}" in lines[0] and "data_dir" in lines[0], lines[0]
        first.check_running()
        assert "reconnecting" not in first.text()


# -- point 7: private files whatever the umask -------------------------------------------


async def test_file_modes_under_umask_022(broker: Broker, pty_port: Pty, tmp_path: Path) -> None:
    data = tmp_path / "data-station-03"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    stale = data / "old-side-file"
    stale.write_text("x")
    stale.chmod(0o644)
    cfg = _with_api(write_config(tmp_path, broker.port, scanner=pty_port.link), free_port())
    old = os.umask(0o022)
    try:
        agent_cm = _agent(cfg, tmp_path / "agent.log")
        agent = agent_cm.__enter__()
    finally:
        os.umask(old)
    try:
        await _ready(agent)
        await _ready(agent, "api: serving the kiosk")
        await asyncio.to_thread(agent.wait_connected)  # its open() flushes input
        await _scan_acked(pty_port, "private-0")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir() if p.is_file()}
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm", "api-token", "agent.lock"):
            assert modes.get(name) == 0o600, (name, modes)
        assert all(m & 0o077 == 0 for m in modes.values()), modes
        blobs = data / "blobs"
        if blobs.exists():
            assert stat.S_IMODE(blobs.stat().st_mode) == 0o700
    finally:
        agent_cm.__exit__(None, None, None)


# -- point 10: bounded shutdown --------------------------------------------------------


async def test_sigterm_with_a_frozen_broker_ends_within_5_s(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = _with_api(write_config(tmp_path, broker.port, scanner=pty_port.link), free_port())
    assert broker.proc is not None
    with _agent(cfg, tmp_path / "agent.log") as agent:
        await _ready(agent)
        await _ready(agent, "api: serving the kiosk")
        await asyncio.to_thread(agent.wait_connected)  # its open() flushes input
        await _scan_acked(pty_port, "frozen-0")
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            await _scan_acked(pty_port, "frozen-1")  # stored while the broker is frozen
            assert agent.proc is not None
            t0 = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(agent.proc.wait, 15)
            took = time.monotonic() - t0
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
    print(f"SIGTERM with a frozen broker: exit {code} after {took:.2f} s")
    assert took < 5.0, f"{took:.1f} s\n{agent.text()[-2000:]}"
    assert code == 0, agent.text()[-2000:]


async def test_sigterm_while_connecting_to_a_frozen_broker_ends_within_5_s(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    """The broker's kernel accepts the TCP connection, the broker never sends CONNACK."""
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        with _agent(cfg, tmp_path / "agent.log") as agent:
            await _ready(agent, "running with 1 device(s)")
            await asyncio.sleep(0.5)  # inside the connect, waiting for CONNACK
            assert "connected to" not in agent.text()
            assert agent.proc is not None
            t0 = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(agent.proc.wait, 15)
            took = time.monotonic() - t0
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    print(f"SIGTERM while connecting to a frozen broker: exit {code} after {took:.2f} s")
    assert took < 5.0, f"{took:.1f} s\n{agent.text()[-2000:]}"
    assert code == 0, agent.text()[-2000:]
