"""Each capability a class claims, checked by signature: the real drivers and the fakes.

A class claims a Protocol with a module-level `_name: type[Protocol] = Class`
(mypy --strict checks that assignment); here every such claim in the driver
modules and in agent/testing.py is found and compared member by member with
`inspect.signature`, so a drift is caught even where a check is skipped. The
kiosk's PIN read once failed with a TypeError on every real reader because the
declaration, the API and the fake agreed with each other and not with the
driver: the last test makes mypy prove it would now refuse that.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import agent.testing
from agent.config import CameraDevice, DeviceConfig, HidDevice, PcscDevice
from agent.config_schema import validate_device
from agent.drivers.camera import (
    CameraDriver,
    Frame,
    FrameSource,
    Picamera2Source,
    Still,
    V4L2Source,
)
from agent.drivers.capabilities import CardInfoProvider, DriverStats, PhotoCamera
from agent.drivers.card import CardInfo
from agent.drivers.hid import Backend, EvdevBackend, HotplugWatch, InputDeviceLike, UdevWatch
from agent.drivers.pcsc import PcscDriver
from agent.testing import (
    FakeBackend,
    FakeCamera,
    FakeCardReader,
    FakeInputDevice,
    FakePhotoCamera,
    FakeWatch,
)

ROOT = Path(__file__).resolve().parents[2]
DRIVER_MODULES = ["agent.drivers.pcsc", "agent.drivers.camera", "agent.drivers.hid"]
#: names that modules import only for type checking, to resolve their annotations
TYPE_NAMES: dict[str, Any] = {
    "CardInfo": CardInfo,
    "Still": Still,
    "Frame": Frame,
    "DeviceConfig": DeviceConfig,
    "PcscDevice": PcscDevice,
    "CameraDevice": CameraDevice,
    "HidDevice": HidDevice,
}


def claims(module_name: str) -> list[tuple[type[Any], type[Any]]]:
    """(Protocol, class) for every `_x: type[Protocol] = Class` in the module."""
    module = importlib.import_module(module_name)
    found = []
    for name, annotation in vars(module).get("__annotations__", {}).items():
        hint = (
            eval(annotation, {**vars(module), **TYPE_NAMES})
            if isinstance(annotation, str)
            else annotation
        )
        if typing.get_origin(hint) is type:
            (proto,) = typing.get_args(hint)
            found.append((proto, getattr(module, name)))
    return found


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    ns = {**getattr(fn, "__globals__", {}), **TYPE_NAMES}
    return inspect.signature(fn, globals=ns, eval_str=True)


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        ns = {**(vars(module) if module else {}), **TYPE_NAMES}
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            hints[name] = eval(annotation, ns) if isinstance(annotation, str) else annotation
    return hints


def protocol_members(proto: type[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(methods and properties, data attributes) the Protocol declares."""
    methods = {
        name: value
        for name, value in vars(proto).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    }
    return methods, _hints(proto)


def mismatches(proto: type[Any], cls: type[Any]) -> list[str]:
    """How `cls` differs from `proto`: missing members, other parameters, sync vs async.

    Parameters must be identical; a return type may narrow as mypy allows (to a
    class claimed against the Protocol's return type, or from `Any`).
    """
    methods, attributes = protocol_members(proto)
    problems = []
    for name, declared in methods.items():
        have = inspect.getattr_static(cls, name, None)
        if have is None:
            problems.append(f"{name}: missing")
            continue
        want = declared
        if isinstance(declared, property):
            if not isinstance(have, property):
                problems.append(f"{name}: not a property")
                continue
            want, have = declared.fget, have.fget
        if inspect.iscoroutinefunction(want) != inspect.iscoroutinefunction(have):
            problems.append(f"{name}: async in one, not in the other")
        want_sig, have_sig = _signature(want), _signature(have)
        if want_sig.parameters != have_sig.parameters or not _narrows(
            want_sig.return_annotation, have_sig.return_annotation
        ):
            problems.append(f"{name}: {have_sig} != {want_sig}")
    have_hints = _hints(cls)
    for name, want_type in attributes.items():
        if name in have_hints:
            if have_hints[name] != want_type:
                problems.append(f"{name}: {have_hints[name]} != {want_type}")
        elif inspect.getattr_static(cls, name, None) is None and not _set_in_init(cls, name):
            problems.append(f"{name}: missing attribute")
    return problems


def _narrows(want: Any, have: Any) -> bool:
    """Whether a return type `have` may stand where `want` is declared."""
    if want == have or want is Any:
        return True
    w_args, h_args = typing.get_args(want), typing.get_args(have)
    if w_args and typing.get_origin(want) == typing.get_origin(have):
        return len(w_args) == len(h_args) and all(map(_narrows, w_args, h_args))
    return (want, have) in set(agent.testing.FAKES.values())


def _set_in_init(cls: type[Any], name: str) -> bool:
    """Whether some `__init__` of the class assigns `self.<name>` (Driver sets `name`)."""
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if inspect.isfunction(init) and f"self.{name} = " in inspect.getsource(init):
            return True
    return False


# -- the real drivers ---------------------------------------------------------------


def test_every_driver_claims_what_it_offers() -> None:
    """The claims exist (an empty list would make the next test pass on nothing)."""
    got = {(p, c) for m in DRIVER_MODULES for p, c in claims(m)}
    assert (CardInfoProvider, PcscDriver) in got
    assert (PhotoCamera, CameraDriver) in got
    assert (DriverStats, CameraDriver) in got


@pytest.mark.parametrize("module", DRIVER_MODULES)
def test_real_drivers_satisfy_the_protocols_they_claim(module: str) -> None:
    for proto, cls in claims(module):
        assert mismatches(proto, cls) == [], f"{cls.__name__} vs {proto.__name__}"


@pytest.mark.parametrize(
    ("proto", "cls"),
    [
        (FrameSource, Picamera2Source),
        (FrameSource, V4L2Source),
        (Backend, EvdevBackend),
        (HotplugWatch, UdevWatch),
    ],
)
def test_real_library_boundaries_match_their_protocol(proto: type[Any], cls: type[Any]) -> None:
    assert mismatches(proto, cls) == []


def test_the_kiosk_and_the_station_call_card_info_as_declared() -> None:
    """The declared shape is the real one: one PIN in, a CardInfo out."""
    sig = _signature(CardInfoProvider.read_card_info)
    assert list(sig.parameters) == ["self", "pin"]
    assert sig.return_annotation is CardInfo


def test_the_comparison_sees_a_drift() -> None:
    """The checker itself: the shape the kiosk once called is reported, not passed."""

    class Drifted:
        async def read_card_info(self, reader: str, pin: str) -> dict[str, Any]:
            return {}

    class Blocking:
        def read_card_info(self, pin: str) -> CardInfo:
            raise NotImplementedError

    assert mismatches(CardInfoProvider, Drifted) == [
        "read_card_info: (self, reader: str, pin: str) -> dict[str, typing.Any] "
        "!= (self, pin: str) -> agent.drivers.card.CardInfo"
    ]
    assert mismatches(CardInfoProvider, Blocking) == [
        "read_card_info: async in one, not in the other"
    ]
    assert mismatches(PhotoCamera, object) == [
        "capture_photo: missing",
        "name: missing attribute",
    ]


# -- the fakes --------------------------------------------------------------------------


def test_every_fake_is_claimed_against_its_protocol() -> None:
    got = set(claims("agent.testing"))
    assert got == {(proto, fake) for proto, fake in agent.testing.FAKES.values()}
    assert (InputDeviceLike, FakeInputDevice) in got
    assert (Backend, FakeBackend) in got
    assert (HotplugWatch, FakeWatch) in got
    assert (FrameSource, FakeCamera) in got


@pytest.mark.parametrize("seam", sorted(agent.testing.FAKES))
def test_fakes_have_the_signatures_of_their_protocol(seam: str) -> None:
    proto, fake = agent.testing.FAKES[seam]
    assert mismatches(proto, fake) == []


def test_isinstance_finds_the_capabilities_on_drivers_and_fakes() -> None:
    """The API and the station find a capability with isinstance, fake or real alike."""
    reader = PcscDevice(name="reader", profile="test", driver="pcsc", reader="*")  # type: ignore[arg-type]
    camera = validate_device(
        {"name": "cam", "profile": "p", "driver": "camera", "source": "v4l2"}, CameraDevice
    )
    for driver in (PcscDriver(reader), FakeCardReader(reader)):
        assert isinstance(driver, CardInfoProvider)
        assert not isinstance(driver, PhotoCamera)
    for cam in (CameraDriver(camera), FakePhotoCamera(camera)):
        assert isinstance(cam, PhotoCamera)
        assert not isinstance(cam, CardInfoProvider)
    assert isinstance(CameraDriver(camera), DriverStats)


@pytest.mark.slow
def test_mypy_refuses_a_driver_that_drifts_from_its_capability(tmp_path: Path) -> None:
    """The kiosk's old call, and a driver with the old declared shape: both type errors."""
    code = tmp_path / "drift.py"
    code.write_text(
        "from agent.drivers.capabilities import CardInfoProvider\n"
        "from agent.drivers.pcsc import PcscDriver\n"
        "\n"
        "class Drifted(PcscDriver):\n"
        "    async def read_card_info(  # type: ignore[override]\n"
        "        self, reader: str, pin: str\n"
        "    ) -> dict[str, str]:\n"
        "        return {}\n"
        "\n"
        "_claim: type[CardInfoProvider] = Drifted\n"
        "\n"
        "async def kiosk(driver: CardInfoProvider) -> None:\n"
        "    await driver.read_card_info('card-reader', '1234')\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            str(code),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert 'variable has type "type[CardInfoProvider]"' in run.stdout
    assert 'Too many arguments for "read_card_info" of "CardInfoProvider"' in run.stdout
