"""Configuration as the running station holds it: plain frozen classes, no validator.

The rules live in agent/config_schema.py (pydantic): it reads the TOML, resolves the
device profiles and reports every problem as `file: key: reason`, all at once. A
running agent does not import it: pydantic would cost a Pi about 14 MB for the whole
life of the process (issue #18). `madoguchi run` calls `load_config_isolated`, which
has a child process validate the file and keeps the answer in
`<data_dir>/config-cache.json`, keyed by the hash of every file that check read, so
that a restart after a crash pays no child. `check-config` and the tests call
`load_config`, which validates in this process.

The classes themselves are in agent/config_types.py and re-exported here, where the
station has always imported them from.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config_types import (
    BUNDLED_PROFILE_DIR,
    CLASSES,
    DEFAULT_CAMERA_FORMATS,
    DEFAULT_DATA_DIR,
    DEFAULT_HID_GS_KEYS,
    DEFAULT_HID_TERMINATORS,
    DEFAULT_JPKI_ANCHORS,
    DEVICE_CLASSES,
    DEVICE_NAME_PATTERN,
    NAME_PATTERN,
    PLACEHOLDER_HOST_SUFFIXES,
    PLACEHOLDER_USB_IDS,
    SYSTEM_PROFILE_DIR,
    AgentSection,
    ApiSection,
    BarcodeFormatName,
    CameraDevice,
    Config,
    DatasetsSection,
    DeviceBase,
    DeviceConfig,
    HidDevice,
    MqttSection,
    OutboxSection,
    PcscDevice,
    SerialDevice,
    config_warnings,
    decode,
    decode_text,
    encode,
    is_loopback,
    split_broker,
)
from agent.errors import ConfigError

__all__ = [
    "BUNDLED_PROFILE_DIR",
    "CACHE_NAME",
    "CLASSES",
    "DEFAULT_CAMERA_FORMATS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_HID_GS_KEYS",
    "DEFAULT_HID_TERMINATORS",
    "DEFAULT_JPKI_ANCHORS",
    "DEVICE_CLASSES",
    "DEVICE_NAME_PATTERN",
    "NAME_PATTERN",
    "PLACEHOLDER_HOST_SUFFIXES",
    "PLACEHOLDER_USB_IDS",
    "SYSTEM_PROFILE_DIR",
    "AgentSection",
    "ApiSection",
    "BarcodeFormatName",
    "CameraDevice",
    "Config",
    "DatasetsSection",
    "DeviceBase",
    "DeviceConfig",
    "HidDevice",
    "MqttSection",
    "OutboxSection",
    "PcscDevice",
    "SerialDevice",
    "code_fingerprint",
    "config_warnings",
    "decode",
    "decode_text",
    "encode",
    "is_loopback",
    "load_config",
    "load_config_isolated",
    "split_broker",
]

#: where `load_config_isolated` keeps the validated configuration, inside data_dir
CACHE_NAME = "config-cache.json"
CHILD_TIMEOUT_S = 120.0


# -- loading --------------------------------------------------------------------------------


def load_config(path: str | Path, *, relative_to: Path | None = None) -> Config:
    """Read, resolve profiles and validate in this process (it imports pydantic). Raises
    `ConfigError` listing every problem. For `check-config`, tools and tests; a running
    agent uses `load_config_isolated`.

    Relative paths in the file (profiles, profile_dirs, data_dir) are taken from the
    file's directory, or from `relative_to`: a pushed candidate is checked where it
    will run, not where it is staged (agent/station/remote_config.py)."""
    from agent.config_schema import validate_file

    return validate_file(Path(path), relative_to=relative_to).config


def load_config_isolated(
    path: str | Path, *, relative_to: Path | None = None, cache: bool = True
) -> Config:
    """`load_config`'s answer without pydantic in this process: from the cache when every
    file the last check read is unchanged, else from a child process that validates
    (and the cache is rewritten). Raises `ConfigError` with the child's problems."""
    path = Path(path)
    cache_file = _cache_file(path, relative_to) if cache else None
    if cache_file is not None:
        hit = _read_cache(cache_file, path, relative_to)
        if hit is not None:
            return hit
    answer = _validate_in_child(path, relative_to)
    config = decode(Config, answer["config"], "config")
    if cache_file is not None:
        _write_cache(cache_file, path, relative_to, answer)
    return config


def _validate_in_child(path: Path, relative_to: Path | None) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys\nif {root!r} not in sys.path: sys.path.insert(0, {root!r})\n"
        "from agent.config_schema import child_main\nchild_main()\n"
    )
    argv = [sys.executable, "-c", code, str(path)]
    if relative_to is not None:
        argv.append(str(relative_to))
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError([f"{path}: (file): the configuration check did not run: {e}"]) from None
    try:
        answer = json.loads(out.stdout)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        tail = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(
            [f"{path}: (file): the configuration check failed (exit {out.returncode}): {tail[0]}"]
        ) from None
    problems = answer.get("problems")
    if problems:
        raise ConfigError([str(p) for p in problems])
    return answer


# -- the cache: keyed by every file the check read, and by the code that checked ---------


def _cache_file(path: Path, relative_to: Path | None) -> Path | None:
    """<data_dir>/config-cache.json, data_dir read from the raw TOML (a wrong guess is only
    a miss: the cache names the file and the hashes it was made from)."""
    import tomllib

    base = path.parent if relative_to is None else relative_to
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):
        return None  # the child says what is wrong with it
    agent = raw.get("agent")
    data_dir = agent.get("data_dir", str(DEFAULT_DATA_DIR)) if isinstance(agent, dict) else None
    if not isinstance(data_dir, str):
        return None
    return base / data_dir / CACHE_NAME


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def code_fingerprint() -> str:
    """What a cached answer depends on besides the files: the code and Python that checked."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(sys.version.encode())
    for name in (
        "config.py",
        "config_types.py",
        "config_schema.py",
        "keymap.py",
        "personal_seal.py",
    ):
        h.update((_sha256(here / name) or "-").encode())
    return h.hexdigest()


def _cache_key(path: Path, relative_to: Path | None) -> dict[str, Any]:
    return {
        "format": 1,
        "code": code_fingerprint(),
        "path": str(path.resolve()),
        "relative_to": None if relative_to is None else str(relative_to.resolve()),
    }


def _read_cache(cache_file: Path, path: Path, relative_to: Path | None) -> Config | None:
    try:
        entry = json.loads(cache_file.read_bytes())
        if not isinstance(entry, dict) or entry.get("key") != _cache_key(path, relative_to):
            return None
        for name, digest in entry["inputs"]:
            p = Path(name)
            if digest is None:
                if p.is_file():
                    return None  # a profile now shadows the one the check found
            elif _sha256(p) != digest:
                return None
        return decode(Config, entry["config"], "config")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a torn or foreign cache is a miss, never an error


def _write_cache(
    cache_file: Path, path: Path, relative_to: Path | None, answer: dict[str, Any]
) -> None:
    """Atomic and best effort: no data_dir yet (a first start) or a read-only one is a miss
    next time, not a failure now."""
    entry = {
        "key": _cache_key(path, relative_to),
        "inputs": answer["inputs"],
        "config": answer["config"],
    }
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, cache_file)
    except OSError:
        tmp.unlink(missing_ok=True)
