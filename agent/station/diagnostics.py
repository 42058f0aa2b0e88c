"""What `cmd/diagnostics` adds about the Pi itself, and the client certificate's age
(issue #22, points 4 and 5).

Everything here is read-only and cheap, and says "not available" instead of failing:
a diagnostics answer that errors on a laptop or in a container helps nobody.
Temperature and throttling come from `vcgencmd` on Raspberry Pi OS, otherwise from
/sys/class/thermal (no throttling state there). The certificate is read once with
`cryptography`; its lifetime used is computed at each look, and a change of state
(ok -> expiring -> expired) is logged once and becomes one telemetry alert.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.station.clock import read_timex, synced

log = logging.getLogger(__name__)

NOT_AVAILABLE = "not available"
LIBRARIES = ("madoguchi", "aiomqtt", "paho-mqtt", "pydantic", "cryptography", "pyserial")
THERMAL = Path("/sys/class/thermal")
VCGENCMD_TIMEOUT_S = 2.0
WARN_FROM = 0.9  # alert from 90 % of the certificate's lifetime

# vcgencmd get_throttled bits (Raspberry Pi documentation)
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}


def dist_version(dist: str) -> str | None:
    """`importlib.metadata.version` without carrying importlib.metadata (with email,
    zipfile and csv, 1.6 MB of a Pi's memory: issue #18): the version in the name of
    the first `<name>-<version>.dist-info` on sys.path, as the wheel spec writes it;
    importlib.metadata only for an install it does not find that way (an egg)."""
    want = re.sub(r"[-_.]+", "_", dist).lower()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                project, _, ver = name.removesuffix(".dist-info").partition("-")
                if ver and re.sub(r"[-_.]+", "_", project).lower() == want:
                    return ver
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in LIBRARIES:
        out[dist] = dist_version(dist)
    return out


def agent_version() -> str | None:
    """madoguchi's installed version (None when run from a tree that is not installed)."""
    return dist_version("madoguchi")


def disk(data_dir: Path) -> dict[str, Any]:
    try:
        st = os.statvfs(data_dir)  # shutil.disk_usage's figures, without shutil
    except OSError as e:
        return {"path": str(data_dir), "error": f"{data_dir}: {e.strerror or e}"}
    return {
        "path": str(data_dir),
        "free_bytes": st.f_bavail * st.f_frsize,
        "total_bytes": st.f_blocks * st.f_frsize,
    }


def _which(command: str) -> str | None:
    """`shutil.which` for a bare command name, without shutil (0.7 MB with bz2 and lzma)."""
    for d in os.get_exec_path():
        path = os.path.join(d, command)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _vcgencmd(*args: str) -> str | None:
    exe = _which("vcgencmd")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=VCGENCMD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def parse_vcgencmd_temp(text: str) -> float | None:
    """`temp=48.3'C` -> 48.3."""
    _, _, rest = text.partition("=")
    try:
        return float(rest.split("'")[0])
    except ValueError:
        return None


def parse_throttled(text: str) -> dict[str, Any] | None:
    """`throttled=0x50005` -> the raw value and the names of the bits set."""
    _, _, rest = text.partition("=")
    try:
        value = int(rest.strip(), 16)
    except ValueError:
        return None
    return {"raw": hex(value), "flags": [n for b, n in THROTTLE_BITS.items() if value >> b & 1]}


def thermal(run: Callable[..., str | None] = _vcgencmd, root: Path = THERMAL) -> dict[str, Any]:
    """CPU temperature and throttling: vcgencmd, else the kernel's thermal zones."""
    temp = run("measure_temp")
    throttled = run("get_throttled")
    if temp is not None:
        return {
            "source": "vcgencmd",
            "temperature_c": parse_vcgencmd_temp(temp),
            "throttled": (parse_throttled(throttled) if throttled else None) or NOT_AVAILABLE,
        }
    try:
        zone = min(root.glob("thermal_zone*/temp"))
        millis = int(zone.read_text().strip())
    except (ValueError, OSError):
        return {"source": NOT_AVAILABLE, "temperature_c": NOT_AVAILABLE, "throttled": NOT_AVAILABLE}
    return {"source": str(zone), "temperature_c": millis / 1000, "throttled": NOT_AVAILABLE}


def clock() -> dict[str, Any]:
    """What the kernel's adjtimex says: synchronized, estimated error, offset. The kernel
    does not name the NTP daemon; the source is the kernel discipline it reports."""
    got = read_timex()
    if got is None:
        return {"source": NOT_AVAILABLE, "synced": None}
    state, tx = got
    nano = bool(tx.status & 0x2000)  # STA_NANO: offset in ns instead of us
    return {
        "source": "kernel adjtimex (NTP discipline)",
        "synced": synced(state, tx.status),
        "offset_s": tx.offset / (1e9 if nano else 1e6),
        "esterror_s": tx.esterror / 1e6,
        "maxerror_s": tx.maxerror / 1e6,
    }


def collect(data_dir: Path) -> dict[str, Any]:
    """The Pi part of a diagnostics answer (blocking: vcgencmd; run it in a thread)."""
    return {
        "versions": versions(),
        "platform": platform.platform(),
        "disk": disk(data_dir),
        "thermal": thermal(),
        "clock": clock(),
    }


class CertWatch:
    """The configured client certificate's validity, and alerts as it ages."""

    def __init__(self, path: Path | None, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = now
        self.not_before: float | None = None
        self.not_after: float | None = None
        self.error: str | None = None
        self._state: str | None = None  # ok / expiring / expired / unreadable, as last seen
        self._alerts: list[dict[str, Any]] = []
        self._mtime: int | None = None
        self._said = False  # a warning about the certificate is standing
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        from cryptography import x509  # only on stations with a client certificate

        self.not_before = self.not_after = None
        try:
            self._mtime = path.stat().st_mtime_ns
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as e:
            self.error = f"{path}: cannot read the certificate: {type(e).__name__}"
            return
        self.error = None
        self.not_before = cert.not_valid_before_utc.timestamp()
        self.not_after = cert.not_valid_after_utc.timestamp()

    def switch(self, path: Path) -> None:
        """Watch another file from now on (a renewed certificate, agent/station/renewal.py)."""
        self.path = path
        self._load(path)

    def _reload_if_replaced(self) -> None:
        """A certificate renewed in place (enroll --install) is read again: one stat."""
        if self.path is None:
            return
        try:
            mtime: int | None = self.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self._mtime:
            self._load(self.path)

    def lifetime_used(self) -> float | None:
        if self.not_before is None or self.not_after is None:
            return None
        span = self.not_after - self.not_before
        if span <= 0:
            return 1.0
        return (self._now() - self.not_before) / span

    def state(self) -> str | None:
        if self.path is None:
            return None
        used = self.lifetime_used()
        if used is None:
            return "unreadable"
        if used >= 1.0:
            return "expired"
        return "expiring" if used >= WARN_FROM else "ok"

    def describe(self) -> dict[str, Any]:
        """The status fields; nothing when no client certificate is configured."""
        self._check()
        if self.path is None:
            return {}
        return self.describe_plain()

    def take_alerts(self) -> list[dict[str, Any]]:
        self._check()
        alerts, self._alerts = self._alerts, []
        return alerts

    def _check(self) -> None:
        """Log and alert once per change of state (not at every telemetry)."""
        self._reload_if_replaced()
        state = self.state()
        if state == self._state:
            return
        self._state = state
        if state in (None, "ok"):
            if state == "ok" and self._said:
                log.info("client certificate %s is valid again", self.path)
            self._said = False
            return
        self._said = True
        info = self.describe_plain()
        if state == "unreadable":
            log.error("%s", self.error)
        else:
            log.warning(
                "client certificate %s %s: %.0f %% of its lifetime used, not after %s",
                self.path,
                "has expired" if state == "expired" else "is expiring",
                100 * (info["cert_lifetime_used"] or 0),
                info["cert_expires_at"],
            )
        self._alerts.append({"type": f"cert_{state}", **info})

    def describe_plain(self) -> dict[str, Any]:
        used = self.lifetime_used()
        return {
            "cert_expires_at": None
            if self.not_after is None
            else datetime.fromtimestamp(self.not_after, UTC).isoformat().replace("+00:00", "Z"),
            "cert_lifetime_used": None if used is None else round(used, 4),
        }
