"""What a station process carries: no library it does not use, no Nagle on its MQTT sockets.

RSS is measured in bench/run.py, not here; these tests pin the causes down.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.testing import Broker, Pty, RegistryProbe, running_station, write_config

HEAVY = ["cryptography", "biip", "numpy", "PIL", "zxingcpp", "starlette", "uvicorn", "psycopg"]


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    return {m.split(".")[0] for m in out.split()}


def test_agent_run_imports_no_library_it_does_not_use() -> None:
    loaded = modules_after(
        "import agent.cli.main, agent.station.app, agent.station.station, agent.station.uplink\n"
        "agent.cli.main.build_parser()"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_run_builds_only_the_station_parsers_and_help_still_lists_every_command() -> None:
    # issue #18: the central and tool commands' modules cost a running agent 1.6 MB
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, agent.cli.main as m\nm.build_parser('run')\n"
            "print(' '.join(n for n in sys.modules if n.startswith('agent.')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    assert "agent.cli.central" not in out and "agent.cli.tools" not in out, out
    assert "agent.interpret" not in out and "agent.keymap" not in out, out
    help_text = subprocess.run(
        [sys.executable, "-m", "agent", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    for command in ("run", "check-config", "outbox", "registry", "dashboard", "decode", "demo"):
        assert command in help_text


def test_biip_is_loaded_by_the_first_gs1_string_only() -> None:
    code = "from agent.interpret import interpret\n"
    code += "for t in ('111122410000012345', '4901234567894', 'https://x.jp', 'hello'):\n"
    code += "    interpret(t)\n"
    assert "biip" not in modules_after(code)
    gs1 = (
        code
        + "assert interpret('01049123451234591725123110ABC', symbology=']d2')['type'] == 'gs1'\n"
    )
    assert "biip" in modules_after(gs1)


def nodelay(sock: socket.socket | None) -> int:
    assert sock is not None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.broker
async def test_mqtt_sockets_of_agent_and_registry_send_without_nagle(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    async with running_station(cfg) as running:
        uplink = running.station.uplink
        assert uplink is not None
        for _ in range(500):  # the uplink connects on its own schedule after the devices
            if uplink._client is not None:
                break
            await asyncio.sleep(0.02)
        assert uplink._client is not None
        assert nodelay(uplink._client._client.socket()) == 1  # type: ignore[arg-type]
    # the registry's own connection (agent/central/mqtt_lean.py), as it is connected now
    await asyncio.wait_for(registry.registry.connected.wait(), 10)
    client = registry.registry._client_now
    assert client is not None and client._transport is not None
    assert nodelay(client._transport.get_extra_info("socket")) == 1


def test_evdev_is_not_imported_for_a_hid_scanner_that_is_absent() -> None:
    # issue #18: a station whose scanner is unplugged does not carry python-evdev
    code = (
        "from agent.drivers.hid import EvdevBackend\n"
        "b = EvdevBackend()\n"
        "try:\n"
        "    b.open('/dev/input/by-id/usb-absent-event-kbd')\n"
        "except FileNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('opened an absent device')\n"
    )
    assert "evdev" not in modules_after(code)


def test_linuxpy_is_not_imported_for_a_camera_that_is_absent() -> None:
    code = (
        "from agent.config import CameraDevice\n"
        "from agent.config_schema import validate_device\n"
        "from agent.drivers.camera import V4L2Source\n"
        "from agent.errors import DeviceUnavailable\n"
        "cfg = validate_device({'name': 'cam', 'profile': 'p', 'driver': 'camera',"
        " 'source': 'v4l2', 'device': '/dev/video-absent'}, CameraDevice)\n"
        "try:\n"
        "    V4L2Source(cfg).open()\n"
        "except DeviceUnavailable as e:\n"
        "    assert 'cannot open /dev/video-absent' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('opened an absent camera')\n"
    )
    assert "linuxpy" not in modules_after(code)
