"""The configuration's rules: TOML in, every problem as `file: key: reason`, all at once.

Each class here is validated with pydantic and converted to its plain twin in
agent/config.py, which is what the rest of the station sees. This module is imported by
`check-config`, the tools and the tests, and by the child process that
`load_config_isolated` starts; never by a running agent (pydantic would cost it ~14 MB).
Nothing here opens a device or imports a hardware library: `madoguchi check-config`
runs on any host.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent import config_types as runtime
from agent._configdoc import field_row
from agent.config_types import (
    BUNDLED_PROFILE_DIR,
    DEFAULT_CAMERA_FORMATS,
    DEFAULT_HID_GS_KEYS,
    DEFAULT_HID_TERMINATORS,
    DEFAULT_JPKI_ANCHORS,
    DEVICE_NAME_PATTERN,
    NAME_PATTERN,
    SYSTEM_PROFILE_DIR,
    BarcodeFormatName,
    decode_text,
    is_loopback,
    split_broker,
)
from agent.contract.datasets import DATASETS_SITE
from agent.contract.topics import DEFAULT_PREFIX, REGISTRY_SITE
from agent.errors import ConfigError


def _toml_bool(value: Any) -> Any:
    """`read_my_number = "yes"` must not silently mean true: booleans are TOML booleans."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false (a TOML boolean, no quotes), not {value!r}")
    return value


#: a bool that only a TOML boolean sets (pydantic would take "yes", "on", 1)
TomlBool = Annotated[bool, BeforeValidator(_toml_bool)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(Strict):
    site: str = Field(pattern=NAME_PATTERN, description="Site id; a topic level.")
    name: str = Field(pattern=NAME_PATTERN, description="Agent id, unique within the site.")
    data_dir: Path = Field(
        default=Path("/var/lib/madoguchi"), description="Where the outbox database lives."
    )
    telemetry_interval_s: float = Field(
        default=30.0, gt=0, description="Seconds between telemetry messages."
    )
    profile_dirs: list[Path] = Field(
        default_factory=list,
        description="Extra directories searched first for device profiles.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level on stderr. Personal data is never logged."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text, or json (one object per line) for log collectors. Under systemd "
        "lines carry syslog priorities (<4>) and no timestamp of their own.",
    )
    remote_photo: TomlBool = Field(
        default=False,
        description="Answer the remote command cmd/capture_photo (a camera trigger from the "
        "dashboard). Off: refused; the kiosk's own photo button works either way.",
    )
    config_rollback_after_s: float = Field(
        default=120.0,
        gt=0,
        description="After a remote configuration (cmd/config) is applied: seconds the "
        "station may go without reaching the broker and the registry before it restores "
        "the previous agent.toml by itself.",
    )
    cert_renew_at: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="Fraction of the client certificate's lifetime after which the station "
        "asks the fleet signer for a new one over MQTT (csr topic); alerts start at 0.9.",
    )

    release_public_key: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="The release key's Ed25519 public key, 64 hex digits (`madoguchi fleet "
        "release-keygen` prints it). Unset: cmd/update is refused.",
    )
    releases_dir: Path = Field(
        default=Path("/opt/madoguchi/releases"),
        description="A/B release directory: one venv per version and the `current` symlink "
        "the service starts from (docs/fleet.md).",
    )
    release_health_deadline_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a switched-to release has to pass its health check (READY, "
        "broker connected, first registry ack) before the previous one comes back.",
    )

    @field_validator("site")
    @classmethod
    def _not_the_registry_s(cls, v: str) -> str:
        """`_registry` is the site level of the registry consumers' own status topics."""
        if v == REGISTRY_SITE:
            raise ValueError(f"{v!r} is reserved for the registry's own topics")
        if v == DATASETS_SITE:
            raise ValueError(f"{v!r} is reserved for the reference datasets' topics")
        return v


class MqttSection(Strict):
    hosts: list[str] | None = Field(
        default=None,
        min_length=1,
        description='Several brokers (a cluster\'s nodes), `["b1:8883", "b2:8883"]`, tried '
        "in turn; each is host or host:port (`port` when none), a name with several "
        "addresses is tried address by address. Instead of `host`.",
    )
    host: str | None = Field(
        default=None,
        validate_default=True,
        description="Broker host name or address (a name with several addresses is tried "
        "address by address). Either this or `hosts`.",
    )
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    persistent_session: TomlBool = Field(
        default=False,
        description="Keep the MQTT session on the broker while disconnected (3.1.1: "
        "clean_session=false; 5: clean_start=false and `session_expiry_s`): acks sent "
        "meanwhile are delivered at reconnect; on a RabbitMQ cluster the subscription "
        "queue survives the node it was homed on (docs/central.md).",
    )
    session_expiry_s: int = Field(
        default=86_400,
        ge=1,
        le=4_294_967_295,
        description="MQTT 5 with persistent_session: how long the broker keeps the session "
        "of a station that is away.",
    )
    topic_prefix: str = Field(default=DEFAULT_PREFIX, description="First topic levels.")
    protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT version.")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive.")
    tls_ca: Path | None = Field(default=None, description="CA bundle; enables TLS.")
    tls_cert: Path | None = Field(default=None, description="Client certificate (PEM).")
    tls_key: Path | None = Field(default=None, description="Client private key (PEM).")
    username: str | None = Field(default=None, description="MQTT user name.")
    password_file: Path | None = Field(
        default=None, description="File holding the MQTT password (first line)."
    )
    batch_max_records: int = Field(
        default=500, ge=1, le=10_000, description="Most records in one records message."
    )
    batch_max_bytes: int = Field(
        default=200_000,
        ge=1_000,
        le=256_000,
        description="Most bytes of one records message (brokers often cap packets at 256 KB).",
    )
    publish_timeout_s: float = Field(
        default=10.0, gt=0, description="Wait this long for a PUBACK before reconnecting."
    )
    inflight_messages: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Records messages published and not yet PUBACKed at once while PUBACKs "
        "come back within 15 ms (a LAN; one message in flight caps a drain at "
        "batch_max_records / round trip). Order on the wire is seq order whatever the value.",
    )
    inflight_messages_max: int = Field(
        default=32,
        ge=1,
        le=64,
        description="The window grows to this many messages while PUBACKs take 30 ms or "
        "more (a WAN: more bytes on the link keep it busy; each message held costs up to "
        "batch_max_bytes of memory). Set it to inflight_messages for a fixed window.",
    )
    backoff_max_s: float = Field(
        default=30.0, gt=0, description="Longest wait between reconnect attempts."
    )
    max_inbound_bytes: int = Field(
        default=1_048_576,
        ge=1_024,
        le=64 * 1_048_576,
        description="Largest ack, command or blob request accepted; larger ones are dropped "
        "unread and counted in telemetry (uplink.inbound.oversize).",
    )

    @field_validator("inflight_messages_max")
    @classmethod
    def _window_grows(cls, v: int, info: ValidationInfo) -> int:
        low = info.data.get("inflight_messages")
        if low is not None and v < low:
            raise ValueError(f"{v} is less than inflight_messages ({low}): the window never grows")
        return v

    @field_validator("hosts")
    @classmethod
    def _each_broker(cls, v: list[str] | None) -> list[str] | None:
        for i, entry in enumerate(v or []):
            try:
                split_broker(entry, 1)
            except ValueError as e:
                raise ValueError(f"[{i}] {e}") from None
        return v

    @field_validator("host")
    @classmethod
    def _host_or_hosts(cls, v: str | None, info: ValidationInfo) -> str | None:
        if "hosts" not in info.data:
            return v  # hosts itself is wrong: reported there
        hosts = info.data["hosts"]
        if v is None and hosts is None:
            raise ValueError("missing (required, or a list of brokers in mqtt.hosts)")
        if v is not None and hosts is not None:
            raise ValueError("set host or hosts, not both")
        if v is not None and (not v.strip() or any(c.isspace() for c in v)):
            raise ValueError(f"{v!r}: not a host name or address")
        return v


class OutboxSection(Strict):
    max_bytes: int = Field(
        default=2_000_000_000,
        ge=100_000,
        description="When the database reaches this size new records are refused (NAK).",
    )
    resend_after_s: float = Field(
        default=30.0, gt=0, description="Re-publish records the registry has not confirmed."
    )
    retention_days: float = Field(
        default=7.0, ge=0, description="Keep confirmed records this long, then purge them."
    )
    key_file: Path | None = Field(
        default=None,
        description="32-byte AES key (mode 0600) that encrypts personal data at rest; "
        "required when a device stores personal data.",
    )
    integrity_check_interval_s: float = Field(
        default=600.0,
        ge=0,
        description="Run a quick integrity check of the outbox this often, on a read "
        "connection of its own (scans are not stalled); a damaged database is moved aside "
        "and salvaged. 0 turns it off.",
    )
    registry_public_key: Path | None = Field(
        default=None,
        description="The registry's X25519 public key (PEM, from `madoguchi registry keygen`): "
        "a record's personal part is sealed to it, so that the broker and the registry only "
        "hold ciphertext; required when a device stores personal data.",
    )


class ApiSection(Strict):
    """The kiosk's local HTTP API (agent/station/kiosk/). Loopback only unless told otherwise."""

    enabled: TomlBool = Field(default=True, description="Serve the local API and the kiosk page.")
    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on; must be a loopback address unless allow_remote.",
    )
    allow_remote: TomlBool = Field(
        default=False,
        description="Allow a non-loopback host. The API then answers the network: only "
        "behind a firewall that admits the kiosk alone.",
    )
    port: int = Field(default=8765, ge=1, le=65535, description="TCP port on host.")
    token_file: Path | None = Field(
        default=None,
        description="File holding the bearer token (first line, >= 32 characters). Default "
        "<data_dir>/api-token, created with a random token (mode 0600) if missing.",
    )
    allowed_origin: str | None = Field(
        default=None,
        pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+$",
        description="The one Origin browsers may call from (scheme://host[:port], no path). "
        "Default: the agent's own page, http://<host>:<port>.",
    )
    unix_socket: Path | None = Field(
        default=None,
        description="Also listen on this unix socket (mode 0660), for local tools.",
    )
    manual_device: str | None = Field(
        default=None,
        description="Device that manual entries from the kiosk page are stored under. "
        "Default: the first device.",
    )
    max_body_bytes: int = Field(
        default=16_384, ge=256, le=1_048_576, description="Larger request bodies get 413."
    )
    event_buffer: int = Field(
        default=1000,
        ge=10,
        le=100_000,
        description="Events kept for clients resuming with Last-Event-ID.",
    )
    role: Literal["vaccination", "mynumber", "general"] = Field(
        default="vaccination",
        description="What this desk does; picks the kiosk page's prompt: vaccination (接種券), "
        "mynumber (マイナンバーカード窓口) or general (総合窓口).",
    )
    max_connections: int = Field(
        default=128,
        ge=4,
        le=4096,
        description="Open connections at most; at the cap a new one closes the oldest idle "
        "or slow-header connection, never one with a request in flight.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A connection must send a request's whole header within this; else closed.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="A request's whole body must arrive within this of its header; else closed.",
    )
    idle_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="A keep-alive connection idle this long after a response is closed.",
    )

    @model_validator(mode="after")
    def _loopback_only(self) -> ApiSection:
        if not self.allow_remote and not is_loopback(self.host):
            raise ValueError(
                f"host '{self.host}' is not a loopback address; set allow_remote = true "
                "to serve other hosts on purpose"
            )
        return self


class DeviceBase(Strict):
    name: str = Field(pattern=DEVICE_NAME_PATTERN, description="Unique; in every record.")
    profile: str = Field(description="device_profiles/<profile>.toml this device is built on.")
    description: str = Field(default="", description="Human description of the model.")
    label: str = Field(
        default="",
        max_length=40,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description='Name the kiosk page shows for the device, e.g. label = "接種券スキャナ". '
        "Default: the device name.",
    )
    expect: list[str] = Field(
        default_factory=list,
        description="Interpretation types this station expects; others are flagged.",
    )
    nak_invalid: TomlBool = Field(
        default=False, description="Answer invalid or unexpected reads with a NAK."
    )
    repeat_window_s: float = Field(
        default=2.0, ge=0, description="The same text again within this window is stored once."
    )
    gs_substitute: str | None = Field(
        default=None,
        min_length=1,
        max_length=1,
        description="Character the scanner sends in place of the GS1 separator (0x1D).",
    )
    usb_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$",
        description="USB vendor:product (lower-case hex, as lsusb shows it). provisioning/"
        "install.sh gives the agent's group this device only, linked as /dev/madoguchi/<name>.",
    )


class SerialDevice(DeviceBase):
    driver: Literal["serial"] = Field(description="Serial scanner (USB-COM, RS-232).")
    port: str = Field(description="Serial device path, e.g. /dev/serial/by-id/...")
    baudrate: int = Field(default=9600, gt=0, description="Line speed.")
    bytesize: Literal[7, 8] = Field(default=8, description="Data bits.")
    parity: Literal["N", "E", "O"] = Field(default="N", description="Parity.")
    stopbits: Literal[1, 2] = Field(default=1, description="Stop bits.")
    terminator: str = Field(default="\r", min_length=1, description="Ends every scan.")
    encoding: str = Field(default="utf-8", description="Text encoding the scanner sends.")
    max_line_bytes: int = Field(
        default=4096, ge=16, description="A longer line is an error event, then resync."
    )
    host_ack: str = Field(default="", description="Written back once the record is durable.")
    host_nak: str = Field(default="", description="Written back when it could not be stored.")
    host_alarm: str = Field(
        default="",
        description="Written back instead of host_ack / host_nak for a stored read whose"
        " reference-data verdict is an alarm (already_used, recalled), e.g. a"
        " distinct beep pattern command; empty: host_ack / host_nak as usual.",
    )

    @field_validator("terminator", "host_ack", "host_nak", "host_alarm")
    @classmethod
    def _single_bytes(cls, v: str) -> str:
        """These are bytes on the wire, one per character (write "\\u0006" for ACK)."""
        bad = [c for c in v if ord(c) > 0xFF]
        if bad:
            raise ValueError(
                f"{bad[0]!r} is not a single byte; write bytes as \\u0000-\\u00ff escapes"
            )
        return v

    @field_validator("encoding")
    @classmethod
    def _text_encoding(cls, v: str) -> str:
        import codecs

        try:
            info = codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding '{v[:40]}'") from None
        if not getattr(info, "_is_text_encoding", True):
            raise ValueError(f"'{v[:40]}' is not a text encoding")
        return v


class HidDevice(DeviceBase):
    """A scanner in USB keyboard (HID) mode, read through evdev and grabbed exclusively."""

    driver: Literal["hid"] = Field(description="Keyboard-wedge scanner read through evdev.")
    path: str | None = Field(
        default=None,
        description="Input device path, best a stable /dev/input/by-id/...-event-kbd link.",
    )
    vendor_id: int | None = Field(
        default=None, ge=0, le=0xFFFF, description="USB vendor id (write it as 0x05e0)."
    )
    product_id: int | None = Field(
        default=None, ge=0, le=0xFFFF, description="USB product id; needs vendor_id."
    )
    serial: str | None = Field(
        default=None,
        min_length=1,
        description="USB serial number (evdev `uniq`): tells two scanners of one model apart.",
    )
    name_pattern: str | None = Field(
        default=None,
        min_length=1,
        validate_default=True,
        description="Shell-style pattern on the input device name, e.g. '*Bar Code Scanner*'.",
    )
    layout: Literal["us", "jp106"] = Field(
        default="us",
        description="Keyboard layout the SCANNER is set to (its own setting, not the host's).",
    )
    terminators: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HID_TERMINATORS),
        min_length=1,
        description="Keys that end a scan (add KEY_TAB for scanners set to a Tab suffix).",
    )
    gs_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HID_GS_KEYS),
        description="Key combinations that mean GS (0x1D), e.g. 'ctrl+]', 'ctrl+KEY_5', 'KEY_F8'.",
    )
    alt_codes: TomlBool = Field(
        default=True, description="Decode Alt+numpad codes (Alt+0029 = GS) as characters."
    )
    idle_timeout_ms: int = Field(
        default=500,
        ge=20,
        le=60_000,
        description="A scan that stops this long without a terminator is an error, not a record.",
    )
    min_key_rate: float | None = Field(
        default=None,
        gt=0,
        description="Keys per second below which a scan is taken for human typing and rejected.",
    )
    max_length: int = Field(
        default=4096, ge=16, description="A longer scan is an error event, dropped whole."
    )
    hotplug_wait_s: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="With pyudev installed, wait this long for the scanner to be plugged in "
        "before reporting it missing (replug is then picked up at once).",
    )

    @field_validator("product_id")
    @classmethod
    def _product_needs_vendor(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("vendor_id") is None:
            raise ValueError("product_id needs vendor_id")
        return v

    @field_validator("terminators")
    @classmethod
    def _known_keys(cls, v: list[str]) -> list[str]:
        from agent.keymap import key_code

        for name in v:
            key_code(name)
        return [name.upper() for name in v]

    @field_validator("gs_keys")
    @classmethod
    def _combos(cls, v: list[str], info: ValidationInfo) -> list[str]:
        from agent.keymap import parse_combo

        for spec in v:
            parse_combo(spec, info.data.get("layout", "us"))
        return v

    @field_validator("name_pattern")
    @classmethod
    def _some_way_to_find_it(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and not any(info.data.get(k) for k in ("path", "vendor_id", "serial")):
            raise ValueError(
                "no way to find the scanner: set path, vendor_id (+ product_id, serial) "
                "or name_pattern"
            )
        return v


class PcscDevice(DeviceBase):
    driver: Literal["pcsc"] = Field(description="IC card reader through pcscd (PC/SC).")
    reader: str = Field(
        default="*",
        min_length=1,
        description="Glob matched against PC/SC reader names; the first match (sorted) is used.",
    )
    read_my_number: TomlBool = Field(
        default=False,
        description="With the PIN, also read the My Number (EF 0001). Off unless the "
        "counter's procedure needs it.",
    )
    store_card_info: TomlBool = Field(
        default=False,
        description="Store the PIN-read card info (name, address, birth date, sex) as an "
        "encrypted record; needs outbox.key_file.",
    )
    operators: dict[str, str] = Field(
        default_factory=dict,
        description="Staff badge UID (lowercase hex) -> operator id; a tap starts or ends "
        "an operator session.",
    )
    operator_timeout_s: float = Field(
        default=1800.0, gt=0, description="An operator session ends after this idle time."
    )
    jpki_anchors: list[str] = Field(
        default_factory=lambda: list(DEFAULT_JPKI_ANCHORS),
        description="SHA-256 fingerprints (hex) of the JPKI user-auth CA certificates a "
        "My Number card's auth certificate must chain to (default: J-LIS 2015 and 2023 CAs).",
    )
    prove_possession: TomlBool = Field(
        default=False,
        description="Offer the possession proof: with the resident's auth PIN the card signs "
        "a station nonce (docs/pcsc.md). For procedures such as benefit payments.",
    )

    @field_validator("jpki_anchors")
    @classmethod
    def _anchors_are_sha256(cls, value: list[str]) -> list[str]:
        out = []
        for fp in value:
            norm = fp.strip().lower().replace(":", "")
            if len(norm) != 64 or any(c not in "0123456789abcdef" for c in norm):
                raise ValueError(f"anchor {fp!r} is not a SHA-256 fingerprint (64 hex digits)")
            out.append(norm)
        return out

    @field_validator("operators")
    @classmethod
    def _uids_are_hex(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for uid, op in value.items():
            norm = uid.strip().lower().replace(" ", "").replace(":", "")
            if not norm or len(norm) % 2 or any(c not in "0123456789abcdef" for c in norm):
                raise ValueError(f"badge UID {uid!r} is not hex bytes (e.g. 01010601cb095703)")
            if not op:
                raise ValueError(f"badge UID {uid!r} maps to an empty operator id")
            out[norm] = op
        return out


class CameraDevice(DeviceBase):
    driver: Literal["camera"] = Field(
        description="Camera: barcodes and QR codes from video, and ID photos."
    )
    source: Literal["picamera2", "v4l2"] = Field(
        description="Frame source: picamera2 (Raspberry Pi camera, libcamera) or v4l2 (USB/UVC)."
    )
    device: str = Field(
        default="/dev/video0",
        description="V4L2 device path for source v4l2, e.g. /dev/v4l/by-id/usb-...-video-index0.",
    )
    camera_index: int = Field(
        default=0, ge=0, description="Which libcamera camera for source picamera2 (0 = first)."
    )
    width: int = Field(
        default=640, ge=64, le=4096, description="Width of the low-resolution decoding stream."
    )
    height: int = Field(
        default=480, ge=64, le=4096, description="Height of the low-resolution decoding stream."
    )
    pixel_format: Literal["YUYV", "MJPG"] = Field(
        default="YUYV",
        description="V4L2 pixel format of the decoding stream (YUYV needs no JPEG decode).",
    )
    fps: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Frames decoded per second; when decoding falls behind, frames are dropped.",
    )
    formats: list[BarcodeFormatName] = Field(
        default_factory=lambda: list(DEFAULT_CAMERA_FORMATS),
        min_length=1,
        description="zxing-cpp barcode formats to look for; fewer formats cost less CPU.",
    )
    try_rotate: TomlBool = Field(
        default=False,
        description="Also look for linear codes (EAN, Code 128) turned by 90/270 degrees; "
        "QR and DataMatrix read at any angle without it. Triples the decode time of noisy "
        "frames (bench/bench_camera.py).",
    )
    try_invert: TomlBool = Field(
        default=False, description="Also look for light-on-dark codes (costs CPU; zxing-cpp)."
    )
    try_downscale: TomlBool = Field(
        default=True, description="Also scan downscaled images, for codes close to the lens."
    )
    gone_after_ms: int = Field(
        default=1000,
        ge=0,
        description="A code in view counts once; it counts again only after it was out of "
        "view this long.",
    )
    still_width: int = Field(
        default=2304, ge=64, le=9152, description="Width of ID photos (still captures)."
    )
    still_height: int = Field(
        default=1296, ge=64, le=6944, description="Height of ID photos (still captures)."
    )
    still_pixel_format: Literal["YUYV", "MJPG"] = Field(
        default="MJPG",
        description="V4L2 pixel format for stills (webcams give high resolutions as MJPG only).",
    )
    jpeg_quality: int = Field(
        default=90, ge=1, le=95, description="JPEG quality of ID photos (Pillow scale, 1-95)."
    )
    frame_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="No frame for this long means the camera is gone (device unavailable).",
    )


DeviceConfig = Annotated[
    SerialDevice | HidDevice | PcscDevice | CameraDevice, Field(discriminator="driver")
]
_DEVICE_ADAPTER: TypeAdapter[DeviceConfig] = TypeAdapter(DeviceConfig)


class DatasetsSection(Strict):
    """Reference datasets from the registry (agent/station/datasets.py, docs/CONTRACT.md)."""

    public_key: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="The central side's Ed25519 dataset public key, 64 hex digits "
        "(`madoguchi registry dataset-keygen` prints it); a dataset signed by any other "
        "key is refused.",
    )
    max_age_s: float = Field(
        default=86_400.0,
        gt=0,
        description="Seconds after its issue time a dataset version is stale: it still "
        "decides verdicts, and every verdict from it says `stale`.",
    )


class Config(Strict):
    agent: AgentSection = Field(description="Who this station is.")
    mqtt: MqttSection = Field(description="The broker.")
    outbox: OutboxSection = Field(default_factory=OutboxSection, description="Local durable store.")
    devices: list[DeviceConfig] = Field(default_factory=list, description="Devices to drive.")
    api: ApiSection | None = Field(
        default=None, description="The kiosk's local HTTP API; off when the section is absent."
    )
    datasets: DatasetsSection | None = Field(
        default=None, description="Reference datasets for verdicts; off when absent."
    )
    source: Path | None = Field(default=None, description="File this was loaded from.")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top)"


#: what pydantic puts before a validator's own message; the technician needs only the message
_LIBRARY_PREFIXES = ("Value error, ", "Assertion failed, ")


def _reason(e: Any) -> str:
    if e["type"] == "extra_forbidden":
        return "unknown key"
    if e["type"] == "missing":
        return "missing (required)"
    msg = str(e["msg"])
    for prefix in _LIBRARY_PREFIXES:
        msg = msg.removeprefix(prefix)
    return msg


def _problems(err: ValidationError, file: str) -> list[str]:
    return [f"{file}: {_loc(tuple(e['loc']))}: {_reason(e)}" for e in err.errors()]


class Reads:
    """Every file a check read (sha256) and every profile path it found absent (None):
    what a cached answer depends on (agent/config.py `load_config_isolated`)."""

    def __init__(self) -> None:
        self.files: list[tuple[str, str | None]] = []

    def read(self, path: Path) -> bytes:
        data = path.read_bytes()
        self.files.append((os.path.abspath(path), hashlib.sha256(data).hexdigest()))
        return data

    def absent(self, path: Path) -> None:
        self.files.append((os.path.abspath(path), None))


def _read_toml(path: Path, reads: Reads | None = None) -> dict[str, Any]:
    try:
        data = (reads or Reads()).read(path)
        return tomllib.loads(decode_text(data, str(path)))
    except FileNotFoundError:
        raise ConfigError([f"{path}: (file): not found"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: (file): not readable (permission denied)"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: (syntax): {e}"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: (file): is a directory, not a file"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: (syntax): nested too deeply"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: (file): {e.strerror}"]) from None


def profile_dirs(config_path: Path, extra: list[Path]) -> list[Path]:
    """Where profiles are looked up, first match wins."""
    return [*extra, config_path.parent / "device_profiles", SYSTEM_PROFILE_DIR, BUNDLED_PROFILE_DIR]


def find_profile(name: str, dirs: list[Path], reads: Reads | None = None) -> Path | None:
    if "/" in name or name.startswith("."):
        return None
    for d in dirs:
        p = d / f"{name}.toml"
        if p.is_file():
            return p
        if reads is not None:
            reads.absent(p)
    return None


def _resolve_device(
    index: int, entry: Any, file: str, dirs: list[Path], reads: Reads
) -> tuple[DeviceConfig | None, list[str]]:
    where = device_key(index, entry)
    if not isinstance(entry, dict):
        return None, [f"{file}: {where}: must be a table"]
    profile_name = entry.get("profile")
    if not isinstance(profile_name, str):
        return None, [f"{file}: {where}.profile: missing (name of a device profile)"]
    profile_path = find_profile(profile_name, dirs, reads)
    if profile_path is None:
        looked = ", ".join(str(d) for d in dirs)
        return None, [f"{file}: {where}.profile: no profile '{profile_name}' in {looked}"]
    try:
        profile = _read_toml(profile_path, reads)
    except ConfigError as bad:
        return None, bad.problems
    merged = {**profile, **entry}
    if "driver" not in merged:
        return None, [f"{profile_path}: driver: missing (which driver runs this model)"]
    try:
        return _DEVICE_ADAPTER.validate_python(merged), []
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(e["loc"])
            if loc and loc[0] == merged["driver"]:
                loc = loc[1:]  # the discriminated union's tag level
            if not loc:
                loc = ("driver",)  # an unknown driver value
            if loc and loc[0] not in entry and loc[0] in profile:
                problems.append(f"{profile_path}: {_loc(loc)}: {_reason(e)}")
            else:
                problems.append(f"{file}: {where}.{_loc(loc)}: {_reason(e)}")
        return None, problems


def device_key(index: int, entry: Any) -> str:
    """`devices["ticket-scanner"]` when the entry has a usable name, else `devices[2]`."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if isinstance(name, str) and name and '"' not in name and name.isprintable():
        return f'devices["{name}"]'
    return f"devices[{index}]"


@dataclass(frozen=True)
class Validated:
    """A checked configuration (agent/config.py's classes) and the files it was read from."""

    config: runtime.Config
    reads: list[tuple[str, str | None]]


def validate_file(path: Path, *, relative_to: Path | None = None) -> Validated:
    """Read, resolve profiles and validate. Raises `ConfigError` listing every problem
    (`agent.config.load_config` documents `relative_to`)."""
    base = path.parent if relative_to is None else relative_to
    reads = Reads()
    raw = _read_toml(path, reads)
    file = str(path)
    problems: list[str] = []
    devices_raw = raw.pop("devices", [])
    if not isinstance(devices_raw, list):
        problems.append(f"{file}: devices: must be an array of tables ([[devices]])")
        devices_raw = []
    extra_dirs = (
        raw.get("agent", {}).get("profile_dirs", []) if isinstance(raw.get("agent"), dict) else []
    )
    if not isinstance(extra_dirs, list):
        extra_dirs = []  # the model reports the wrong type below
    dirs = profile_dirs(
        base / path.name, [base / Path(d) for d in extra_dirs if isinstance(d, str)]
    )
    devices: list[DeviceConfig] = []
    for i, entry in enumerate(devices_raw):
        dev, errs = _resolve_device(i, entry, file, dirs, reads)
        problems += errs
        if dev is not None:
            devices.append(dev)
    seen: dict[str, int] = {}
    for i, entry in enumerate(devices_raw):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            problems.append(
                f"{file}: devices[{i}].name: '{name}' is used twice "
                f"(first at devices[{seen[name]}])"
            )
        else:
            seen[name] = i
    api_raw = raw.get("api")
    manual = api_raw.get("manual_device") if isinstance(api_raw, dict) else None
    if isinstance(manual, str) and manual not in seen:  # other types: the model says so
        problems.append(f"{file}: api.manual_device: no device named '{manual}'")
    try:
        config = Config.model_validate({**raw, "devices": [], "source": path})
    except ValidationError as e:
        problems = _problems(e, file) + problems
        raise ConfigError(problems) from None
    if config.outbox.key_file is None:
        for dev in devices:
            if isinstance(dev, PcscDevice) and dev.store_card_info:
                problems.append(
                    f'{file}: devices["{dev.name}"].store_card_info: personal data needs '
                    "outbox.key_file to encrypt it"
                )
    if config.outbox.registry_public_key is None:
        for dev in devices:
            if isinstance(dev, PcscDevice) and dev.store_card_info:
                problems.append(
                    f'{file}: devices["{dev.name}"].store_card_info: personal data needs '
                    "outbox.registry_public_key to seal it for the registry"
                )
    else:
        from agent.personal_seal import PersonalSealer

        try:  # the key file named, as `keyfile: outbox.registry_public_key: reason`
            PersonalSealer.from_file(config.outbox.registry_public_key)
            reads.read(config.outbox.registry_public_key)
        except ConfigError as e:
            problems += e.problems
        except OSError:
            pass  # read a moment ago: gone now is a miss of the cache, not a problem
    if problems:
        raise ConfigError(problems)
    data_dir = config.agent.data_dir
    if not data_dir.is_absolute():
        data_dir = (base / data_dir).resolve()
    checked = config.model_copy(
        update={
            "devices": devices,
            "agent": config.agent.model_copy(update={"data_dir": data_dir}),
        }
    )
    return Validated(to_runtime(checked), reads.files)


def to_runtime(value: Any) -> Any:
    """A validated model as its agent/config.py twin (same class name, same fields)."""
    if isinstance(value, BaseModel):
        cls = runtime.CLASSES[type(value).__name__]
        return cls(**{k: to_runtime(getattr(value, k)) for k in type(value).model_fields})
    if isinstance(value, list):
        return [to_runtime(v) for v in value]
    if isinstance(value, dict):
        return {k: to_runtime(v) for k, v in value.items()}
    return value


_D = TypeVar("_D", bound=runtime.DeviceBase)


def validate_device(data: dict[str, Any], kind: type[_D]) -> _D:
    """One `[[devices]]` table (profile keys merged in) checked and converted to `kind`: for
    tools and tests that build a device without a file. Raises pydantic's ValidationError
    (and TypeError when the table's driver is not `kind`'s)."""
    out = to_runtime(_DEVICE_ADAPTER.validate_python(data))
    if not isinstance(out, kind):
        raise TypeError(f"driver {data.get('driver')!r} makes a {type(out).__name__}")
    return out


def validate_section(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """One section (e.g. `ApiSection`, `{"max_connections": 4}`) checked and converted."""
    return to_runtime(model.model_validate(data))


def child_main() -> None:
    """`load_config_isolated`'s child: argv is the file (and relative_to); stdout is one
    JSON object: the configuration and what it was read from, or the problems."""
    path = Path(sys.argv[1])
    relative_to = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    try:
        done = validate_file(path, relative_to=relative_to)
    except ConfigError as e:
        answer: dict[str, Any] = {"problems": e.problems}
    else:
        answer = {"config": runtime.encode(done.config), "inputs": done.reads}
    sys.stdout.write(json.dumps(answer))


def reference_markdown() -> str:
    """docs/configuration.md, written from the models so the reference cannot drift."""
    sections: list[tuple[str, type[BaseModel], str]] = [
        ("[agent]", AgentSection, "Who this station is; its names are MQTT topic levels."),
        ("[mqtt]", MqttSection, "The broker the uplink talks to."),
        ("[outbox]", OutboxSection, "The local SQLite outbox: where a record is durable."),
        ("[api]", ApiSection, "The kiosk's local HTTP API (optional, loopback only)."),
        (
            "[[devices]] common keys",
            DeviceBase,
            "Every device: `name`, `profile`, and any key of its driver below, "
            "set in the profile or overridden here.",
        ),
        ('driver = "serial"', SerialDevice, "Scanner in USB-COM / RS-232 mode (pyserial)."),
        ('driver = "hid"', HidDevice, "Scanner in USB keyboard mode (evdev), see docs/hid.md."),
        ('driver = "pcsc"', PcscDevice, "IC card reader through pcscd, see docs/pcsc.md."),
        ('driver = "camera"', CameraDevice, "Camera for codes and ID photos, docs/camera.md."),
        ("[datasets]", DatasetsSection, "Signed reference datasets from the registry (optional)."),
    ]
    base = set(DeviceBase.model_fields)
    out = [
        "# Configuration reference",
        "",
        "Generated by `reference_markdown()` in `agent/config_schema.py`; "
        "`tests/station/test_config.py` keeps this file equal to it.",
        "",
        "The agent reads one TOML file (`madoguchi run --config PATH`, on a Pi "
        "`/etc/madoguchi/agent.toml`). Every `[[devices]]` entry names a `profile`: "
        "`device_profiles/<profile>.toml` beside the config, in "
        "`/etc/madoguchi/device_profiles/` or bundled with the agent. A profile holds "
        "`driver` and that driver's keys; any of them can be overridden on the "
        "`[[devices]]` entry. Unknown keys are errors. `madoguchi check-config PATH` "
        "prints every problem as `file: key: reason` and exits 1, without opening a device.",
    ]
    for title, model, blurb in sections:
        out += ["", f"## {title}", "", blurb, "", "| key | type | default | meaning |"]
        out.append("|---|---|---|---|")
        for key, field in model.model_fields.items():
            if model is not DeviceBase and issubclass(model, DeviceBase) and key in base:
                continue
            if key == "driver":
                continue
            out.append(field_row(key, field))
    return "\n".join(out) + "\n"
