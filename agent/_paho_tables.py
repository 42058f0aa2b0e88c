"""paho's MQTT 5 `Properties` without rebuilding its lookup tables for every packet.

paho-mqtt 2.x builds three tables (27 names, 27 property kinds, 7 type names) in
`Properties.__init__`, and builds a `Properties` for every MQTT 5 PUBLISH it decodes
and every PUBACK it sends or receives: 9 µs each here, two to four per one-record
message at the registry, and about 5 KB of memory for each message waiting in the
client's queue. The tables are constants (paho only reads them), so `share()` makes
every instance point at one read-only copy taken from paho itself.

It checks before it acts: the copy is built by paho's own `__init__`, and if that
`__init__` ever sets anything but those four attributes, or a later paho mutates the
tables, `share()` leaves paho alone (and `tests/system/test_paho_tables.py` fails).
Private to the package; imports paho only when called.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

_EXPECTED = {"packetType", "types", "names", "properties"}
_state: dict[str, bool] = {}


def share() -> bool:
    """Install the shared tables once per process; True when installed."""
    if "installed" in _state:
        return _state["installed"]
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    original = Properties.__init__
    probe = Properties.__new__(Properties)
    original(probe, PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if set(vars(probe)) != _EXPECTED:
        _state["installed"] = False
        return False
    types = tuple(probe.types)
    names = MappingProxyType(dict(probe.names))
    kinds = MappingProxyType({k: (t, tuple(p)) for k, (t, p) in probe.properties.items()})

    def __init__(self: Any, packetType: int) -> None:
        d = self.__dict__
        d["packetType"] = packetType
        d["types"] = types
        d["names"] = names
        d["properties"] = kinds

    __init__.__doc__ = original.__doc__
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    Properties.__init__ = __init__  # type: ignore[method-assign]
    _state["installed"] = True
    return True
