"""What `madoguchi fleet config push` says of a push it could not follow to its end
(agent/central/fleet_config.py `_last`); the push itself runs end to end in
tests/system/test_fleet_config.py."""

from __future__ import annotations

import asyncio

from agent.central.fleet_config import _last


async def test_an_unknown_outcome_says_when_the_station_last_spoke_and_what_it_said() -> None:
    loop = asyncio.get_running_loop()
    assert _last(None, loop).startswith("nothing heard from the station since its result")
    said = {"state": "online", "config_revision": "r7", "config_state": "applied", "data": 1}
    assert _last((loop.time() - 4.2, said), loop) == (
        "last heard 4 s ago: state online, config_revision r7, config_state applied"
    )
    assert _last((loop.time(), {"ts": "x"}), loop) == "last heard 0 s ago: no configuration fields"
