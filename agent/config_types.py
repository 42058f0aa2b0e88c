"""The configuration as the running station holds it: plain frozen classes, no validator.

agent/config_schema.py (pydantic) checks a file and converts its answer into these;
agent/config.py loads them (in-process, or from a child and its cache). This module is
what both import, so that neither imports the other at the top.
tests/station/test_config_schema.py keeps these classes equal to the schema's, field by
field (name, type, default).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.errors import ConfigError

NAME_PATTERN = r"^[a-z0-9_-]+$"
DEVICE_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
SYSTEM_PROFILE_DIR = Path("/etc/madoguchi/device_profiles")
# In a wheel the profiles are inside the package (setup.py puts them there); in a checkout
# and an editable install they are the top-level device_profiles/ next to agent/.
BUNDLED_PROFILE_DIR = Path(__file__).resolve().parent / "device_profiles"
if not BUNDLED_PROFILE_DIR.is_dir():
    BUNDLED_PROFILE_DIR = BUNDLED_PROFILE_DIR.parent.parent / "device_profiles"
DEFAULT_DATA_DIR = Path("/var/lib/madoguchi")

#: zxing-cpp format names a camera profile may list (checked without importing zxing-cpp).
BarcodeFormatName = Literal[
    "QRCode",
    "MicroQRCode",
    "DataMatrix",
    "EAN13",
    "EAN8",
    "UPCA",
    "UPCE",
    "Code128",
    "Code39",
    "Code93",
    "Codabar",
    "ITF",
    "DataBar",
    "DataBarLtd",
    "DataBarExp",
    "PDF417",
    "Aztec",
]

DEFAULT_CAMERA_FORMATS: tuple[BarcodeFormatName, ...] = ("QRCode", "DataMatrix", "EAN13")
#: J-LIS's JPKI user-authentication CA certificates, 2015 and 2023 (SHA-256)
DEFAULT_JPKI_ANCHORS: tuple[str, ...] = (
    "4dcfc4ca0aaf9fb2a3081b3f0c991c320b3acc008667a341eeaec5af1d58ca7d",
    "64114f29620c24ed2631d46476a040e7ee740d956089c00b036a6a8118c322b5",
)
DEFAULT_HID_TERMINATORS: tuple[str, ...] = ("KEY_ENTER", "KEY_KPENTER")
DEFAULT_HID_GS_KEYS: tuple[str, ...] = ("ctrl+]",)


def split_broker(entry: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` as (host, port); ValueError says why not."""
    text = entry.strip()
    if not text or text != entry:
        raise ValueError(f"{entry!r}: a broker is host or host:port, without spaces")
    host, port_text = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{entry!r}: an IPv6 address is written [address]:port")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r}: after [address] only :port may follow")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"{entry!r}: write an IPv6 address as [address]:port")
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f"{entry!r}: not a host name or address")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: what other hosts cannot reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def decode_text(data: bytes, file: str) -> str:
    """UTF-8, with or without a BOM (Notepad writes one). Anything else is one clear line:
    a file saved the Japanese Windows way (Shift_JIS / CP932) is named as such."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        looks = f" (byte 0x{data[e.start]:02x} at offset {e.start})"
        if _looks_like_shift_jis(data):
            looks = " (it looks like Shift_JIS)"
        raise ConfigError([f"{file}: not UTF-8{looks}: save it as UTF-8"]) from None


def _looks_like_shift_jis(data: bytes) -> bool:
    """CP932 decodes almost any bytes; it is Shift_JIS when that gives Japanese text
    (kana, kanji, full-width forms) and no C1 controls or private-use characters."""
    try:
        text = data.decode("cp932")
    except UnicodeDecodeError:
        return False
    if any("\x80" <= c <= "\x9f" or "\ue000" <= c <= "\uf8ff" for c in text):
        return False
    return any(
        "\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" or "\uff01" <= c <= "\uff9f"
        for c in text
    )


# -- the classes ----------------------------------------------------------------------------
# Field meanings are in the schema (agent/config_schema.py) and docs/configuration.md.


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSection:
    site: str
    name: str
    data_dir: Path = DEFAULT_DATA_DIR
    telemetry_interval_s: float = 30.0
    profile_dirs: list[Path] = field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    remote_photo: bool = False
    config_rollback_after_s: float = 120.0
    cert_renew_at: float = 0.8
    release_public_key: str | None = None
    releases_dir: Path = Path("/opt/madoguchi/releases")
    release_health_deadline_s: float = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSection:
    hosts: list[str] | None = None
    host: str | None = None
    port: int = 1883
    persistent_session: bool = False
    session_expiry_s: int = 86400
    topic_prefix: str = "madoguchi/v1"
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = 30
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    batch_max_records: int = 500
    batch_max_bytes: int = 200000
    publish_timeout_s: float = 10.0
    inflight_messages: int = 8
    inflight_messages_max: int = 32
    backoff_max_s: float = 30.0
    max_inbound_bytes: int = 1048576

    def brokers(self) -> list[tuple[str, int]]:
        """Every broker to try, in order: (host, port)."""
        if self.hosts is not None:
            return [split_broker(h, self.port) for h in self.hosts]
        assert self.host is not None  # the schema makes it so
        return [(self.host, self.port)]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSection:
    max_bytes: int = 2000000000
    resend_after_s: float = 30.0
    retention_days: float = 7.0
    key_file: Path | None = None
    integrity_check_interval_s: float = 600.0
    registry_public_key: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSection:
    """The kiosk's local HTTP API (agent/station/kiosk/). Loopback only unless told otherwise."""

    enabled: bool = True
    host: str = "127.0.0.1"
    allow_remote: bool = False
    port: int = 8765
    token_file: Path | None = None
    allowed_origin: str | None = None
    unix_socket: Path | None = None
    manual_device: str | None = None
    max_body_bytes: int = 16384
    event_buffer: int = 1000
    role: Literal["vaccination", "mynumber", "general"] = "vaccination"
    max_connections: int = 128
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceBase:
    name: str
    profile: str
    description: str = ""
    label: str = ""
    expect: list[str] = field(default_factory=list)
    nak_invalid: bool = False
    repeat_window_s: float = 2.0
    gs_substitute: str | None = None
    usb_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialDevice(DeviceBase):
    driver: Literal["serial"]
    port: str
    baudrate: int = 9600
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    terminator: str = "\r"
    encoding: str = "utf-8"
    max_line_bytes: int = 4096
    host_ack: str = ""
    host_nak: str = ""
    host_alarm: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HidDevice(DeviceBase):
    """A scanner in USB keyboard (HID) mode, read through evdev and grabbed exclusively."""

    driver: Literal["hid"]
    path: str | None = None
    vendor_id: int | None = None
    product_id: int | None = None
    serial: str | None = None
    name_pattern: str | None = None
    layout: Literal["us", "jp106"] = "us"
    terminators: list[str] = field(default_factory=lambda: list(DEFAULT_HID_TERMINATORS))
    gs_keys: list[str] = field(default_factory=lambda: list(DEFAULT_HID_GS_KEYS))
    alt_codes: bool = True
    idle_timeout_ms: int = 500
    min_key_rate: float | None = None
    max_length: int = 4096
    hotplug_wait_s: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PcscDevice(DeviceBase):
    driver: Literal["pcsc"]
    reader: str = "*"
    read_my_number: bool = False
    store_card_info: bool = False
    operators: dict[str, str] = field(default_factory=dict)
    operator_timeout_s: float = 1800.0
    jpki_anchors: list[str] = field(default_factory=lambda: list(DEFAULT_JPKI_ANCHORS))
    prove_possession: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CameraDevice(DeviceBase):
    driver: Literal["camera"]
    source: Literal["picamera2", "v4l2"]
    device: str = "/dev/video0"
    camera_index: int = 0
    width: int = 640
    height: int = 480
    pixel_format: Literal["YUYV", "MJPG"] = "YUYV"
    fps: float = 5.0
    formats: list[BarcodeFormatName] = field(default_factory=lambda: list(DEFAULT_CAMERA_FORMATS))
    try_rotate: bool = False
    try_invert: bool = False
    try_downscale: bool = True
    gone_after_ms: int = 1000
    still_width: int = 2304
    still_height: int = 1296
    still_pixel_format: Literal["YUYV", "MJPG"] = "MJPG"
    jpeg_quality: int = 90
    frame_timeout_s: float = 5.0


DeviceConfig = SerialDevice | HidDevice | PcscDevice | CameraDevice
DEVICE_CLASSES: tuple[type[DeviceBase], ...] = (SerialDevice, HidDevice, PcscDevice, CameraDevice)


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetsSection:
    """Reference datasets from the registry (agent/station/datasets.py, docs/CONTRACT.md)."""

    public_key: str
    max_age_s: float = 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    agent: AgentSection
    mqtt: MqttSection
    outbox: OutboxSection = field(default_factory=OutboxSection)
    devices: list[DeviceConfig] = field(default_factory=list)
    api: ApiSection | None = None
    datasets: DatasetsSection | None = None
    source: Path | None = None

    @property
    def topic_base(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.agent.site}/{self.agent.name}"

    @property
    def outbox_path(self) -> Path:
        return self.agent.data_dir / "outbox.db"

    @property
    def datasets_path(self) -> Path:
        return self.agent.data_dir / "datasets.db"

    def device(self, name: str) -> DeviceConfig:
        for dev in self.devices:
            if dev.name == name:
                return dev
        raise KeyError(name)


#: every class above by name: what the schema's models convert to (config_schema.to_runtime)
CLASSES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        AgentSection,
        MqttSection,
        OutboxSection,
        ApiSection,
        DeviceBase,
        *DEVICE_CLASSES,
        DatasetsSection,
        Config,
    )
}


# -- the wire between the child and this process --------------------------------------------


def encode(value: Any) -> Any:
    """A configuration as JSON values: classes as objects, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


_T = typing.TypeVar("_T")
_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def decode(tp: type[_T], value: Any, where: str) -> _T:
    """`encode`'s inverse, checked against the annotations: ValueError names the key."""
    out: _T = _decode(tp, value, where)
    return out


def _decode(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None and (tp is type(None) or type(None) in args):
        return None
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _decode(members[0], value, where)
        tag = value.get("driver") if isinstance(value, dict) else None
        for m in members:  # the device classes: tagged by `driver`
            if tag in typing.get_args(_hints(m).get("driver")):
                return _decode(m, value, where)
    elif origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
    elif origin is list and isinstance(value, list):
        return [_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {
            _decode(args[0], k, where): _decode(args[1], v, f"{where}.{k}")
            for k, v in value.items()
        }
    elif tp is Path and isinstance(value, str):
        return Path(value)
    elif tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif tp in (int, str, bool) and type(value) is tp:
        return value
    elif isinstance(value, dict) and tp in CLASSES.values():
        hints = _hints(tp)
        if set(value) != set(hints):
            raise ValueError(f"{where}: keys {sorted(set(value) ^ set(hints))} differ")
        return tp(**{k: _decode(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    raise ValueError(f"{where}: {value!r:.60} is not {tp}")


# -- after loading ----------------------------------------------------------------------------

#: values the example configuration ships with; left in place they mean "not filled in"
PLACEHOLDER_USB_IDS = frozenset({"0000:0000", "ffff:ffff"})
PLACEHOLDER_HOST_SUFFIXES = (".example", "example.com", "example.org", "example.net")


def config_warnings(config: Config) -> list[str]:
    """Valid but almost certainly not meant: the example's placeholders left in place."""
    file = str(config.source or "agent.toml")
    out = []
    key = "mqtt.host" if config.mqtt.hosts is None else "mqtt.hosts"
    for name, _ in config.mqtt.brokers():
        if name.lower().rstrip(".").endswith(PLACEHOLDER_HOST_SUFFIXES):
            out.append(
                f"{file}: {key}: warning: '{name}' is a placeholder "
                "(example domain): put the registry broker's name"
            )
    for dev in config.devices:
        if dev.usb_id in PLACEHOLDER_USB_IDS:
            out.append(
                f'{file}: devices["{dev.name}"].usb_id: warning: "{dev.usb_id}" is a '
                "placeholder: put this scanner's vendor:product as lsusb shows it"
            )
    return out
