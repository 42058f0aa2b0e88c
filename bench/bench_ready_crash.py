"""Start -> READY=1 after kill -9 with a large backlog queued (issue #18, point 4).

    .venv/bin/python bench/bench_ready_crash.py [--records 1000000] [--rounds 3]
        [--root DIR]     # the agent code to run (another checkout: the "before" figure)
        [--seed FILE]    # a pre-filled outbox to reuse (kept); else one is filled and removed

Each round: the agent starts on the backlog (a broker, no registry: nothing is
confirmed), is killed with SIGKILL once READY, and is started again; that second
start, with no clean-close mark and the WAL left by the crash, is timed from
process start (interpreter and imports included) to READY=1 on a NOTIFY_SOCKET we
own. Also timed: READY to the log line of the start-up `quick_check`, which since
issue #18 runs after READY, in the background, before the first send.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import core_bench as core  # noqa: E402
from run import fill, serial_device  # noqa: E402

from agent.testing import AgentProcess, Broker, NotifySocket, Pty, write_config  # noqa: E402


async def one_round(
    broker: Broker, workdir: Path, seed: Path, root: Path, i: int
) -> dict[str, float]:
    name = f"crash{i}"
    pty = Pty(workdir / f"tty-{name}")
    cfg = write_config(
        workdir,
        broker.port,
        devices=serial_device(pty.link),
        site="bench-site",
        name=name,
        data_dir=workdir / name,
        extra_agent='log_level = "INFO"',
        telemetry_interval_s=None,
        mqtt="backoff_max_s = 2",
        outbox="resend_after_s = 600",
    )
    (workdir / name).mkdir()
    os.link(seed, workdir / name / "outbox.db")
    notify = NotifySocket()
    log = workdir / f"{name}.log"
    try:

        def start() -> tuple[AgentProcess, float]:
            t0 = time.perf_counter()
            agent = AgentProcess(cfg, log, env=notify.env(), cwd=root)
            agent.start()
            assert agent.proc is not None
            if not notify.wait_ready(agent.proc, 120):
                agent.close()
                raise SystemExit(f"no READY=1 within 120 s: see {log}")
            return agent, time.perf_counter() - t0

        first, _ = await asyncio.to_thread(start)
        first.kill9()
        agent, ready_s = await asyncio.to_thread(start)
        t_ready = time.perf_counter()
        check_s = float("nan")
        try:
            await asyncio.to_thread(agent.wait_log, "quick_check ok", 120, this_run=True)
            check_s = time.perf_counter() - t_ready
        except Exception:  # the code before issue #18 logs it before READY
            if "quick_check ok" not in agent.text():
                raise
        agent.check_running()
        agent.stop()  # SIGTERM: the shared seed file is left whole for the next round
    finally:
        notify.close()
        pty.close()
        for f in (workdir / name).glob("outbox.db*"):
            if f.name != "outbox.db":
                f.unlink()
        (workdir / name / "outbox.db").unlink()
    return {"ready_s": ready_s, "check_after_ready_s": check_s}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--seed", type=Path)
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {platform.python_version()}"
    )
    print(f"agent code: {args.root}")
    core.compile_code(args.root)
    with tempfile.TemporaryDirectory(prefix="bench-ready-", dir=os.environ.get("BENCH_DIR")) as d:
        workdir = Path(d)
        seed = args.seed
        if seed is None or not seed.exists():
            seed = seed or workdir / "seed.db"
            t = time.perf_counter()
            await fill(seed, args.records)
            print(f"filled {args.records} records in {time.perf_counter() - t:.0f} s")
        (workdir / "broker").mkdir()
        broker = Broker(workdir / "broker")
        broker.start()
        try:
            res = []
            for i in range(args.rounds):
                res.append(await one_round(broker, workdir, seed, args.root, i))
                print(f"round {i}: {res[-1]}", flush=True)
        finally:
            broker.stop()
    for key in ("ready_s", "check_after_ready_s"):
        vals = [r[key] for r in res]
        print(
            f"{key}: median {statistics.median(vals):.2f} s"
            f" (min {min(vals):.2f}, max {max(vals):.2f}, {len(vals)} rounds)"
        )


if __name__ == "__main__":
    asyncio.run(main())
