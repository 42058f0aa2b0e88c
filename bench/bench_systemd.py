"""What the systemd integration costs per record and per ping.

    PYTHONPATH=. python bench/bench_systemd.py

clock_synced() runs once per record (a read-only adjtimex through ctypes);
the watchdog ping is one datagram every WatchdogSec/2. Compared with the
subprocess a `timedatectl show` check would cost.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time

from agent.station.clock import clock_synced
from agent.station.systemd import Notifier


def per_call(fn: object, n: int) -> float:
    assert callable(fn)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    py = platform.python_version()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {py}")
    print(f"clock_synced() = {clock_synced()}")
    t = per_call(clock_synced, 100_000)
    print(f"clock_synced (adjtimex via ctypes): {t * 1e6:.2f} us/call")

    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        path = os.path.join(d, "notify")
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(path)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        n = Notifier({"NOTIFY_SOCKET": path})
        count = 2_000
        start = time.perf_counter()
        for _ in range(count):
            n.ping()
            rx.recv(64)
        t = (time.perf_counter() - start) / count
        print(f"sd_notify WATCHDOG=1 datagram (send + receive): {t * 1e6:.2f} us")
        n.close()
        rx.close()

    tool = shutil.which("timedatectl")
    if tool:
        start = time.perf_counter()
        cmd = [tool, "show", "-p", "NTPSynchronized"]
        r = subprocess.run(cmd, capture_output=True, check=False)
        t = time.perf_counter() - start
        print(f"for comparison, one `timedatectl show`: {t * 1e3:.1f} ms (rc {r.returncode})")


if __name__ == "__main__":
    main()
