"""The running agent's half of a rollout (docs/fleet.md): `cmd/update` and the health check.

`cmd/update` verifies the signed manifest against `[agent] release_public_key`, fetches
the bundle over MQTT (or takes a staged one), checks it against the manifest, installs
it beside the running release, switches `current` and ends this process so that
systemd (or the supervisor) starts the new one. The new one, finding an unconfirmed
switch to its own version, runs the health check: READY, the devices connected at the
switch connected again, broker connected, first registry ack (of the `release_switch`
record it appends, or of any record). It confirms the switch when every step passed;
past the deadline it is rolled back by the supervisor, or by its own start-up. Each
step it waits on is written to `health.json`, so the rollback can say why. States go
out in telemetry (`release`) and on the dashboard.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.contract.blobs import missing_request
from agent.contract.releases import ReleaseManifest, missing_topic, refusal
from agent.contract.topics import Topics
from agent.errors import ReleaseRefused
from agent.station.releases import Download, Releases, _write_atomic, running_version, verify

log = logging.getLogger(__name__)

HEALTH = "health.json"
#: the record kind a switched-to release appends (docs/CONTRACT.md)
RELEASE_SWITCH = "release_switch"
#: after the result of cmd/update is out, the agent stops so the new release starts
RESTART_DELAY_S = 0.5


Publish = Callable[[str, bytes], Awaitable[bool]]


class Rollout:
    #: seconds between `missing` requests while chunks do not come
    ask_again_s = 5.0
    #: a download with no new chunk for this long is given up (an offer again resumes it)
    stall_s = 300.0

    def __init__(self, config: Config, stop: asyncio.Event) -> None:
        self.config = config
        self.releases = Releases(config.agent.releases_dir)
        self.stop = stop
        self.version = running_version()
        self.state: dict[str, Any] = {}
        self.base = (
            Topics(config.mqtt.topic_prefix).station(config.agent.site, config.agent.name).base
        )
        self.publish: Publish | None = None  # the uplink's, once it exists
        self._download: Download | None = None
        self._offers: asyncio.Queue[tuple[Download, float]] = asyncio.Queue()
        # device name -> state, kept by `device_state` (the app subscribes it to the station)
        self.devices: dict[str, str] = {}
        self._devices_changed = asyncio.Event()
        s = self.releases.switch_state()
        if s is not None:
            self.state = {"target": s.to, "state": s.state, "reason": s.reason}

    def device_state(self, kind: str, body: dict[str, Any]) -> None:
        """A station event listener: device states for the switch and the health check."""
        if kind == "device_state":
            self.devices[str(body.get("device"))] = str(body.get("state"))
            self._devices_changed.set()

    def _connected(self) -> list[str]:
        return sorted(n for n, st in self.devices.items() if st == "connected")

    async def _devices_back(self, names: tuple[str, ...]) -> None:
        while True:
            self._devices_changed.clear()
            if all(self.devices.get(n) == "connected" for n in names):
                return
            await self._devices_changed.wait()

    def describe(self) -> dict[str, Any]:
        return {"release": {"version": self.version, **self.state}}

    def _set(self, target: str, state: str, reason: str | None = None) -> None:
        self.state = {"target": target, "state": state, "reason": reason}
        log.info("release %s: %s%s", target, state, f" ({reason})" if reason else "")

    def _note(self, step: str) -> None:
        """What the health check is waiting on now (the rollback reason if it never passes)."""
        root = self.releases.root
        _write_atomic(
            root / HEALTH, json.dumps({"version": self.version, "waiting": step}).encode()
        )

    # -- start-up ----------------------------------------------------------------------

    def rolled_back_at_start(self) -> bool:
        """An unconfirmed switch past its deadline: flip back now and say so (the caller
        exits so the previous release starts)."""
        if not self.releases.root.exists():
            return False
        s = self.releases.rollback_if_overdue()
        if s is None:
            return False
        self._set(s.to, "rolled_back", s.reason)
        return True

    async def health_check(
        self,
        ready: asyncio.Event,
        connected: asyncio.Event,
        acked: asyncio.Event,
        mark: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Confirm the switch once READY, connected and acked by the registry. `mark`
        appends a `release_switch` record (from, to) to the outbox: the registry keeps
        the switch on file, and an idle station has something for it to ack."""
        s = self.releases.switch_state()
        if s is None or not s.unconfirmed or s.to != self.version:
            return
        self._set(self.version, "switched")
        self._note("READY")
        await ready.wait()
        await mark({"from": s.previous, "to": s.to})
        if s.devices:
            self._note(f"devices back: {', '.join(s.devices)}"[:200])
            await self._devices_back(s.devices)
        self._note("broker connection")
        await connected.wait()
        self._note("first registry ack")
        await acked.wait()
        if self.releases.confirm(self.version):
            self._set(self.version, "healthy")
            (self.releases.root / HEALTH).unlink(missing_ok=True)

    # -- cmd/update --------------------------------------------------------------------

    async def cmd_update(self, body: dict[str, Any]) -> dict[str, Any]:
        key = self.config.agent.release_public_key
        manifest = body.get("manifest")
        target = str(manifest.get("version", "?"))[:64] if isinstance(manifest, dict) else "?"
        self._set(target, "offered")
        if key is None:
            return self._refused(target, "agent.release_public_key is not set on this station")
        bundle = body.get("bundle")
        over_mqtt = bundle is None
        if not over_mqtt and (not isinstance(bundle, str) or not bundle.startswith("/")):
            return self._refused(target, "bundle: not an absolute path on the station")
        try:
            m = verify(manifest, key)
            pending = self.releases.switch_state()
            if pending is not None and pending.unconfirmed:
                raise ReleaseRefused(m.version, f"the switch to {pending.to} is not confirmed yet")
            if over_mqtt:
                if (why := refusal(m)) is not None:
                    raise ReleaseRefused(m.version, why)
                if self.releases.current() == m.version:
                    raise ReleaseRefused(m.version, "already the current release")
                if self._download is not None:
                    raise ReleaseRefused(m.version, "another release is downloading")
                deadline = float(
                    body.get("deadline_s") or self.config.agent.release_health_deadline_s
                )
                self._set(m.version, "downloading")
                return self._offer_download(m, deadline)
            self._set(m.version, "downloading")
            await asyncio.to_thread(self.releases.install, m, Path(str(bundle)))
            self._set(m.version, "installed")
            if body.get("switch", True) is False:
                return {"state": "installed", "version": m.version}
            deadline = float(body.get("deadline_s") or self.config.agent.release_health_deadline_s)
            self.releases.switch(m.version, deadline, self._connected())
        except ReleaseRefused as e:
            return self._refused(target, e.reason)
        self._set(m.version, "switched")
        # the result is published when this returns; then this process ends and the
        # service manager starts `current`, the new release
        asyncio.get_running_loop().call_later(RESTART_DELAY_S, self.stop.set)
        return {"state": "switched", "version": m.version, "deadline_s": deadline}

    # -- the bundle over MQTT (agent/contract/releases.py) -----------------------------

    @property
    def subscription(self) -> str:
        return f"{self.base}/release/+/+"

    async def handle(self, topic: str, payload: Any) -> bool:
        """An inbound `release/{version}/{index}` chunk; True when the topic was one."""
        prefix = f"{self.base}/release/"
        if not topic.startswith(prefix):
            return False
        version, _, index = topic[len(prefix) :].partition("/")
        d = self._download
        if d is None or version != d.manifest.version or not index.isdigit():
            return True  # not asked for (or our own `missing`): dropped
        data = bytes(payload) if isinstance(payload, (bytes, bytearray)) else b""
        await asyncio.to_thread(d.put, int(index), data)
        return True

    def _offer_download(self, m: ReleaseManifest, deadline: float) -> dict[str, Any]:
        d = Download(self.releases.root, m)
        self._download = d
        self._offers.put_nowait((d, deadline))
        return {"state": "downloading", "version": m.version, "missing": len(d.missing())}

    async def run(self) -> None:
        """Downloads offered by cmd/update, one at a time: fetch, verify, install, switch."""
        while True:
            d, deadline = await self._offers.get()
            m = d.manifest
            try:
                await self._fetch(d)
                await asyncio.to_thread(self.releases.install, m, d.path)
                self._set(m.version, "installed")
                self.releases.switch(m.version, deadline, self._connected())
            except ReleaseRefused as e:
                d.discard()  # a bundle that does not match is not resumed
                self._set(m.version, "refused", e.reason)
                continue
            except TimeoutError:
                self._set(m.version, "refused", "download stalled; offer it again to resume")
                continue
            finally:
                self._download = None
            d.discard()
            self._set(m.version, "switched")
            self.stop.set()  # the service manager starts `current`, the new release
            return

    async def _fetch(self, d: Download) -> None:
        """Ask for the missing chunks; ask again whenever they pause for `ask_again_s`;
        TimeoutError after `stall_s` without a new chunk."""
        topic = missing_topic(self.base, d.manifest.version)
        loop = asyncio.get_running_loop()
        last_chunk = loop.time()
        while not d.complete.is_set():
            if self.publish is not None:
                await self.publish(topic, missing_request(d.manifest.bundle_sha256, d.missing()))
            while not d.complete.is_set():  # while chunks keep coming
                d.progress.clear()
                try:
                    await asyncio.wait_for(d.progress.wait(), self.ask_again_s)
                except TimeoutError:
                    break  # a pause: ask again
                last_chunk = loop.time()
            if not d.complete.is_set() and loop.time() - last_chunk > self.stall_s:
                raise TimeoutError
        if self.publish is not None:  # `missing: []`: every chunk is here
            await self.publish(topic, missing_request(d.manifest.bundle_sha256, []))

    def _refused(self, target: str, reason: str) -> dict[str, Any]:
        self._set(target, "refused", reason)
        return {"ok": False, "state": "refused", "error": reason}
