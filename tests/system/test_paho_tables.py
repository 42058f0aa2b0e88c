"""agent/_paho_tables.py: paho's MQTT 5 Properties with shared tables encode and decode
exactly as paho's own, and the shortcut stands aside for a paho it does not know."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import _paho_tables


def paho_original(packet_type: int) -> Any:
    """A Properties as paho itself builds it, whether or not the tables are shared."""
    init = getattr(Properties.__init__, "__wrapped__", Properties.__init__)
    p = Properties.__new__(Properties)
    init(p, packet_type)
    return p


def test_shared_tables_hold_what_paho_builds() -> None:
    assert _paho_tables.share() is True
    assert _paho_tables.share() is True  # once per process
    for packet_type in (PacketTypes.PUBLISH, PacketTypes.PUBACK, PacketTypes.CONNECT):
        ours, theirs = Properties(packet_type), paho_original(packet_type)
        assert ours.packetType == theirs.packetType == packet_type
        assert list(ours.types) == theirs.types
        assert dict(ours.names) == theirs.names
        assert {k: (t, list(p)) for k, (t, p) in ours.properties.items()} == theirs.properties


def test_the_shared_tables_cannot_be_changed_through_an_instance() -> None:
    _paho_tables.share()
    p = Properties(PacketTypes.PUBLISH)
    with pytest.raises(TypeError):
        p.names["Made Up"] = 99
    with pytest.raises(TypeError):
        p.properties[1] = (0, [])
    assert "Made Up" not in Properties(PacketTypes.PUBLISH).names


_utf8 = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
)
_publish_props = st.fixed_dictionaries(
    {},
    optional={
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "ContentType": _utf8,
        "ResponseTopic": _utf8,
        "CorrelationData": st.binary(max_size=40),
        "TopicAlias": st.integers(1, 65535),
        "UserProperty": st.lists(st.tuples(_utf8, _utf8), min_size=1, max_size=4),
    },
)


def _fill(p: Any, values: dict[str, Any]) -> Any:
    for name, value in values.items():
        setattr(p, name, value)
    return p


@settings(max_examples=200, deadline=None)
@given(values=_publish_props)
def test_publish_properties_encode_and_decode_as_pahos_own(values: dict[str, Any]) -> None:
    _paho_tables.share()
    ours = _fill(Properties(PacketTypes.PUBLISH), values)
    theirs = _fill(paho_original(PacketTypes.PUBLISH), values)
    packed = ours.pack()
    assert packed == theirs.pack()
    back, used = Properties(PacketTypes.PUBLISH).unpack(packed)
    ref, ref_used = paho_original(PacketTypes.PUBLISH).unpack(packed)
    assert used == ref_used == len(packed)
    assert back.json() == ref.json()
    assert str(back) == str(ref)


def test_a_property_of_another_packet_type_is_refused_as_by_paho() -> None:
    _paho_tables.share()
    with pytest.raises(Exception, match="does not apply") as ours:
        Properties(PacketTypes.PUBACK).SessionExpiryInterval = 10
    with pytest.raises(Exception, match="does not apply") as theirs:
        paho_original(PacketTypes.PUBACK).SessionExpiryInterval = 10
    assert type(ours.value) is type(theirs.value)


@pytest.fixture
def pristine_paho(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """paho's Properties.__init__ as shipped and share() not yet called; restored after."""
    original = getattr(Properties.__init__, "__wrapped__", Properties.__init__)
    monkeypatch.setattr(Properties, "__init__", original)
    monkeypatch.setattr(_paho_tables, "_state", {})
    yield


def test_a_paho_whose_properties_carry_more_state_is_left_alone(
    pristine_paho: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = Properties.__init__

    def newer(self: Any, packetType: int) -> None:
        shipped(self, packetType)
        object.__setattr__(self, "cache", {})

    monkeypatch.setattr(Properties, "__init__", newer)
    assert _paho_tables.share() is False
    assert Properties.__init__ is newer
    assert Properties(PacketTypes.PUBLISH).cache == {}
