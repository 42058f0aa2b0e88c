"""The one error tree of the project, station and central alike.

Third-party exceptions (sqlite3, psycopg, paho/aiomqtt, pyserial, pyscard, evdev) are
translated at the module that calls the library, into one of these, and the
message names the file, key, device or server so the person reading it can act.

    MadoguchiError
    ├── ConfigError            configuration or device profile; .problems = ["file: key: reason"]
    ├── OutboxError            the outbox database could not do what was asked
    │   ├── OutboxFull         max_bytes reached: the new record is refused (NAK)
    │   └── OutboxDiskFull     the filesystem is full (ENOSPC, SQLITE_FULL): a state, not a crash
    ├── UplinkError            the broker could not be reached or refused us
    ├── DeviceError            a device failed; the message starts with the device name
    │   ├── DeviceUnavailable  not there (unplugged, port missing): retry later
    │   ├── DriverMissing      the driver's hardware library is not installed
    │   └── CardError          a card operation failed
    │       └── PinRefused     a PIN was not tried or was wrong; .tries_left
    ├── EnrollError            enrolment: bad names, unreadable key, certificate mismatch
    ├── DataDirLocked          another agent holds the data_dir's lock; .pid
    ├── CaptureError           (also ValueError) an evtest capture line evtest never prints
    ├── ApiError               a kiosk API answer other than 2xx, with a machine code
    ├── RegistryStoreError     the registry database failed; nothing was committed
    ├── BrokerLinkError        the registry's MQTT connection refused, lost or broken
    ├── BlobMismatch           blob bytes that do not hash to their announced sha256
    ├── BlobError              (also ValueError) a blob message that cannot be used
    ├── DashboardAuthError     the dashboard's token file is missing, empty or weak
    ├── AuditError             the dashboard's audit log could not be written or read
    ├── PersonalSealError      (also ValueError) a sealed personal part that cannot be opened
    ├── HarnessError           agent.testing could not start a part (mosquitto, registry)
    ├── DatasetRefused         a reference dataset version not applied (signature, version, expiry)
    ├── DatasetStoreError      the station's datasets.db could not be read or written
    ├── DatasetKeyError        a dataset signing or pinned public key is missing or unreadable
    ├── ReleaseRefused         a release not installed or switched to (signature, files, schema)
    ├── RemoteConfigError      cmd/config: agent.toml, .previous or its state file not written
    └── RenewError             certificate renewal: CSR refused, bad answer, signer's files

One error lives outside this module on purpose: `agent.contract.messages.MessageError`
(a ValueError), because the contract imports nothing but the standard library; the
station and the registry catch it where they parse a message. Its one subclass,
`agent.contract.validate.RecordError`, is a `records` message or record refused by the
registry (then dead-lettered). `NoService` in
agent/drivers/scard.py is a signal between the pyscard boundary and the driver thread
(pcscd went away), never raised past the driver.
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


class OutboxDiskFull(OutboxError):
    """The filesystem under the outbox is full: an append is refused (NAK), bookkeeping
    is retried with backoff, and the station shows `disk_full` until a write succeeds."""


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


class CaptureError(MadoguchiError, ValueError):
    """A line of an evtest capture is not something evtest prints (hid-replay)."""


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


class BrokerLinkError(MadoguchiError):
    """The registry's own MQTT connection (agent/central/mqtt_lean.py) was refused, lost,
    fell silent or broke the protocol; the message names the broker. The registry
    reconnects with backoff."""


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


# -- central: dashboard security (agent/central/dashboard_guard.py, audit.py) -------------


class DashboardAuthError(MadoguchiError):
    """The dashboard's token file is missing, empty or holds a token too short."""


class AuditError(MadoguchiError):
    """The dashboard's audit log could not be written (no command is sent then) or read."""


class PersonalSealError(MadoguchiError, ValueError):
    """A sealed personal part (`data["personal_sealed"]`) is malformed, or cannot be
    opened: wrong private key, tampered ciphertext, or sealed for another record id.
    The message names the record and the reason, never the content."""


# -- station: one agent per data_dir (agent/station/lock.py) -------------------------------


class DataDirLocked(MadoguchiError):
    """Another agent holds the data_dir's lock; `pid` is its process id when known."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


# -- reference datasets (agent/station/datasets.py, agent/central/datasets.py) -------------


class DatasetRefused(MadoguchiError):
    """A dataset version that is not applied; the version held keeps serving."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"dataset {kind}: {reason}")
        self.kind = kind
        self.reason = reason


class DatasetStoreError(MadoguchiError):
    """The station's datasets.db failed; the message names the file."""


class DatasetKeyError(MadoguchiError):
    """A dataset key file (Ed25519 private on the central side, public on a station) is
    missing, unreadable or not a key; the message names the file."""


# -- releases (agent/station/releases.py, agent/contract/releases.py) -----------------------


class ReleaseRefused(MadoguchiError):
    """A release that is not installed or switched to; the running one keeps running."""

    def __init__(self, version: str, reason: str) -> None:
        super().__init__(f"release {version}: {reason}")
        self.version = version
        self.reason = reason


class RemoteConfigError(MadoguchiError):
    """A remote configuration (`cmd/config`) could not be kept or rolled back: the
    agent.toml beside it, its .previous copy or its state file; the message names it."""


class RenewError(MadoguchiError):
    """Certificate renewal failed: a CSR refused by the fleet signer, a signed certificate
    that does not fit the key, or the signer's own files; the message says which."""
