"""The receiving end of sd_notify, as systemd's manager holds it, for tests."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from pathlib import Path


class Manager:
    """The receiving end: a bound SOCK_DGRAM socket, like systemd's /run/systemd/notify."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"madoguchi-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env_name = "@" + name
        else:
            # tmp_path can exceed the 108-byte sun_path limit; a short dir cannot.
            self._dir = tempfile.mkdtemp(prefix="sdn-")
            path = os.path.join(self._dir, "notify")
            self.sock.bind(path)
            self.env_name = path
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        """Every datagram queued right now, without waiting (and without the event loop)."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    async def recv(self, timeout: float = 10.0) -> str:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        return data.decode()

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            for f in Path(self._dir).iterdir():
                f.unlink()
            os.rmdir(self._dir)

    async def until(self, prefix: str, timeout: float = 15.0) -> list[str]:
        """Every datagram up to and including the first that starts with prefix."""
        got: list[str] = []
        while not got or not got[-1].startswith(prefix):
            got.append(await self.recv(timeout))
        return got
