"""The one error tree of the agent.

Third-party exceptions (sqlite3, paho/aiomqtt, pyserial, pyscard, evdev) are
translated at the module that calls the library, into one of these, and the
message names the file, key or device so the person reading it can act.
"""

from __future__ import annotations


class MadoguchiError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(MadoguchiError):
    """The configuration or a device profile is wrong.

    `problems` holds every problem found, each as `file: key: reason`.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class OutboxError(MadoguchiError):
    """The outbox database could not do what was asked."""


class OutboxFull(OutboxError):
    """The outbox reached `max_bytes`: the new record is refused, nothing old is dropped."""


class UplinkError(MadoguchiError):
    """The broker could not be reached or refused us."""


class DeviceError(MadoguchiError):
    """A device failed. The message starts with the device name."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"{device}: {reason}")
        self.device = device
        self.reason = reason


class DeviceUnavailable(DeviceError):
    """The device is not there (unplugged, not yet plugged, port missing): retry later."""


class DriverMissing(DeviceError):
    """The hardware library of a driver is not installed on this host."""


class CardError(DeviceError):
    """A card operation failed (card removed, wrong answer, refused by the PIN rules)."""


class PinRefused(CardError):
    """A PIN was not tried, or was wrong. `tries_left` is what the card reports."""

    def __init__(self, device: str, reason: str, tries_left: int | None) -> None:
        super().__init__(device, reason)
        self.tries_left = tries_left


class EnrollError(MadoguchiError):
    """Enrolment failed: bad site/name, unreadable key, certificate not matching the key."""


# -- station: kiosk API


class ApiError(MadoguchiError):
    """A kiosk API answer other than 2xx, with a stable machine code for the page.

    `extra` joins the JSON body (e.g. `tries_left`); agent/station/kiosk/guard.py renders it.
    """

    def __init__(self, status: int, code: str, detail: str, **extra: object) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra


# -- central


class RegistryStoreError(MadoguchiError):
    """The registry database failed; nothing of the transaction was committed."""


class BlobMismatch(MadoguchiError):
    """A blob's bytes do not hash to the sha256 it was announced with."""


class BlobError(MadoguchiError, ValueError):
    """A blob message that cannot be used (malformed, out of range, wrong size).

    Also a ValueError: it is bad input from the wire, caught with the JSON errors.
    """


# -- harness (agent/testing.py) -----------------------------------------------------------


class HarnessError(MadoguchiError):
    """A real part of the test harness (mosquitto, an agent or registry process) did not
    start or did not get ready; the message holds what it said."""
