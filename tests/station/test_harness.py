"""The harness itself (agent.testing): what the tests, the benchmarks and the demo stand on."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import sys
from pathlib import Path

import aiomqtt
import pytest

import agent.testing
from agent.config import load_config
from agent.contract.records import uuid7
from agent.errors import HarnessError
from agent.testing import (
    Broker,
    LoggedProcess,
    Pty,
    RegistryProcess,
    free_port,
    running_registry,
    serial_scanner,
    start_mosquitto,
    write_config,
)
from tests.support.central import envelope, record


def test_free_port_can_be_bound_and_nothing_listens_there() -> None:
    port = free_port()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_free_port_is_below_the_ephemeral_range_and_spread_over_it() -> None:
    """A connection takes its local port from the ephemeral range: a port picked there can
    be taken between the pick and the server's bind, so none is picked there."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(50)}
    assert all(10000 <= p < low for p in ports)
    assert len(ports) > 40  # spread over the range, not one port again and again


def test_free_port_passes_over_a_port_something_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken = held.getsockname()[1]
        other = free_port()
        picks = iter([taken, taken, other])
        monkeypatch.setattr(agent.testing._PICK, "randint", lambda a, b: next(picks))
        assert free_port() == other


@pytest.mark.broker
def test_broker_listens_once_started_and_again_after_a_restart(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    try:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass
        broker.stop()
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", broker.port)),
        ):
            pass
        broker.start()  # the same port, so that clients find it again
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass
    finally:
        broker.kill()


@pytest.mark.broker
def test_mosquitto_with_a_given_config_file(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "given.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest none\n")
    proc = start_mosquitto(conf, port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.broker
def test_mosquitto_that_cannot_start_says_why(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("this_is_no_option true\n")
    with pytest.raises(HarnessError, match="mosquitto exited") as e:
        start_mosquitto(conf, free_port())
    assert "this_is_no_option" in str(e.value)  # mosquitto's own words


def test_write_config_is_a_config_load_config_accepts(tmp_path: Path) -> None:
    scanner = tmp_path / "ttyScanner"
    cfg = load_config(write_config(tmp_path, 18830, scanner=scanner, name="station-07"))
    assert (cfg.agent.site, cfg.agent.name) == ("toda-city-hall-1f", "station-07")
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("127.0.0.1", 18830)
    assert cfg.agent.data_dir == tmp_path / "data-station-07"
    [dev] = cfg.devices
    assert dev.name == "ticket-scanner"
    assert dev.port == str(scanner)  # type: ignore[union-attr]
    assert (dev.host_ack, dev.host_nak) == ("\x06", "\x15")  # type: ignore[union-attr]


def test_write_config_options_reach_the_config(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        1883,
        devices=serial_scanner(tmp_path / "tty", name="desk-2", host_nak=None),
        site="demo-city-hall-1f",
        telemetry_interval_s=None,
        mqtt="",
        outbox="resend_after_s = 5",
        path=tmp_path / "agent.toml",
        data_dir=tmp_path / "data",
    )
    assert path == tmp_path / "agent.toml"
    cfg = load_config(path)
    assert cfg.agent.site == "demo-city-hall-1f"
    assert cfg.agent.data_dir == tmp_path / "data"
    assert cfg.outbox.resend_after_s == 5
    [dev] = cfg.devices
    assert dev.name == "desk-2"
    assert dev.host_nak == ""  # type: ignore[union-attr]  # none given: the profile's


def test_write_config_wants_devices_or_a_scanner(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="devices or a scanner"):
        write_config(tmp_path, 1883)


def test_pty_carries_bytes_both_ways(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "ttyTest")
    try:
        assert pty.link.resolve() == Path(pty.device)
        with open(pty.link, "r+b", buffering=0) as agent_side:
            pty.scan("4901234567894")
            got = b""
            while len(got) < 14:
                got += agent_side.read(14 - len(got))
            assert got == b"4901234567894\r"
            agent_side.write(b"\x06\x15")
            assert pty.read(2) == b"\x06\x15"
    finally:
        pty.close()
    assert not pty.link.exists()


async def test_pty_aread_is_woken_by_the_agents_bytes(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "ttyTest")
    try:
        with open(pty.link, "r+b", buffering=0) as agent_side:
            reading = asyncio.create_task(pty.aread(2))
            await asyncio.sleep(0)
            agent_side.write(b"\x06")
            agent_side.write(b"\x06")
            assert await reading == b"\x06\x06"
    finally:
        pty.close()


def test_logged_process_waits_for_a_line_and_keeps_the_log(tmp_path: Path) -> None:
    code = "import time; print('ready now', flush=True); time.sleep(60)"
    log = tmp_path / "child.log"
    proc = LoggedProcess([sys.executable, "-c", code], log)
    proc.start()
    proc.wait_log("ready now", timeout=20)
    proc.stop()
    assert "ready now" in log.read_text()
    with pytest.raises(HarnessError, match="exited"):
        proc.wait_log("never printed", timeout=20)


def test_logged_process_that_exits_early_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    code = "import sys; print('config is wrong'); sys.exit(3)"
    proc = LoggedProcess([sys.executable, "-c", code], tmp_path / "child.log")
    proc.start()
    with pytest.raises(HarnessError, match=r"exited 3:\nconfig is wrong"):
        proc.wait_log("ready", timeout=20)


@pytest.mark.broker
async def test_registry_subprocess_starts_and_stores_a_record_sent_to_it(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "registry.db"
    registry = RegistryProcess(broker.port, db, tmp_path / "registry.log")
    registry.start()
    try:
        await asyncio.to_thread(registry.wait_ready)
        rec = record(1, rid=str(uuid7()))
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe("madoguchi/v1/site-h/agent-h/ack", qos=1)
            await client.publish(
                "madoguchi/v1/site-h/agent-h/records",
                envelope("site-h", "agent-h", [rec]),
                qos=1,
            )
            async with asyncio.timeout(20):
                async for m in client.messages:
                    assert rec["id"] in m.payload.decode()  # type: ignore[union-attr]
                    break
    finally:
        registry.stop()
    assert "stored " in registry.text()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id FROM records").fetchall()
    assert rows == [(rec["id"],)]


@pytest.mark.broker
async def test_running_registry_yields_once_connected_and_probes_what_it_stores(
    broker: Broker, tmp_path: Path
) -> None:
    seen: list[str] = []
    async with running_registry(
        broker.port, tmp_path / "registry.db", on_stored=lambda s: seen.append(s.record["id"])
    ) as probe:
        assert probe.registry.connected.is_set()
        rec = record(1)
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(
                "madoguchi/v1/site-h/agent-h/records", envelope("site-h", "agent-h", [rec]), qos=1
            )
        [stored] = await probe.wait_for(1)
    assert stored["id"] == rec["id"]
    assert seen == [rec["id"]]


@pytest.mark.broker
async def test_running_registry_that_keeps_nothing_still_stores_and_calls_back(
    broker: Broker, tmp_path: Path
) -> None:
    """`keep=False` (the benchmarks): every record stored and passed to `on_stored`, none
    held by the probe."""
    seen: list[str] = []
    db = tmp_path / "registry.db"
    recs = [record(i) for i in range(1, 4)]
    async with running_registry(
        broker.port, db, on_stored=lambda s: seen.append(s.record["id"]), keep=False
    ) as probe:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(
                "madoguchi/v1/site-h/agent-h/records", envelope("site-h", "agent-h", recs), qos=1
            )
            async with asyncio.timeout(20):
                while len(seen) < 3:
                    probe.changed.clear()
                    await probe.changed.wait()
        assert probe.stored == []
        with pytest.raises(HarnessError, match="keeps nothing"):
            await probe.wait_for(1)
    assert seen == [r["id"] for r in recs]
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM records").fetchone() == (3,)


async def test_running_registry_that_cannot_connect_says_so(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="did not connect"):
        async with running_registry(free_port(), tmp_path / "r.db", connect_timeout_s=0.5):
            pass
