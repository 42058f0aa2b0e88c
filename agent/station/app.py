"""The station's composition root: the loop, its storage and its adapters in one TaskGroup.

    devices -> Station (agent/station/station.py) -> Outbox -> Uplink -> broker
                  |  events                            ^ blobs (BlobStore / BlobSender)
                  v                                    |
              kiosk API (LocalApi)      remote commands (capture_photo: photos.py)

The station loop knows none of its adapters; this module is the one place
that wires them: `Station.on_stored` wakes the uplink, station events feed
the kiosk's event hub, the uplink's connection changes become station
events, and `cmd/capture_photo` reaches photos.py. `StationApp` is what the
CLI, the demo, the tests and the benches run; it keeps the public surface
the old supervisor had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any

from agent.config import Config, DeviceConfig
from agent.contract.datasets import subscription
from agent.contract.records import Read
from agent.contract.topics import Topics
from agent.drivers import Driver, create_driver
from agent.drivers.capabilities import PhotoCamera
from agent.errors import ConfigError
from agent.station.blobs import BlobStore
from agent.station.datasets import DatasetReceiver, DatasetStore
from agent.station.diagnostics import CertWatch, agent_version
from agent.station.enroll import client_identity
from agent.station.lock import DataDirLock, make_private
from agent.station.logring import LogRing
from agent.station.outbox import Outbox
from agent.station.photos import find_camera, take_photo
from agent.station.remote_config import RemoteConfig, load_or_roll_back
from agent.station.renewal import CertRenewer
from agent.station.rollout import RELEASE_SWITCH, Rollout
from agent.station.sealing import Sealer
from agent.station.station import DeviceState, Listener, Station
from agent.station.systemd import Notifier
from agent.station.uplink import Uplink

if TYPE_CHECKING:
    from agent.drivers.card import CardInfo
    from agent.station.feedback import Outcome
    from agent.station.kiosk.api import LocalApi

log = logging.getLogger(__name__)
VERSION = agent_version()


class StationApp:
    """Runs the station loop, the outbox, the uplink and the kiosk API until `stop` is set."""

    status_interval_s = 5.0  # STATUS= to systemd this often

    def __init__(
        self,
        config: Config,
        *,
        driver_factory: Callable[[DeviceConfig], Driver] = create_driver,
        today: Callable[[], date] = date.today,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.station = Station(config, driver_factory=driver_factory, today=today)
        self.notifier = notifier if notifier is not None else Notifier()
        self.ready = asyncio.Event()
        self.outbox: Outbox | None = None
        self.uplink: Uplink | None = None
        self.blobs: BlobStore | None = None
        self.api: LocalApi | None = None  # once the API task has started
        self.logs = LogRing()  # the last log lines for cmd/logs (installed while running)
        self.rollout: Rollout | None = None  # cmd/update and the release health check
        # notAfter, lifetime used, alerts: of the pair the uplink presents
        cert, _ = client_identity(config.mqtt.tls_cert, config.mqtt.tls_key, config.agent.data_dir)
        self.cert = CertWatch(cert)
        self.remote_config = RemoteConfig(config)  # cmd/config and its rollback
        self.renewer = CertRenewer(config, self.cert)  # a new certificate from 80 %
        self.restart_reason: str | None = None  # why `run` ended without `stop`
        self._loop_stop: asyncio.Event | None = None
        self._service_stop = asyncio.Event()  # `run`'s stop (SIGTERM), once running

    # -- the station's surface, for the uplink, the kiosk API, the CLI and tests ----------

    @property
    def devices(self) -> dict[str, DeviceState]:
        return self.station.devices

    @property
    def operator(self) -> str | None:
        return self.station.operator

    def describe(self) -> dict[str, Any]:
        # the version and the certificate's age for the dashboard's columns (issue #22)
        release = {} if self.rollout is None else self.rollout.describe()
        return {
            **self.station.describe(),
            "madoguchi": VERSION,
            **self.cert.describe(),
            **release,
            **self.remote_config.describe(),
            **self.renewer.describe(),
        }

    def request_restart(self, reason: str) -> None:
        """End `run` as `stop` would, and say why: `run_station` starts it again with the
        file as it now is (a remote configuration applied or rolled back)."""
        log.warning("restarting the station loop: %s", reason)
        self.restart_reason = reason
        if self._loop_stop is not None:
            self._loop_stop.set()

    def take_alerts(self) -> list[dict[str, Any]]:
        return self.station.take_alerts() + self.cert.take_alerts()

    def subscribe(self, listener: Listener) -> None:
        self.station.subscribe(listener)

    def emit(self, kind: str, body: dict[str, Any]) -> None:
        self.station.emit(kind, body)

    def running_drivers(self) -> dict[str, Driver]:
        return self.station.running_drivers()

    async def accept(self, read: Read) -> Outcome:
        return await self.station.accept(read)

    async def read_card_info(self, device: str, pin: str) -> CardInfo:
        return await self.station.read_card_info(device, pin)

    # -- ID photos (agent/station/photos.py) ---------------------------------------------

    def photo_camera(self, device: str | None) -> PhotoCamera:
        return find_camera(self.station.running_drivers(), device)

    async def capture_photo(self, device: str | None = None) -> dict[str, Any]:
        """Take an ID photo: sealed blob, then a `photo` record (for the kiosk and MQTT)."""
        return await take_photo(self, device)

    async def _cmd_capture_photo(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self.config.agent.remote_photo:  # a remote camera trigger is opt-in
            return {
                "ok": False,
                "error": "remote photo is off on this station ([agent] remote_photo)",
            }
        device = body.get("device")
        if device is not None and not isinstance(device, str):
            raise ValueError("device must be a string")
        return await self.capture_photo(device)

    # -- running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        # one agent per data_dir, held until the process ends (agent/station/lock.py)
        loop_stop = self._loop_stop = asyncio.Event()  # `stop`, or a restart
        self._service_stop = stop
        relay = asyncio.create_task(_relay(stop, loop_stop), name="stop-relay")
        try:
            with DataDirLock(cfg.agent.data_dir):
                self.logs.install()
                try:
                    await self._run_locked(loop_stop)
                finally:
                    self.logs.uninstall()
        finally:
            relay.cancel()

    async def _run_locked(self, stop: asyncio.Event) -> None:
        cfg = self.config
        station = self.station
        rollout = self.rollout = Rollout(cfg, stop)
        if rollout.rolled_back_at_start():
            log.error(
                "release %s: switch overdue; rolled back, exiting to start the previous",
                rollout.version,
            )
            return
        sealer = Sealer.from_file(cfg.outbox.key_file) if cfg.outbox.key_file else None
        key = cfg.outbox.registry_public_key
        to_registry = None
        if key is not None:  # cryptography only on a station that stores personal data
            from agent.personal_seal import PersonalSealer

            to_registry = PersonalSealer.from_file(key)
        async with Outbox(
            cfg.outbox_path,
            max_bytes=cfg.outbox.max_bytes,
            sealer=sealer,
            integrity_check_interval_s=cfg.outbox.integrity_check_interval_s or None,
            personal_sealer=to_registry,
        ) as outbox:
            # whatever umask made them: outbox, WAL, SHM, side files, token, keys, blobs
            if n := make_private(cfg.agent.data_dir):
                log.info("made %d file(s) in %s private (0600/0700)", n, cfg.agent.data_dir)
            self.outbox = station.outbox = outbox
            self.blobs = BlobStore(cfg.agent.data_dir / "blobs", sealer)
            uplink = Uplink(cfg, outbox, self, blobs=self.blobs)
            uplink.add_command("capture_photo", self._cmd_capture_photo)
            uplink.add_command("logs", self.logs.command)
            uplink.add_command("update", rollout.cmd_update)
            uplink.add_subscription(rollout.subscription, rollout.handle)
            station.subscribe(rollout.device_state)
            rollout.publish = uplink.publish
            uplink.add_command("config", self.remote_config.command)
            self.remote_config.restart = self.request_restart
            self.remote_config.after_result = uplink.after_result
            if self.remote_config.on_trial:  # the registry's status confirms the revision
                uplink.add_subscription(
                    Topics(cfg.mqtt.topic_prefix).all_registry_status,
                    self.remote_config.registry_status,
                )
            if self.renewer.enabled:
                uplink.add_subscription(self.renewer.topics.csr_signed, self.renewer.handle)
            self.uplink = uplink
            uplink.on_connection = lambda up: station.emit(
                "uplink", {"connected": up, "error": uplink.last_error}
            )
            station.on_stored = uplink.wake
            datasets = self._datasets(uplink)
            async with asyncio.TaskGroup() as tg:
                device_tasks = [
                    tg.create_task(station.device_loop(dev, stop), name=f"device:{dev.name}")
                    for dev in cfg.devices
                ]
                uplink_task = tg.create_task(uplink.run(stop), name="uplink")
                tg.create_task(self._housekeeping(stop), name="housekeeping")
                watchdog = tg.create_task(self.notifier.watchdog_loop(), name="watchdog")

                async def mark(data: dict[str, Any]) -> None:
                    await outbox.append(
                        Read(device="agent", kind=RELEASE_SWITCH, data=data, source="agent")
                    )
                    uplink.wake()

                health = tg.create_task(
                    rollout.health_check(self.ready, uplink.up, uplink.acked, mark),
                    name="release-health",
                )
                downloads = tg.create_task(rollout.run(), name="release-download")
                tg.create_task(self._status_loop(stop), name="sd-status")
                trial = tg.create_task(self.remote_config.guard(uplink), name="config-trial")
                renewal = tg.create_task(self.renewer.run(uplink), name="cert-renewal")
                if cfg.api is not None and cfg.api.enabled:
                    tg.create_task(self._api(stop), name="api")
                self.ready.set()
                # systemd: outbox open, devices started (plugged in or not).
                self.notifier.ready(await self._status_line())
                log.info(
                    "station %s/%s running with %d device(s)",
                    cfg.agent.site,
                    cfg.agent.name,
                    len(cfg.devices),
                )
                await stop.wait()
                log.info("stopping: devices first, then the uplink says offline")
                if self.restart_reason is not None and not self._service_stop.is_set():
                    self.notifier.reloading(self.restart_reason)
                else:
                    self.notifier.stopping()
                for t in device_tasks:
                    t.cancel()
                await asyncio.gather(*device_tasks, return_exceptions=True)
                await uplink_task
                watchdog.cancel()
                health.cancel()
                downloads.cancel()
                trial.cancel()
                renewal.cancel()
            if datasets is not None:
                datasets.store.close()
        self.outbox = station.outbox = None
        self.notifier.close()

    def _datasets(self, uplink: Uplink) -> DatasetReceiver | None:
        """Reference datasets (agent/station/datasets.py): what is stored serves at once,
        offline included; new versions come in through the uplink."""
        cfg = self.config.datasets
        if cfg is None:
            return None
        store = DatasetStore(self.config.datasets_path)
        store.open()
        receiver = DatasetReceiver(
            store,
            bytes.fromhex(cfg.public_key),
            self.config.mqtt.topic_prefix,
            max_age_s=cfg.max_age_s,
            site=self.config.agent.site,
            agent=self.config.agent.name,
        )
        receiver.load()
        self.station.datasets = receiver
        prefix = self.config.mqtt.topic_prefix
        uplink.add_subscription(subscription(prefix), receiver.handle)
        site, name = self.config.agent.site, self.config.agent.name
        uplink.add_subscription(subscription(prefix, "site", site), receiver.handle)
        uplink.add_subscription(subscription(prefix, "station", site, name), receiver.handle)
        return receiver

    async def _status_line(self) -> str:
        """One line for `systemctl status`: outbox depth, uplink, devices."""
        assert self.outbox is not None
        st = await self.outbox.stats()
        devices = self.station.devices
        connected = sum(1 for d in devices.values() if d.state == "connected")
        oldest = st.oldest_unconfirmed_age_s
        age = f", oldest {oldest:.0f}s" if oldest is not None else ""
        link = "connected" if self.uplink is not None and self.uplink.connected else "offline"
        disk = "DISK FULL, scans refused; " if st.disk_full else ""
        lost = f"; {st.lost_seqs} seq(s) lost" if st.lost_seqs else ""
        degraded = None if self.uplink is None else self.uplink.degraded
        return (
            f"{disk}outbox {st.unconfirmed} unconfirmed ({st.pending} unsent){age}; "
            f"uplink {link}; devices {connected}/{len(devices)} connected{lost}"
            + (f"; degraded: {degraded}" if degraded else "")
        )

    async def _status_loop(self, stop: asyncio.Event) -> None:
        """STATUS= every few seconds while systemd listens."""
        if not self.notifier.enabled:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.status_interval_s)
            if not stop.is_set():
                self.notifier.status(await self._status_line())

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Purge confirmed records past retention: at start, then hourly."""
        assert self.outbox is not None
        while not stop.is_set():
            n = await self.outbox.purge(self.config.outbox.retention_days)
            if n:
                log.info("purged %d confirmed record(s) past retention", n)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=3600)

    async def _api(self, stop: asyncio.Event) -> None:
        """The kiosk's local API; its failures are logged, never stop the devices.

        Imported here, not at the top: starlette and uvicorn are the optional
        `kiosk` extra, and a station without them still stores every scan.
        """
        try:
            from agent.station.kiosk.api import LocalApi
        except ImportError as e:
            log.error("api: %s (install madoguchi[kiosk])", e)
            return
        self.api = LocalApi(self)
        await self.api.run(stop)


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def run_station(config: Config, stop: asyncio.Event) -> None:
    """`madoguchi run`: the station until `stop`; after a remote configuration is applied
    or rolled back, again with the file as it is then (same process: no supervisor)."""
    while True:
        app = StationApp(config)
        await app.run(stop)
        if stop.is_set() or app.restart_reason is None or config.source is None:
            return
        loaded, problems = await asyncio.to_thread(load_or_roll_back, config.source)
        if loaded is None:
            raise ConfigError(problems)
        config = loaded
