"""`madoguchi supervise`: start the agent from `releases/current`, restart it when it ends,
and undo an unconfirmed release switch (docs/fleet.md).

The part of a rollback that cannot live in the new release: a release that cannot start
at all cannot roll itself back. The supervisor runs from the base install, not from a
release, starts `{releases_dir}/current/bin/madoguchi ARGS...`, and

- when the child ends while the switch to it is unconfirmed: flips `current` back at once
  (reason: its exit code) and starts the previous release;
- when the deadline of an unconfirmed switch passes with the child still running (it
  cannot reach the broker, the registry never acks): flips back (reason: what the health
  check was waiting on, from `health.json`), stops the child, starts the previous one;
- otherwise restarts the child after `restart_delay_s`, like systemd's Restart=always.

It is what systemd runs (ExecStart, NotifyAccess=all so the child's READY counts) and,
in tests, the stand-in for systemd. It keeps no state of its own: `switch.json` is the
truth, so a supervisor restarted mid-switch decides the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.station.releases import Releases
from agent.station.rollout import HEALTH

log = logging.getLogger(__name__)


@dataclass
class Run:
    version: str | None
    code: int | None = None
    rolled_back: str | None = None  # the reason, when this run ended in a rollback


@dataclass
class Supervisor:
    releases: Releases
    args: list[str]
    env: Mapping[str, str] | None = None
    restart_delay_s: float = 1.0
    stop_timeout_s: float = 20.0
    runs: list[Run] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.releases.rollback_if_overdue()
            await self._once(stop)
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.restart_delay_s)

    def _waiting_on(self) -> str:
        try:
            health = json.loads((self.releases.root / HEALTH).read_bytes())
            return f" (waiting for {str(health['waiting'])[:80]})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    async def _once(self, stop: asyncio.Event) -> None:
        version = self.releases.current()
        run = Run(version)
        self.runs.append(run)
        exe = self.releases.current_link / "bin" / "madoguchi"
        (self.releases.root / HEALTH).unlink(missing_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                str(exe), *self.args, env=None if self.env is None else dict(self.env)
            )
        except OSError as e:
            run.code = 127
            self._exited(run, f"cannot start {exe}: {e.strerror}")
            return
        log.info("supervisor: started release %s (pid %d)", version, proc.pid)
        self.started.set()
        s = self.releases.switch_state()
        left = None
        if s is not None and s.unconfirmed and s.to == version:
            left = s.left(self.releases.clocks)
        exited = asyncio.create_task(proc.wait(), name="supervisor-child")
        stopping = asyncio.create_task(stop.wait(), name="supervisor-stop")
        done, _ = await asyncio.wait(
            {exited, stopping}, timeout=left, return_when="FIRST_COMPLETED"
        )
        stopping.cancel()
        if exited in done:
            run.code = exited.result()
            self._exited(run, f"release {version} exited with code {run.code}")
            return
        if not done:  # the deadline of an unconfirmed switch
            s = self.releases.switch_state()
            if s is not None and s.unconfirmed:
                reason = f"health check did not pass within the deadline{self._waiting_on()}"
                if self.releases.rollback(reason) is not None:
                    run.rolled_back = reason
        run.code = await self._terminate(proc, exited)

    def _exited(self, run: Run, reason: str) -> None:
        s = self.releases.switch_state()
        if s is not None and s.unconfirmed and s.to == run.version:
            full = f"{reason} before its health check passed{self._waiting_on()}"
            if self.releases.rollback(full) is not None:
                run.rolled_back = full
        else:
            log.warning("supervisor: %s; restarting", reason)

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> int:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(exited), self.stop_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await exited


async def supervise(releases_dir: str, args: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sup = Supervisor(Releases(Path(releases_dir)), args, env=os.environ)
    await sup.run(stop)
    return 0
