"""Registry throughput: records per second stored *and acked*, 1/2/4 consumers, SQLite and
PostgreSQL, on one mosquitto.

Real parts only: mosquitto on a loopback port, a PostgreSQL cluster of its own
(initdb + pg_ctl in a temporary directory, as the `postgres` user when run as
root), `madoguchi registry --shared bench` consumer processes. The load is a
fleet of simulated agents publishing envelopes in the contract's format
(QoS 1) as fast as the broker takes them; a record counts when its ack is back.

    python bench/bench_registry.py [--records 6000] [--agents 100] [--batch 1,10]
                                   [--consumers 1,2,4] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt

from agent.testing import RegistryProcess, free_port, start_mosquitto, stop_mosquitto

PREFIX = "madoguchi/v1"
SITE = "bench"


class Mosquitto:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        # unlimited queues: the bench measures the registry, not the broker's drop policy
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_queued_messages 0\nmax_inflight_messages 0\n"
            "log_dest stdout\n"
        )
        self.log = (workdir / "mosquitto.log").open("ab")
        self.proc = start_mosquitto(conf, self.port, stdout=self.log, timeout=15)

    def stop(self) -> None:
        stop_mosquitto(self.proc)
        self.log.close()


class Postgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="madoguchi-bench-pg-"))
        self.port = free_port()
        bindir = next(
            (p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)),
            None,
        )
        if bindir is None:
            sys.exit("PostgreSQL is not installed (apt install postgresql)")
        self.bindir = bindir
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = f"-k {self.dir} -p {self.port} -c listen_addresses=''"
        self._run(
            "pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.dir / "pg.log"), "-w", "start"
        )
        self.data = data
        self.n = 0

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args], check=True, capture_output=True
        )

    def new_dsn(self) -> str:
        import psycopg

        self.n += 1
        name = f"bench_{self.n}"
        base = f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@/{name}?host={self.dir}&port={self.port}"

    def stop(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "fast",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


def record(seq: int) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "seq": seq,
        "captured_at": "2026-11-22T06:34:50.123Z",
        "device": "ticket-scanner",
        "kind": "barcode",
        "source": "device",
        "data": {
            "text": f"1111224100{seq:08d}",
            "symbology": "]Q1",
            "interpretation": {"type": "vaccination_ticket", "valid": True, "problems": []},
        },
    }


async def load(port: int, total: int, agents: int, batch: int) -> tuple[float, int]:
    """Publish `total` records as `batch`-record envelopes from `agents` agents; wait for acks."""
    pending: set[str] = set()
    messages: list[tuple[str, bytes]] = []
    seqs = dict.fromkeys(range(agents), 0)
    i = 0
    while i < total:
        a = (i // batch) % agents
        recs = []
        for _ in range(min(batch, total - i)):
            seqs[a] += 1
            recs.append(record(seqs[a]))
        i += len(recs)
        pending.update(str(r["id"]) for r in recs)
        body = {"schema": "madoguchi.records/1", "site": SITE, "agent": f"a{a:04d}"}
        body["records"] = recs
        messages.append((f"{PREFIX}/{SITE}/a{a:04d}/records", json.dumps(body).encode()))
    done = asyncio.Event()
    async with (
        aiomqtt.Client("127.0.0.1", port, max_inflight_messages=500) as pub,
        aiomqtt.Client("127.0.0.1", port) as sub,
    ):
        await sub.subscribe(f"{PREFIX}/{SITE}/+/ack", qos=1)

        async def acks() -> None:
            async for m in sub.messages:
                pending.difference_update(json.loads(m.payload)["ids"])  # type: ignore[arg-type]
                if not pending:
                    done.set()
                    return

        listener = asyncio.create_task(acks())
        start = time.perf_counter()
        for topic, payload in messages:
            await pub.publish(topic, payload, qos=1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - start
        listener.cancel()
    return elapsed, len(pending)


def consumers(port: int, db: str, n: int, workdir: Path) -> list[RegistryProcess]:
    procs = []
    for i in range(n):
        log = workdir / f"consumer-{i}.log"
        extra = ("--shared", "bench", "--quiet", "--log-level", "INFO")
        procs.append(RegistryProcess(port, db, log, *extra))
        procs[-1].start()
    return procs


def wait_connected(procs: list[RegistryProcess]) -> None:
    """Until all consumers have subscribed (each logs it once)."""
    for p in procs:
        p.wait_ready(30)


def one_run(
    run: Path, pg: Postgres | None, n: int, records: int, agents: int, batch: int
) -> tuple[float, int]:
    """One measurement on a fresh broker and a fresh database: (records/s, missing)."""
    run.mkdir()
    db = pg.new_dsn() if pg is not None else str(run / "registry.db")
    broker = Mosquitto(run)
    procs = consumers(broker.port, db, n, run)
    try:
        wait_connected(procs)
        elapsed, missing = asyncio.run(load(broker.port, records, agents, batch))
    finally:
        for p in procs:
            p.stop()
        broker.stop()
    return (records - missing) / elapsed, missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=6000)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--batch", default="1,10")
    ap.add_argument("--consumers", default="1,2,4")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row: median (min-max)")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpu(s), {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    print(f"{args.records} records from {args.agents} simulated agents per run\n")
    print(
        f"{'backend':<11} {'consumers':>9} {'rec/msg':>7} {'records/s':>10} "
        f"{'(min-max)':>13} {'missing':>8}"
    )
    work = Path(tempfile.mkdtemp(prefix="madoguchi-bench-"))
    pg: Postgres | None = None
    try:
        for backend in args.backends.split(","):
            if backend == "postgresql":
                pg = Postgres()
            for n in (int(x) for x in args.consumers.split(",")):
                for batch in (int(x) for x in args.batch.split(",")):
                    rates, lost = [], 0
                    for k in range(args.repeat):
                        rate, missing = one_run(
                            work / f"{backend}-{n}-{batch}-{k}",
                            pg,
                            n,
                            args.records,
                            args.agents,
                            batch,
                        )
                        rates.append(rate)
                        lost += missing
                    rates.sort()
                    spread = f"({rates[0]:.0f}-{rates[-1]:.0f})"
                    print(
                        f"{backend:<11} {n:>9} {batch:>7} {statistics.median(rates):>10.0f} "
                        f"{spread:>13} {lost:>8}",
                        flush=True,
                    )
            if pg is not None:
                pg.stop()
                pg = None
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
