"""Accepting pauses near the descriptor limit (agent/station/kiosk/bounded.py).

A server process under `RLIMIT_NOFILE=256` with 150 descriptors held elsewhere (pipes
opened after start, as a busy agent would hold): the cap, fitted at start, no longer
fits with an accept burst on top. 250 idle client sockets must not make accept() fail
(EMFILE), and a real request still gets its answer.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx

from agent.testing import LOOPBACK

SERVER = r"""
import asyncio, json, os, resource, socket, sys, logging
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from agent._aio import asgi_server
from agent.config import ApiSection
from agent.station.kiosk.bounded import ACCEPT_BACKLOG, LISTEN_QUEUE, BoundedHttp

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

async def main():
    bounds = BoundedHttp(ApiSection(header_timeout_s=60, max_connections=512))
    bounds.fit_descriptors()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(bounds.exception_handler(None))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    async with asgi_server(app, [sock], http=bounds.protocol_class(), backlog=ACCEPT_BACKLOG,
                           limit_concurrency=bounds.max_connections + 16):
        sock.listen(LISTEN_QUEUE)
        bounds.watch_listeners(loop, [sock])
        hog = [os.pipe() for _ in range(75)]  # 150 descriptors taken elsewhere
        print(sock.getsockname()[1], bounds.max_connections, flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        print(json.dumps(bounds.describe()), flush=True)
        del hog

asyncio.run(main())
"""


def test_descriptors_held_elsewhere_pause_accepting_instead_of_emfile() -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sockets: list[socket.socket] = []
    try:
        assert server.stdout is not None and server.stdin is not None
        port_s, cap_s = server.stdout.readline().split()
        port, cap = int(port_s), int(cap_s)
        assert cap == 64  # 256 - 64 reserved - two 64-connection bursts
        t0 = time.monotonic()
        for _ in range(250):
            s = socket.create_connection((LOOPBACK, port), timeout=10)
            sockets.append(s)
        opened = time.monotonic() - t0
        t0 = time.monotonic()
        r = httpx.get(f"http://{LOOPBACK}:{port}/", timeout=10)
        took = time.monotonic() - t0
        assert r.status_code == 200 and r.text == "ok"
        server.stdin.write("done\n")
        server.stdin.flush()
        state = json.loads(server.stdout.readline())
    finally:
        for s in sockets:
            s.close()
        server.kill()
        _, err = server.communicate(timeout=10)
    print(
        f"250 sockets opened in {opened:.2f} s, request answered in {took * 1000:.0f} ms: {state}"
    )
    assert state["resource_errors"] == 0, (state, err)
    assert state["accept_pauses"] >= 1, state
    assert "Too many open files" not in err and "cannot accept" not in err, err
    assert "accepting paused" in err, err
    assert took < 2.0
