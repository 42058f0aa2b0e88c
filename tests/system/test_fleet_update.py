"""Rollouts end to end (docs/fleet.md): a real mosquitto, the registry, the agent as real
processes under the supervisor (the stand-in for systemd), fake releases (the test
shortcut in tests/support/releases.py). A healthy release stays; one that cannot start,
one that cannot reach the broker and one the registry never acks each roll back on their
own within the deadline with the reason reported; every scan reaches the registry once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.central.fleet import Broker as FleetBroker
from agent.central.fleet import offer
from agent.station.releases import Releases
from agent.station.supervisor import Supervisor
from agent.testing import LOOPBACK, Broker, Pty, RegistryProbe, free_port, write_config
from tests.support import releases
from tests.support.central import Contract

pytestmark = [pytest.mark.broker, pytest.mark.slow]
SITE, NAME = "toda-city-hall-1f", "station-03"
ACK = b"\x06"
DEADLINE_S = 6.0
CONTRACT = Contract()


class Fleet:
    def __init__(self, tmp: Path, broker: Broker, pty: Pty) -> None:
        self.tmp = tmp
        self.broker = broker
        self.pty = pty
        self.key, pub = releases.keypair(tmp)
        self.releases = Releases(tmp / "releases")
        releases.tree(self.releases.root / "1.0", releases.healthy("1.0"))
        self.releases.point("1.0")
        self.extra = (
            f'release_public_key = "{pub}"\nreleases_dir = "{self.releases.root}"\n'
            f"release_health_deadline_s = {DEADLINE_S}"
        )
        self.config = self.write(broker.port)
        self.supervisor = Supervisor(
            self.releases, ["run", "--config", str(self.config)], restart_delay_s=0.2
        )

    def write(
        self, port: int, *, mqtt: str = "backoff_max_s = 1", name: str = "agent.toml"
    ) -> Path:
        return write_config(
            self.tmp,
            port,
            scanner=self.pty.link,
            extra_agent=self.extra,
            mqtt=mqtt,
            path=self.tmp / name,
            data_dir=self.tmp / "data",
        )

    async def update(
        self, version: str, body: str, *, staged: bool = False, pad_bytes: int = 0
    ) -> dict[str, Any]:
        """Offer `version`: the bundle over MQTT in chunks, or staged on the station."""
        b = releases.bundle(self.tmp, version, body, pad_bytes)
        manifest = releases.signed(self.key, b, version)
        fb = FleetBroker(LOOPBACK, self.broker.port, "madoguchi/v1")
        on_station = str(b) if staged else None
        results = await offer(fb, SITE, [NAME], manifest, on_station, bundle=b, answer_s=30)
        # both messages as docs/asyncapi.yaml says
        base = f"madoguchi/v1/{SITE}/{NAME}/cmd/update"
        cmd: dict[str, Any] = {"request_id": "r", "manifest": manifest}
        if staged:
            cmd["bundle"] = str(b)
        assert CONTRACT.check(base, cmd) == "updateCommand/update"
        answer = {k: v for k, v in results[NAME].items() if k != "downloaded"}
        assert CONTRACT.check(base + "/result", answer) == "updateResult/result"
        if not staged:
            assert results[NAME].get("downloaded"), results[NAME]
        return results[NAME]


@contextlib.asynccontextmanager
async def supervised(fleet: Fleet) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.supervisor.run(stop), name="test-supervisor")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def telemetry_until(
    port: int,
    pred: Any,
    timeout: float = 30,
    prefix: str = "madoguchi/v1",
) -> dict[str, Any]:
    """The first telemetry message `pred` accepts (event-driven: MQTT, every 1 s)."""
    async with aiomqtt.Client(LOOPBACK, port) as c:
        await c.subscribe(f"{prefix}/{SITE}/{NAME}/telemetry")
        async with asyncio.timeout(timeout):
            async for m in c.messages:
                assert isinstance(m.payload, bytes)
                body: dict[str, Any] = json.loads(m.payload)
                if pred(body):
                    return body
    raise AssertionError("unreachable")


def _scanning(body: dict[str, Any]) -> bool:
    return all(d["state"] == "connected" for d in body["devices"].values())


async def running(
    port: int,
    version: str,
    state: str | None = None,
    timeout: float = 30,
    prefix: str = "madoguchi/v1",
) -> dict[str, Any]:
    """The `release` of the first telemetry from `version` with its scanner connected
    (and the rollout in `state`, if given)."""

    def ok(body: dict[str, Any]) -> bool:
        rel = body.get("release", {})
        return (
            rel.get("version") == version
            and (state is None or rel.get("state") == state)
            and _scanning(body)
        )

    return dict((await telemetry_until(port, ok, timeout, prefix))["release"])


async def scan(pty: Pty, text: str) -> None:
    pty.scan(text)
    assert await pty.aread(1, timeout=20) == ACK


def scans(registry: RegistryProbe) -> list[str]:
    return [r["data"]["text"] for r in registry.new if r["kind"] != "release_switch"]


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker, pty_port: Pty) -> Fleet:
    return Fleet(tmp_path, broker, pty_port)


async def test_a_healthy_release_stays(fleet: Fleet, registry: RegistryProbe) -> None:
    async with supervised(fleet):
        await running(fleet.broker.port, "1.0")
        await scan(fleet.pty, "111122410000012340")
        await registry.wait_for(1)
        t0 = time.monotonic()
        # ~1 MB of random padding: six chunks of the blob size over MQTT
        answer = await fleet.update("1.1", releases.healthy("1.1"), pad_bytes=1_000_000)
        assert answer["ok"] and answer["state"] == "downloading", answer
        rel = await running(fleet.broker.port, "1.1", "healthy")
        took = time.monotonic() - t0
        assert rel["version"] == "1.1" and rel["target"] == "1.1"
        CONTRACT.check(
            f"madoguchi/v1/{SITE}/{NAME}/telemetry",
            await telemetry_until(
                fleet.broker.port, lambda b: b.get("release", {}).get("state") == "healthy"
            ),
        )
        await scan(fleet.pty, "111122410000012341")
        await registry.wait_for(3)  # two scans and the release_switch record
    assert fleet.releases.current() == "1.1"
    state = fleet.releases.switch_state()
    assert state is not None and state.state == "healthy"
    assert sorted(scans(registry)) == ["111122410000012340", "111122410000012341"]
    switch = [r for r in registry.new if r["kind"] == "release_switch"]
    assert [r["data"] for r in switch] == [{"from": "1.0", "to": "1.1"}]
    print(f"\nrollout offer -> healthy: {took:.2f} s")


async def test_a_release_that_cannot_start_rolls_back(
    fleet: Fleet, registry: RegistryProbe
) -> None:
    async with supervised(fleet):
        await running(fleet.broker.port, "1.0")
        await scan(fleet.pty, "111122410000012340")
        await registry.wait_for(1)
        t0 = time.monotonic()
        answer = await fleet.update("1.1", releases.broken("1.1"), staged=True)
        assert answer["state"] == "switched", answer
        rel = await running(fleet.broker.port, "1.0", "rolled_back")
        took = time.monotonic() - t0
        assert rel["version"] == "1.0" and rel["target"] == "1.1"
        assert "exited with code 1" in rel["reason"]
        await scan(fleet.pty, "111122410000012341")
        await registry.wait_for(2)
    state = fleet.releases.switch_state()
    assert state is not None and state.at < state.deadline  # an exit is not waited out
    assert fleet.releases.current() == "1.0"
    assert sorted(scans(registry)) == ["111122410000012340", "111122410000012341"]
    print(f"\nrollback of a release that cannot start: {took:.2f} s")


async def test_a_release_that_cannot_reach_the_broker_rolls_back(
    fleet: Fleet, registry: RegistryProbe
) -> None:
    wrong = fleet.write(free_port(), name="wrong-broker.toml")
    async with supervised(fleet):
        await running(fleet.broker.port, "1.0")
        await scan(fleet.pty, "111122410000012340")
        await registry.wait_for(1)
        t0 = time.monotonic()
        answer = await fleet.update("1.1", releases.with_config("1.1", wrong))
        assert answer["state"] == "downloading", answer
        rel = await running(fleet.broker.port, "1.0", "rolled_back", timeout=DEADLINE_S + 20)
        took = time.monotonic() - t0
        assert rel["version"] == "1.0"
        assert "deadline" in rel["reason"] and "broker connection" in rel["reason"]
        await scan(fleet.pty, "111122410000012341")
        await registry.wait_for(3)  # the release_switch record the bad one took, too
    state = fleet.releases.switch_state()
    assert state is not None and state.deadline <= state.at  # at the deadline, not before
    assert took < DEADLINE_S + 20
    assert fleet.releases.current() == "1.0"
    assert sorted(scans(registry)) == ["111122410000012340", "111122410000012341"]
    print(f"\nrollback of a release off the broker: {took:.2f} s (deadline {DEADLINE_S} s)")


async def test_a_release_never_acked_rolls_back_and_its_scans_arrive_once(
    fleet: Fleet, registry: RegistryProbe
) -> None:
    """Connected to the broker under another topic prefix: the registry never acks, so
    the health check never passes. The scan it took stays in the outbox (untouched) and
    the previous release sends it."""
    wrong = fleet.write(
        fleet.broker.port, mqtt='backoff_max_s = 1\ntopic_prefix = "elsewhere/v1"', name="p.toml"
    )
    async with supervised(fleet):
        await running(fleet.broker.port, "1.0")
        await scan(fleet.pty, "111122410000012340")
        await registry.wait_for(1)
        t0 = time.monotonic()
        answer = await fleet.update("1.1", releases.with_config("1.1", wrong), staged=True)
        assert answer["state"] == "switched", answer
        await running(fleet.broker.port, "1.1", prefix="elsewhere/v1")  # the new one runs
        await scan(fleet.pty, "111122410000012342")  # taken by the release that will fail
        rel = await running(fleet.broker.port, "1.0", "rolled_back", timeout=DEADLINE_S + 20)
        assert "first registry ack" in rel["reason"], rel
        took = time.monotonic() - t0
        await scan(fleet.pty, "111122410000012343")
        await registry.wait_for(4)
    assert fleet.releases.current() == "1.0"
    got = scans(registry)
    assert sorted(got) == ["111122410000012340", "111122410000012342", "111122410000012343"]
    state = fleet.releases.switch_state()
    assert state is not None and state.deadline <= state.at  # at the deadline, not before
    assert took < DEADLINE_S + 20
    print(
        f"\nrollback of a release the registry never acks: {took:.2f} s (deadline {DEADLINE_S} s)"
    )


async def test_a_release_that_loses_a_device_rolls_back(
    fleet: Fleet, registry: RegistryProbe
) -> None:
    """The scanner was connected when the switch was made; the new release does not
    bring it back (here: its config names a port that is not there)."""
    gone = write_config(
        fleet.tmp,
        fleet.broker.port,
        scanner=fleet.tmp / "no-such-tty",
        extra_agent=fleet.extra,
        path=fleet.tmp / "no-scanner.toml",
        data_dir=fleet.tmp / "data",
    )
    async with supervised(fleet):
        await running(fleet.broker.port, "1.0")
        answer = await fleet.update("1.1", releases.with_config("1.1", gone), staged=True)
        assert answer["state"] == "switched", answer
        rel = await running(fleet.broker.port, "1.0", "rolled_back", timeout=DEADLINE_S + 20)
        assert "devices back:" in rel["reason"], rel
        await scan(fleet.pty, "111122410000012344")
        await registry.wait_for(2)  # the scan and the bad release's release_switch record
    state = fleet.releases.switch_state()
    assert state is not None and state.devices == tuple(answer_devices(fleet))
    assert scans(registry) == ["111122410000012344"]


def answer_devices(fleet: Fleet) -> list[str]:
    """The device names of the station's own config (what the switch recorded)."""
    from agent.config import load_config

    return [d.name for d in load_config(fleet.config).devices]
