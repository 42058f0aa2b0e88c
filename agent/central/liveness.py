"""Is a station reachable? Judged from what it is heard doing, not only from its will.

On one mosquitto the retained `status` and the will say online / offline. On a
broker cluster neither can be trusted (issue #19): RabbitMQ 3.10 keeps retained
messages on the node they were sent to, and when the station's node dies no will
fires at all, so the last word anyone heard is still "online". What does not lie is
silence: a station sends telemetry every `telemetry_interval_s` (it says how often
in its status and telemetry), records when it scans, and the registry acks them.
A station said to be online but heard from by none of these for longer than
`unreachable_after` of its intervals is `unreachable`.

Pure: fed times, asked for a verdict. The dashboard (agent/central/dashboard.py)
uses it per row; the registry's optional station-status feed could use the same.
"""

from __future__ import annotations

from dataclasses import dataclass

#: a station that does not say its telemetry interval: the agent's default
DEFAULT_TELEMETRY_INTERVAL_S = 30.0
#: more than one interval (telemetry may come a little late), less than two (the
#: promise: a dead station's node shows as unreachable within two intervals)
UNREACHABLE_AFTER = 1.5


@dataclass(slots=True)
class Heard:
    """When a station was last heard from, by kind of evidence (epoch seconds)."""

    telemetry: float | None = None  # telemetry or an online status
    records: float | None = None  # the registry stored one of its records
    ack: float | None = None  # the registry acked its records
    interval_s: float = DEFAULT_TELEMETRY_INTERVAL_S

    def latest(self) -> float | None:
        times = [t for t in (self.telemetry, self.records, self.ack) if t is not None]
        return max(times, default=None)

    def said_interval(self, value: object) -> None:
        """The `telemetry_interval_s` a status or telemetry carried, when it is sane."""
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 86_400:
            self.interval_s = float(value)


def verdict(
    state: str, heard: Heard, now: float, unreachable_after: float = UNREACHABLE_AFTER
) -> tuple[str, float | None]:
    """(state to show, seconds of silence or None): `unreachable` when the station is said
    to be online but has been silent for longer than `unreachable_after` intervals."""
    latest = heard.latest()
    silent = None if latest is None else max(0.0, now - latest)
    if state == "online" and silent is not None and silent > unreachable_after * heard.interval_s:
        return "unreachable", silent
    return state, silent
