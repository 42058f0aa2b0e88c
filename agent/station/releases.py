"""A/B releases on a station (docs/fleet.md): verify, install beside, switch, confirm or roll back.

    {releases_dir}/{version}/        one release each (a venv with bin/madoguchi)
    {releases_dir}/current -> V      the symlink systemd (or the supervisor) starts from
    {releases_dir}/switch.json       the last switch: from, to, deadline, state, reason

A switch is *unconfirmed* until the new version passes its health check (READY, broker
connected, first registry ack) and writes `healthy`. Past the deadline an unconfirmed
switch is undone by whoever sees it first: the supervisor (agent/station/supervisor.py),
or the new agent's own start-up (`rollback_if_overdue`). Nothing here touches the data
dir: the outbox stays where it is, whichever version runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract.blobs import CHUNK_BYTES, chunk_count
from agent.contract.messages import MessageError
from agent.contract.releases import (
    ReleaseManifest,
    check_bundle,
    chunk_size,
    parse_manifest,
    refusal,
    valid_version,
)
from agent.errors import ReleaseRefused
from agent.station.trial_clock import SYSTEM, Clocks, Stamp, left

log = logging.getLogger(__name__)

CURRENT = "current"
INCOMPLETE = ".incomplete"  # in a release venv still being built
SWITCH = "switch.json"
#: env marker a release launcher may set; else the installed package's version
VERSION_ENV = "MADOGUCHI_RELEASE"


def running_version() -> str:
    from agent import __version__

    return os.environ.get(VERSION_ENV) or __version__


def verify(manifest: object, public_key_hex: str) -> ReleaseManifest:
    """The manifest parsed and its Ed25519 signature checked against the pinned key."""
    # here, not at the top: a running agent imports cryptography only when it needs it
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        m = parse_manifest(manifest)
    except MessageError as e:
        raise ReleaseRefused("?", str(e)) from None
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    try:
        key.verify(m.signature, m.signed)
    except InvalidSignature:
        raise ReleaseRefused(m.version, "signature does not verify with the pinned key") from None
    return m


@dataclass(frozen=True)
class Switch:
    previous: str | None
    to: str
    deadline: float  # wall clock (time.time()) the switch was due by, for people to read
    state: str
    reason: str | None = None
    at: float = 0.0
    #: the devices connected when the switch was made: the new release must bring them back
    devices: tuple[str, ...] = ()
    #: when the switch was made, with its boot and CLOCK_BOOTTIME: the health check's time
    #: is counted on those (agent/station/trial_clock.py), never on a stepped wall clock
    since: Stamp | None = None
    deadline_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        since = self.since
        stamp = {} if since is None else {"switched_at": since.wall, **since.as_dict()}
        return {
            "from": self.previous,
            "to": self.to,
            "deadline": self.deadline,
            "state": self.state,
            "reason": self.reason,
            "at": self.at,
            "devices": list(self.devices),
            "deadline_s": self.deadline_s,
            **stamp,
        }

    def but(self, state: str, reason: str | None, at: float) -> Switch:
        return dataclasses.replace(self, state=state, reason=reason, at=at)

    def left(self, clocks: Clocks = SYSTEM) -> float:
        """Seconds until the health check is overdue (0: overdue)."""
        if self.since is None or self.deadline_s is None:  # a switch.json of an older release
            return max(0.0, self.deadline - clocks.wall())
        return left(self.since, self.deadline_s, clocks)

    @property
    def unconfirmed(self) -> bool:
        return self.state == "switched"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Releases:
    """The releases directory of one station."""

    def __init__(self, root: Path, clocks: Clocks = SYSTEM) -> None:
        self.root = root
        self.clocks = clocks

    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    def current(self) -> str | None:
        try:
            return os.readlink(self.current_link)
        except OSError:
            return None

    def path(self, version: str) -> Path:
        if not valid_version(version) or version == CURRENT:
            raise ReleaseRefused(version, "not a release version")
        return self.root / version

    def installed(self, version: str) -> bool:
        p = self.path(version)
        return (p / "bin" / "madoguchi").exists() and not (p / INCOMPLETE).exists()

    def point(self, version: str) -> None:
        """`current` -> version, atomically (a new symlink renamed over the old)."""
        tmp = self.root / f".{CURRENT}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(version, tmp)
        os.replace(tmp, self.current_link)

    # -- the switch record -----------------------------------------------------------

    def switch_state(self) -> Switch | None:
        try:
            d = json.loads((self.root / SWITCH).read_bytes())
            since = d.get("switched_at")
            return Switch(
                previous=d["from"],
                to=d["to"],
                deadline=float(d["deadline"]),
                state=d["state"],
                reason=d.get("reason"),
                at=float(d.get("at", 0.0)),
                devices=tuple(str(x) for x in d.get("devices") or ()),
                since=None if since is None else Stamp.from_dict(float(since), d),
                deadline_s=None if d.get("deadline_s") is None else float(d["deadline_s"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("releases: %s unreadable (%s); treated as no switch", self.root / SWITCH, e)
            return None

    def _record(self, s: Switch) -> Switch:
        _write_atomic(self.root / SWITCH, json.dumps(s.as_dict()).encode())
        return s

    def switch(self, version: str, deadline_s: float, devices: list[str] | None = None) -> Switch:
        """Point `current` at an installed `version`, unconfirmed until `confirm`;
        `devices`: those the new release must have connected again to be healthy."""
        if not self.installed(version):
            raise ReleaseRefused(version, f"not installed under {self.root}")
        previous = self.current()
        if previous == version:
            raise ReleaseRefused(version, "already the current release")
        since = Stamp.now(self.clocks)
        now = since.wall
        s = self._record(
            Switch(
                previous,
                version,
                now + deadline_s,
                "switched",
                None,
                now,
                tuple(devices or ()),
                since,
                deadline_s,
            )
        )
        self.point(version)
        log.warning(
            "releases: switched %s -> %s; health check due in %.0f s", previous, version, deadline_s
        )
        return s

    def confirm(self, version: str) -> bool:
        """The health check passed on `version`: the switch stays. False if nothing to confirm."""
        s = self.switch_state()
        if s is None or not s.unconfirmed or s.to != version:
            return False
        if s.left(self.clocks) <= 0:
            return False  # too late: the rollback wins, whoever does it
        self._record(s.but("healthy", None, self.clocks.wall()))
        log.warning("releases: %s healthy; switch confirmed", version)
        return True

    def rollback(self, reason: str) -> Switch | None:
        """Undo an unconfirmed switch: `current` back to the previous release."""
        s = self.switch_state()
        if s is None or not s.unconfirmed:
            return None
        if s.previous is not None:
            self.point(s.previous)
        out = self._record(s.but("rolled_back", reason[:300], self.clocks.wall()))
        log.error("releases: rolled back %s -> %s: %s", s.to, s.previous, reason)
        return out

    def rollback_if_overdue(self) -> Switch | None:
        s = self.switch_state()
        if s is not None and s.unconfirmed and s.left(self.clocks) <= 0:
            return self.rollback(f"health check did not pass within the deadline on {s.to}")
        return None

    # -- install ---------------------------------------------------------------------

    def install(self, m: ReleaseManifest, bundle: Path, python: str = sys.executable) -> Path:
        """Verify `bundle` against the signed manifest, then build `releases/{version}`
        beside the running one (never in place). A bundle holding a ready release tree
        (`release/bin/madoguchi`, the test shortcut, docs/fleet.md) is copied; a
        `make bundle` tarball becomes a new venv installed offline from its wheelhouse."""
        if (why := refusal(m)) is not None:
            raise ReleaseRefused(m.version, why)
        dest = self.path(m.version)
        if self.current() == m.version:
            raise ReleaseRefused(m.version, "is the running release; not installed over")
        try:
            with bundle.open("rb") as f:
                problems = check_bundle(m, f)
        except OSError as e:
            raise ReleaseRefused(m.version, f"{bundle}: {e.strerror}") from None
        if problems:
            raise ReleaseRefused(m.version, "; ".join(problems[:5]))
        # loaded for a release, not carried from the start (tarfile, shutil: issue #18)
        import shutil
        import tarfile
        import tempfile

        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{m.version}.", dir=self.root))
        try:
            with tarfile.open(bundle) as t:
                t.extractall(staging, filter="data")
            tree = staging / "release"
            self._clear(dest)
            if (tree / "bin" / "madoguchi").exists():
                os.replace(tree, dest)
            else:
                # A venv cannot move (its scripts name their interpreter by absolute
                # path), so it is built where it will run, marked incomplete until pip
                # is done: `installed` is false for a half-built one, a retry clears it.
                dest.mkdir()
                (dest / INCOMPLETE).touch()
                try:
                    _venv_from_wheelhouse(staging, dest, python)
                except ReleaseRefused as e:
                    self._clear(dest)
                    raise ReleaseRefused(m.version, e.reason) from None
                except BaseException:
                    self._clear(dest)
                    raise
                (dest / INCOMPLETE).unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    @staticmethod
    def _clear(dest: Path) -> None:
        import shutil

        if dest.is_symlink():  # the base install's own entry (provisioning/install.sh)
            dest.unlink()
        elif dest.exists():
            shutil.rmtree(dest)


def _venv_from_wheelhouse(unpacked: Path, venv: Path, python: str) -> None:
    """A new venv with madoguchi from the bundle's wheels, offline (provisioning/bundle.py)."""
    tops = [p for p in unpacked.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise ReleaseRefused("?", "bundle: not one top directory")
    wheels = [p for p in tops[0].rglob("*.whl")]
    own = [w for w in wheels if w.name.startswith("madoguchi-")]
    if not own:
        raise ReleaseRefused("?", "bundle: no madoguchi wheel")
    # --system-site-packages as the base install: picamera2 and libcamera come from apt
    links = sorted({str(w.parent) for w in wheels})
    pip = [str(venv / "bin" / "pip"), "install", "--no-index", "--quiet"]
    for d in links:
        pip += ["--find-links", d]
    for argv in ([python, "-m", "venv", "--system-site-packages", str(venv)], [*pip, str(own[0])]):
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            said = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            raise ReleaseRefused("?", f"{Path(argv[0]).name} {argv[1]}: {said[:200]}")


class Download:
    """A release bundle arriving in chunks (agent/contract/releases.py): a file written at
    each chunk's offset and the indices held, both under `releases_dir/.incoming`, so an
    offer of the same version again resumes where the last one stopped."""

    def __init__(self, root: Path, m: ReleaseManifest) -> None:
        self.manifest = m
        incoming = root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        stem = f"{m.version}-{m.bundle_sha256[:16]}"
        self.path = incoming / f"{stem}.tar.gz"
        self._have_path = incoming / f"{stem}.have"
        self.chunks = chunk_count(m.bundle_bytes)
        self.have: set[int] = set()
        try:
            self.have = {int(i) for i in json.loads(self._have_path.read_bytes())}
        except (OSError, ValueError, TypeError):
            self.have = set()
        if not self.path.exists():
            self.have = set()
            with self.path.open("wb") as f:
                f.truncate(m.bundle_bytes)
        self.progress = asyncio.Event()  # set at every new chunk
        self.complete = asyncio.Event()
        if not self.missing():
            self.complete.set()

    def missing(self) -> list[int]:
        return [i for i in range(self.chunks) if i not in self.have]

    def put(self, index: int, data: bytes) -> bool:
        """Write chunk `index`; False (ignored) if its index or length is not the manifest's."""
        if index in self.have or len(data) != chunk_size(self.manifest, index) or not data:
            return False
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, index * CHUNK_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.have.add(index)
        _write_atomic(self._have_path, json.dumps(sorted(self.have)).encode())
        self.progress.set()
        if not self.missing():
            self.complete.set()
        return True

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self._have_path.unlink(missing_ok=True)
        self.have = set()
