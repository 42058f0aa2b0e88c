"""Fake releases for the rollout tests (docs/fleet.md, "The test shortcut").

Installing a whole venv from a `make bundle` tarball takes minutes; a release here is a
venv-like tree whose `bin/madoguchi` is a small shell launcher around this interpreter
(the code under test, with `MADOGUCHI_RELEASE` naming the version), or one that exits 1,
or one that runs the agent with another config (a wrong broker, a wrong topic prefix).
The bundle is a real tarball, signed for real; the station verifies, installs, switches,
health-checks and rolls back for real."""

from __future__ import annotations

import os
import shlex
import sys
import tarfile
from pathlib import Path
from typing import Any

from agent.central.datasets import generate_key, load_key
from agent.central.fleet import sign_release


def healthy(version: str) -> str:
    return f'MADOGUCHI_RELEASE={version} exec {shlex.quote(sys.executable)} -m agent "$@"\n'


def broken(version: str) -> str:
    return f'echo "release {version}: cannot start (simulated)" >&2\nexit 1\n'


def with_config(version: str, config: Path) -> str:
    """The agent, but on `config` (not the one it is given)."""
    py = shlex.quote(sys.executable)
    return (
        f"MADOGUCHI_RELEASE={version} exec {py} -m agent run --config {shlex.quote(str(config))}\n"
    )


def tree(root: Path, body: str) -> Path:
    """A release tree at `root` with `bin/madoguchi` running `body` (sh)."""
    (root / "bin").mkdir(parents=True)
    exe = root / "bin" / "madoguchi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    (root / "VERSION").write_text(root.name + "\n")
    return root


def bundle(directory: Path, version: str, body: str, pad_bytes: int = 0) -> Path:
    """`madoguchi-bundle-{version}.tar.gz` holding `release/` (the test shortcut); with
    `pad_bytes` of random data in it, so that it travels in several chunks."""
    src = tree(directory / f"src-{version}" / "release", body)
    if pad_bytes:
        (src / "padding.bin").write_bytes(os.urandom(pad_bytes))
    out = directory / f"madoguchi-bundle-{version}.tar.gz"
    with tarfile.open(out, "w:gz") as t:
        t.add(src, arcname="release")
    return out


def keypair(directory: Path) -> tuple[Path, str]:
    private = directory / "release.key"
    return private, generate_key(private, directory / "release.pub")


def signed(private: Path, bundle_path: Path, version: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("min_config_schema", 1)
    kw.setdefault("outbox_schema", 1)
    return sign_release(load_key(private), bundle_path, version, **kw)
