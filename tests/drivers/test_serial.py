"""The serial scanner driver on a real pty: framing, resync, exclusivity, unplug/replug."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import SerialDevice
from agent.contract.records import Read, ReadFault
from agent.drivers.serial import SerialDriver
from agent.errors import DeviceUnavailable
from agent.testing import Broker, Pty, RegistryProbe, running_station, write_config


def device(port: Path, **kw: object) -> SerialDevice:
    return SerialDevice(
        name="scanner", profile="generic-serial-scanner", driver="serial", port=str(port), **kw
    )  # type: ignore[arg-type]


async def take(driver: SerialDriver, n: int) -> list[Read | ReadFault]:
    out: list[Read | ReadFault] = []
    it = driver.reads()
    while len(out) < n:
        out.append(await asyncio.wait_for(anext(it), 5))
    return out


async def test_framing_split_and_joined_chunks(pty_port: Pty) -> None:
    async with SerialDriver(device(pty_port.link)) as drv:
        pty_port.write(b"1111224100")
        await asyncio.sleep(0.05)
        pty_port.write(b"00012345\r4901234567894\r\r\n")
        pty_port.write(b"01049123451234591725123110AB\x1d21X\r")
        got = await take(drv, 3)
    assert [e.data["text"] for e in got if isinstance(e, Read)] == [
        "111122410000012345",
        "4901234567894",
        "01049123451234591725123110AB\x1d21X",
    ]


async def test_overlong_and_garbage_are_faults_then_resync(pty_port: Pty) -> None:
    async with SerialDriver(device(pty_port.link, max_line_bytes=32)) as drv:
        pty_port.write(b"X" * 100 + b"\r")
        pty_port.write(b"\xff\xfe\x00binary\r")
        pty_port.write(b"ok-after\r")
        got = await take(drv, 3)
    assert isinstance(got[0], ReadFault) and "max_line_bytes=32" in got[0].reason
    assert isinstance(got[1], ReadFault) and "not utf-8" in got[1].reason
    assert isinstance(got[2], Read) and got[2].data["text"] == "ok-after"


async def test_overlong_without_terminator_for_a_while(pty_port: Pty) -> None:
    async with SerialDriver(device(pty_port.link, max_line_bytes=64)) as drv:
        for _ in range(20):
            pty_port.write(b"Y" * 50)
        pty_port.write(b"\rgood\r")
        got = await take(drv, 2)
    assert isinstance(got[0], ReadFault)
    assert isinstance(got[1], Read) and got[1].data["text"] == "good"


async def test_exclusive_open_and_missing_port(pty_port: Pty, tmp_path: Path) -> None:
    async with SerialDriver(device(pty_port.link)):
        other = SerialDriver(device(pty_port.link))
        with pytest.raises(DeviceUnavailable, match="scanner: cannot open"):
            await other.open()
    with pytest.raises(DeviceUnavailable, match=r"scanner: cannot open .*nope"):
        await SerialDriver(device(tmp_path / "nope")).open()


async def test_ack_and_nak_bytes(pty_port: Pty) -> None:
    async with SerialDriver(device(pty_port.link, host_ack="\x06", host_nak="\x15")) as drv:
        r = Read(device="scanner", kind="barcode", data={"text": "x"})
        await drv.feedback(r, accepted=True)
        await drv.feedback(r, accepted=False)
        assert await pty_port.aread(2) == b"\x06\x15"


@pytest.mark.broker
async def test_unplug_and_replug_recover_without_restart(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    async with running_station(cfg) as run:
        pty_port.scan("before-unplug")
        assert await pty_port.aread(1) == b"\x06"
        pty_port.close()  # the USB cable is pulled: the tty goes away
        for _ in range(100):
            if run.station.devices["ticket-scanner"].state == "disconnected":
                break
            await asyncio.sleep(0.05)
        assert run.station.devices["ticket-scanner"].state == "disconnected"
        replug = Pty(pty_port.link)  # plugged in again: a new tty behind the same name
        try:
            for _ in range(200):
                if run.station.devices["ticket-scanner"].state == "connected":
                    break
                await asyncio.sleep(0.05)
            assert run.station.devices["ticket-scanner"].state == "connected"
            replug.scan("after-replug")
            assert await replug.aread(1) == b"\x06"
            got = await registry.wait_for(2)
        finally:
            replug.close()
    assert [r["data"]["text"] for r in got] == ["before-unplug", "after-replug"]
    assert [r["seq"] for r in got] == [1, 2]
