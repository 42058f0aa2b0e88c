"""Registry throughput: records per second stored *and acked*, 1/2/4 consumers, SQLite and
PostgreSQL, on one mosquitto.

Real parts only: mosquitto on a loopback port, a PostgreSQL cluster of its own
(initdb + pg_ctl in a temporary directory, as the `postgres` user when run as
root), `madoguchi registry --shared bench` consumer processes. The load is a
fleet of simulated agents publishing envelopes in the contract's format
(QoS 1, many in flight, from raw sockets so that the load costs the two cores
little); a record counts when its ack is back. Each row also gives the consumers'
CPU time per record, which holds steadier than the rate on a shared machine.

    python bench/bench_registry.py [--records 6000] [--agents 100] [--batch 1,10]
                                   [--consumers 1,2,4] [--backends sqlite,postgresql]
                                   [--root CHECKOUT]   (another checkout's registry)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from agent.testing import RegistryProcess, free_port, start_mosquitto, stop_mosquitto

PREFIX = "madoguchi/v1"
#: the checkout whose registry is measured (--root): this one unless told
ROOT_CODE = [Path(__file__).resolve().parent.parent]
SITE = "bench"
EXTRA: list[str] = os.environ.get("BENCH_REGISTRY_ARGS", "").split()


class Mosquitto:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        # unlimited queues: the bench measures the registry, not the broker's drop policy
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\n"
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


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining(len(body)) + body


def _connect(port: int, client_id: str) -> socket.socket:
    """A raw MQTT 3.1.1 connection (clean session, keepalive 0) past its CONNACK."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _utf8(client_id)
    sock.sendall(_packet(0x10, body))
    connack = b""
    while len(connack) < 4:
        connack += sock.recv(4 - len(connack))
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"broker refused the bench client: {connack!r}")
    return sock


class _AckReader:
    """Reads the registry's acks (QoS 0 to us) from a raw socket and counts ids: parsing a
    packet costs microseconds here, not the 100+ of a full client beside the registry."""

    def __init__(self, sock: socket.socket, pending: set[str]) -> None:
        self.sock = sock
        self.pending = pending
        self.done = threading.Event()
        self.buf = bytearray()

    def run(self) -> None:
        while not self.done.is_set():
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return
            self.buf += chunk
            self._parse()

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        while True:
            if len(buf) - pos < 2:
                break
            n, mult, i = 0, 1, pos + 1
            while i < len(buf):
                n += (buf[i] & 0x7F) * mult
                mult *= 128
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            else:
                break
            if len(buf) - i < n:
                break
            first, body = buf[pos], bytes(buf[i : i + n])
            pos = i + n
            if first >> 4 == 3:  # PUBLISH, QoS 0: topic, payload
                tlen = struct.unpack_from("!H", body)[0]
                self.pending.difference_update(json.loads(body[2 + tlen :])["ids"])
                if not self.pending:
                    self.done.set()
        del buf[:pos]


def load(port: int, total: int, agents: int, batch: int) -> tuple[float, int]:
    """Publish `total` records as `batch`-record envelopes from `agents` agents (QoS 1,
    pre-encoded, many in flight, as a fleet sends them); wait for every ack.

    The fleet is raw sockets, not an MQTT client library: on a 2-CPU machine a Python
    client publishing 6,000 messages a second costs as much CPU as the registry it
    measures, and both share the cores (measured: 330 µs per message against the
    registry's 305)."""
    pending: set[str] = set()
    packets: list[bytes] = []
    seqs = dict.fromkeys(range(agents), 0)
    i = 0
    mid = 0
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
        mid = mid % 65535 + 1
        topic = f"{PREFIX}/{SITE}/a{a:04d}/records"
        payload = json.dumps(body).encode()
        packets.append(_packet(0x32, _utf8(topic) + struct.pack("!H", mid) + payload))
    sub = _connect(port, "bench-acks")
    sub.sendall(_packet(0x82, struct.pack("!H", 1) + _utf8(f"{PREFIX}/{SITE}/+/ack") + b"\0"))
    suback = sub.recv(5)
    if len(suback) != 5 or suback[0] != 0x90 or suback[4] != 0:
        raise RuntimeError(f"ack subscription refused: {suback!r}")
    reader = _AckReader(sub, pending)
    pub = _connect(port, "bench-fleet")
    puback_bytes = [0]

    def drain_pubacks() -> None:  # PUBACKs are 4 bytes each; only counted
        while puback_bytes[0] < 4 * len(packets):
            chunk = pub.recv(1 << 16)
            if not chunk:
                return
            puback_bytes[0] += len(chunk)

    threads = [
        threading.Thread(target=reader.run, name="bench-acks", daemon=True),
        threading.Thread(target=drain_pubacks, name="bench-pubacks", daemon=True),
    ]
    for t in threads:
        t.start()
    start = time.perf_counter()
    for k in range(0, len(packets), 200):  # 200 messages per write: a fleet, not one station
        pub.sendall(b"".join(packets[k : k + 200]))
    reader.done.wait(300)
    elapsed = time.perf_counter() - start
    missing = len(pending)
    for sock in (pub, sub):
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        sock.close()
    return elapsed, missing


def consumers(port: int, db: str, n: int, workdir: Path) -> list[RegistryProcess]:
    procs = []
    for i in range(n):
        log = workdir / f"consumer-{i}.log"
        extra = ("--shared", "bench", "--quiet", "--log-level", "INFO", *EXTRA)
        procs.append(RegistryProcess(port, db, log, *extra))
        procs[-1].cwd = ROOT_CODE[0]  # `python -m agent` runs the code in that checkout
        procs[-1].start()
    return procs


def wait_connected(procs: list[RegistryProcess]) -> None:
    """Until all consumers have subscribed (each logs it once)."""
    for p in procs:
        p.wait_ready(30)


def cpu_s(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(
    run: Path, pg: Postgres | None, n: int, records: int, agents: int, batch: int
) -> tuple[float, int, float]:
    """One measurement on a fresh broker and a fresh database: (records/s, missing,
    the consumers' CPU µs per record). CPU per record holds steadier than the rate on a
    shared machine: a rate is also whatever else the cores did."""
    run.mkdir()
    db = pg.new_dsn() if pg is not None else str(run / "registry.db")
    broker = Mosquitto(run)
    procs = consumers(broker.port, db, n, run)
    try:
        wait_connected(procs)
        pids = [p.proc.pid for p in procs if p.proc is not None]
        before = sum(cpu_s(pid) for pid in pids)
        elapsed, missing = load(broker.port, records, agents, batch)
        cpu = sum(cpu_s(pid) for pid in pids) - before
    finally:
        for p in procs:
            p.stop()
        broker.stop()
    done = records - missing
    return done / elapsed, missing, cpu / max(done, 1) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=6000)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--batch", default="1,10")
    ap.add_argument("--consumers", default="1,2,4")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row: median (min-max)")
    ap.add_argument("--root", type=Path, help="run the registry of another checkout (before)")
    ap.add_argument("--json", type=Path, default=None, help="write every row here too")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    if args.root is not None:
        ROOT_CODE[0] = args.root.resolve()
        print(f"registry code: {ROOT_CODE[0]}")
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpu(s), {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    print(f"{args.records} records from {args.agents} simulated agents per run\n")
    print(
        f"{'backend':<11} {'consumers':>9} {'rec/msg':>7} {'records/s':>10} "
        f"{'(min-max)':>13} {'missing':>8} {'CPU µs/record (consumers)':>26}"
    )
    work = Path(tempfile.mkdtemp(prefix="madoguchi-bench-"))
    pg: Postgres | None = None
    try:
        for backend in args.backends.split(","):
            if backend == "postgresql":
                pg = Postgres()
            for n in (int(x) for x in args.consumers.split(",")):
                for batch in (int(x) for x in args.batch.split(",")):
                    rates, lost, cpus = [], 0, []
                    for k in range(args.repeat):
                        rate, missing, cpu = one_run(
                            work / f"{backend}-{n}-{batch}-{k}",
                            pg,
                            n,
                            args.records,
                            args.agents,
                            batch,
                        )
                        rates.append(rate)
                        cpus.append(cpu)
                        lost += missing
                    rates.sort()
                    cpus.sort()
                    rows.append(
                        {
                            "backend": backend,
                            "consumers": n,
                            "records_per_message": batch,
                            "records": args.records,
                            "records_per_s": {
                                "median": statistics.median(rates),
                                "min": rates[0],
                                "max": rates[-1],
                            },
                            "cpu_us_per_record": statistics.median(cpus),
                            "missing": lost,
                        }
                    )
                    spread = f"({rates[0]:.0f}-{rates[-1]:.0f})"
                    print(
                        f"{backend:<11} {n:>9} {batch:>7} {statistics.median(rates):>10.0f} "
                        f"{spread:>13} {lost:>8} {statistics.median(cpus):>8.0f} "
                        f"({cpus[0]:.0f}-{cpus[-1]:.0f})",
                        flush=True,
                    )
            if pg is not None:
                pg.stop()
                pg = None
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
