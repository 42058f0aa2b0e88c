"""Driver registry: the profile's `driver` value names the class that runs it.

Registered explicitly here, imported lazily, so that hardware libraries are
only loaded on hosts that drive that hardware.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from agent.drivers.base import Driver

if TYPE_CHECKING:
    from agent.config import DeviceConfig

__all__ = ["DRIVERS", "Driver", "create_driver"]

#: driver key -> "module:Class"
DRIVERS: dict[str, str] = {
    "serial": "agent.drivers.serial:SerialDriver",
    "hid": "agent.drivers.hid:HidDriver",
    "pcsc": "agent.drivers.pcsc:PcscDriver",
    "camera": "agent.drivers.camera:CameraDriver",
}


def create_driver(config: DeviceConfig) -> Driver:
    """Build (not open) the driver for one configured device."""
    module_name, _, class_name = DRIVERS[config.driver].partition(":")
    cls: type[Driver] = getattr(importlib.import_module(module_name), class_name)
    return cls(config)
