"""What `check-config` (and `run`, before it starts) checks beyond the configuration itself.

The schema (agent/config_schema.py) says whether the file is right; these say whether this
host can run it: every file the configuration names exists and is readable (by the
service user, when given), and the Python packages the configured devices need are
installed. Each problem is one line naming the file and key, or the device, so a
technician fixes them all in one pass instead of reading a traceback at the first
start of the service.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import ApiSection, CameraDevice, Config, load_config, load_config_isolated
from agent.errors import ConfigError

#: systemd hands LoadCredential= files to the service here, only while it runs
CREDENTIALS_ROOT = Path("/run/credentials")

#: driver -> (module, extra) pairs the driver imports
DRIVER_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "serial": (("serial", "serial"), ("serial_asyncio_fast", "serial"), ("biip", "interpret")),
    "hid": (("evdev", "hid"), ("biip", "interpret")),
    "pcsc": (("smartcard", "card"), ("stdnum", "card")),
    "camera": (
        ("zxingcpp", "camera"),
        ("numpy", "camera"),
        ("PIL", "camera"),
        ("biip", "interpret"),
    ),
}
API_MODULES = (("starlette", "kiosk"), ("uvicorn", "kiosk"))
PEM_KEYS = frozenset({"mqtt.tls_ca", "mqtt.tls_cert", "mqtt.tls_key"})


@dataclass(frozen=True)
class Checked:
    """The outcome of the host checks: `problems` fail the check, `notes` only inform."""

    problems: list[str]
    notes: list[str]


def referenced_files(config: Config) -> list[tuple[str, Path]]:
    """(key, path) of every file the configuration points at, in file order."""
    out: list[tuple[str, Path]] = []
    mqtt = config.mqtt
    for key, value in (
        ("mqtt.tls_ca", mqtt.tls_ca),
        ("mqtt.tls_cert", mqtt.tls_cert),
        ("mqtt.tls_key", mqtt.tls_key),
        ("mqtt.password_file", mqtt.password_file),
        ("outbox.key_file", config.outbox.key_file),
    ):
        if value is not None:
            out.append((key, value))
    if isinstance(config.api, ApiSection) and config.api.token_file is not None:
        out.append(("api.token_file", config.api.token_file))
    return out


def _user(name: str) -> tuple[int, set[int]]:
    """uid and every gid of a user (primary and supplementary)."""
    pw = pwd.getpwnam(name)
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return pw.pw_uid, gids


def _allows(st: os.stat_result, uid: int, gids: set[int], bits: tuple[int, int, int]) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in gids:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def unreadable_by(path: Path, user: str) -> str | None:
    """Why `user` cannot read `path` (a directory it cannot enter, the file's mode), or None."""
    uid, gids = _user(user)
    path = path.absolute()
    for parent in reversed(path.parents):
        st = parent.stat()
        if not _allows(st, uid, gids, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return f"{user} cannot enter {parent} (mode {stat.filemode(st.st_mode)})"
    st = path.stat()
    if not _allows(st, uid, gids, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
        owner = pwd.getpwuid(st.st_uid).pw_name if _known_uid(st.st_uid) else str(st.st_uid)
        return f"not readable by {user} (mode {stat.filemode(st.st_mode)}, owner {owner})"
    return None


def _known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def check_files(config: Config, user: str | None = None) -> Checked:
    """Every referenced file is there, a regular file, and readable (by `user` if given)."""
    file = str(config.source or "agent.toml")
    problems: list[str] = []
    notes: list[str] = []
    if user is not None:
        try:
            _user(user)
        except KeyError:
            return Checked([f"--user {user}: no such user on this host"], [])
    for key, path in referenced_files(config):  # as the agent opens them (relative: cwd)
        if not path.exists() and CREDENTIALS_ROOT in path.parents:
            notes.append(
                f"{file}: {key}: {path} is a systemd credential (LoadCredential=), "
                "present only while the service runs: not checked"
            )
            continue
        if key == "api.token_file" and not path.exists():
            notes.append(f"{file}: {key}: {path} does not exist yet: the agent creates it")
            continue
        reason = _file_problem(path, user)
        if reason is None and key in PEM_KEYS:
            reason = _not_pem(path)
        if reason is not None:
            problems.append(f"{file}: {key}: {path}: {reason}")
    return Checked(problems, notes)


def _file_problem(path: Path, user: str | None) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "not found"
    except PermissionError:
        return "cannot be looked at (permission denied on a directory above it)"
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if user is not None:
        return unreadable_by(path, user)
    if not os.access(path, os.R_OK):
        return f"not readable (mode {stat.filemode(st.st_mode)})"
    return None


def _not_pem(path: Path) -> str | None:
    """A certificate or key file that is not PEM fails deep in the TLS handshake setup."""
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError:
        return None  # already judged by _file_problem (another user's view)
    if b"-----BEGIN " not in head:
        return "not a PEM file (no -----BEGIN line)"
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_extras(config: Config) -> Checked:
    """The Python packages each configured device (and the kiosk API) needs are installed."""
    file = str(config.source or "agent.toml")
    problems: list[str] = []
    for dev in config.devices:
        needs = list(DRIVER_MODULES.get(dev.driver, ()))
        if isinstance(dev, CameraDevice):
            needs.append(("linuxpy", "camera") if dev.source == "v4l2" else ("picamera2", ""))
        for module, extra in needs:
            if _installed(module):
                continue
            if extra:
                fix = f"install the '{extra}' extra: pip install 'madoguchi[{extra}]'"
            else:  # picamera2 comes from Raspberry Pi OS, not PyPI
                fix = "apt-get install python3-picamera2, venv with --system-site-packages"
            problems.append(
                f'{file}: devices["{dev.name}"]: driver {dev.driver} needs Python module '
                f"'{module}' ({fix})"
            )
    if isinstance(config.api, ApiSection) and config.api.enabled:
        for module, extra in API_MODULES:
            if not _installed(module):
                problems.append(
                    f"{file}: api: the kiosk API needs Python module '{module}' "
                    f"(install the '{extra}' extra: pip install 'madoguchi[{extra}]')"
                )
    return Checked(problems, [])


def check_config_file(
    path: str | Path,
    user: str | None = None,
    *,
    config_only: bool = False,
    relative_to: Path | None = None,
    isolated: bool = False,
) -> tuple[Config | None, list[str], list[str]]:
    """What `check-config` checks, for the CLI and for `cmd/config` alike: the file, then
    (unless `config_only`) the files it names and the extras it needs. Returns
    (config or None, every problem, notes); nothing stops at the first problem.
    `isolated`: validated without pydantic in this process (`run`, `cmd/config`)."""
    try:
        if isolated:
            config = load_config_isolated(path, relative_to=relative_to, cache=relative_to is None)
        else:
            config = load_config(path, relative_to=relative_to)
    except ConfigError as e:
        return None, list(e.problems), []
    if config_only:
        return config, [], []
    files = check_files(config, user)
    return config, files.problems + check_extras(config).problems, files.notes
