"""The CLI commands as a technician runs them."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from agent.contract.records import Read, envelope
from agent.station.outbox import Outbox
from agent.testing import Broker, write_config
from tests.support import ROOT
from tests.support.cli import run_cli


def madoguchi(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=ROOT, timeout=None)


async def test_outbox_stats(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 1883, devices="")
    r = madoguchi("outbox", "stats", "--config", str(cfg))
    assert r.returncode == 1 and "no outbox database" in r.stderr
    db = tmp_path / "data-station-03" / "outbox.db"
    async with Outbox(db) as ob:
        for i in range(3):
            await ob.append(Read(device="d", kind="barcode", data={"text": str(i)}))
    r = madoguchi("outbox", "stats", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert (stats["pending"], stats["unconfirmed"], stats["last_seq"]) == (3, 3, 3)
    r = madoguchi("outbox", "stats", "--config", str(cfg))
    assert "unconfirmed" in r.stdout and "3" in r.stdout


@pytest.mark.broker
async def test_registry_command_stores_then_acks(broker: Broker, tmp_path: Path) -> None:
    db = tmp_path / "reg.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "registry",
            "--host",
            "127.0.0.1",
            "--port",
            str(broker.port),
            "--db",
            str(db),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        async with Outbox(tmp_path / "o.db") as ob:
            recs = [
                await ob.append(Read(device="scanner", kind="barcode", data={"text": f"T{i}"}))
                for i in range(3)
            ]
        base = "madoguchi/v1/site-a/agent-1"
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.subscribe(f"{base}/ack", qos=1)
            body = envelope("site-a", "agent-1", recs)
            acks: list[str] = []

            async def publish_until_acked() -> None:
                while len(acks) < 6:
                    await c.publish(f"{base}/records", body, qos=1)
                    try:
                        async with asyncio.timeout(1):
                            async for m in c.messages:
                                acks.extend(json.loads(m.payload)["ids"])  # type: ignore[arg-type]
                                break
                    except TimeoutError:
                        pass  # the registry was still connecting: send again

            await asyncio.wait_for(publish_until_acked(), 20)
        assert set(acks) == {r.id for r in recs}
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.count("stored    site-a/agent-1") == 3
    assert "duplicate site-a/agent-1" in out
    import sqlite3

    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (3,)
    conn.close()


def test_demo_says_ack_means_stored_and_shows_validity_apart() -> None:
    """An INVALID ticket is stored (ACK) too: the demo must not read as "valid"."""
    r = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--scans", "2"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    scans = [x for x in r.stdout.splitlines() if x.startswith("scan ")]
    assert len(scans) == 2
    assert scans[0].endswith("-> ACK = stored (beep); read valid vaccination_ticket")
    assert scans[1].endswith(
        "-> ACK = stored (beep); read INVALID vaccination_ticket bad_check_digit"
    )
    assert "ACK = stored in the outbox; validity is shown separately" in r.stdout
    assert "scanner got ACK" not in r.stdout


def _processes_under(workdir: str) -> list[str]:
    """Command lines of running processes that name `workdir` (the demo's broker config)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if workdir in cmdline:
            out.append(f"{proc.name}: {cmdline}")
    return out


def test_demo_loop_stops_on_ctrl_c_honestly_and_leaves_no_broker() -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--loop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout is not None
    lines: list[str] = []
    try:
        while sum(x.startswith("registry ") for x in lines) < 3:
            line = p.stdout.readline()
            assert line, "".join(lines) + (p.stderr.read() if p.stderr else "")
            lines.append(line)
        workdir = next(x.split()[1] for x in lines if x.startswith("outbox ")).split("/data/")[0]
        assert _processes_under(workdir), "the demo's broker runs under its work directory"
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    summary = [x for x in rest.splitlines() if " scans" in x]
    assert p.returncode == 0, rest + err
    assert summary and (
        "every one stored by the registry once" in summary[0] or "ACKed" in summary[0]
    )
    assert "Traceback" not in err, err
    assert _processes_under(workdir) == []  # no mosquitto (or anything) left behind
    assert not Path(workdir).exists()


@pytest.mark.parametrize("bad", ["0", "-2", "x"])
def test_demo_scans_must_be_one_or_more(bad: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "demo", f"--scans={bad}"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and "argument --scans:" in r.stderr.splitlines()[-1], r.stderr
    assert "broker" not in r.stdout  # refused before anything started
