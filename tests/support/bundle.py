"""The offline bundle and a pip that sees nothing but what a test gives it.

`make bundle` takes a minute and a half for every platform; the tests build an
x86_64-only bundle once per test run (about 30 s: it downloads from PyPI and builds
evdev and pyscard from their sdists) and share it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_BUNDLE: dict[str, Path] = {}


def isolated_pip_env(**extra: str) -> dict[str, str]:
    """This machine's pip config (find-links, extra indexes, constraints) switched off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}
    return env


def x86_64_bundle(factory: pytest.TempPathFactory) -> Path:
    """dist/madoguchi-bundle-VERSION.tar.gz for x86_64 only, built once per session."""
    if "tar" not in _BUNDLE:
        out = factory.mktemp("bundle")
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "provisioning/bundle.py"),
                "--platforms",
                "x86_64",
                "--out",
                str(out),
                "--debian-packages",
                "pcscd libccid mosquitto-clients python3-venv chromium",
            ],
            capture_output=True,
            text=True,
            check=False,
            env=isolated_pip_env(),
        )
        assert r.returncode == 0, r.stdout + r.stderr
        (tar,) = out.glob("madoguchi-bundle-*.tar.gz")
        _BUNDLE["tar"] = tar
    return _BUNDLE["tar"]
