"""Remote configuration with rollback: `cmd/config` (issue #22, point 3).

The central side (`madoguchi fleet config push`) sends a whole agent.toml with a
revision id and its sha256. The station

1. checks the sha256, writes the text beside agent.toml as `agent.toml.candidate` and
   validates it with `check_config_file`, the function behind `check-config`: every
   problem goes back in the result and nothing is applied on any of them (nor on a
   configuration that would rename the station: its certificate and topics are its name);
   a symlinked agent.toml (the shipped install: /etc/madoguchi is read-only to the
   service) is written through: every file named here lives beside the link's target;
2. keeps the running file as `agent.toml.previous`, records the attempt in
   `agent.toml.state.json` (state `applied`, when, the deadline), moves the candidate
   over agent.toml (rename: never a half file), and restarts its own loop in the same
   process once the result is published (no systemd needed, and none in tests);
3. with the new file, confirms it as soon as the broker is connected and the registry is
   heard from (an ack, or a registry consumer's retained `online` status on
   `_registry/+/status`, subscribed while on trial): state `confirmed`. If that does not happen
   within `[agent] config_rollback_after_s` of applying, it restores `.previous`, marks
   the attempt `rolled_back` with the reason, and restarts its loop again with the old
   file. The deadline counts from `applied_at` in the state file, so a station that is
   restarted (or loses power) while a revision is on trial still rolls back in time, and
   a confirmed or rolled-back revision is never acted on again at a reboot. Within one
   boot it is counted on CLOCK_BOOTTIME, which NTP never steps (agent/station/trial_clock.py:
   a Pi's clock is stepped at boot, and a step back must not postpone the rollback).

Status and telemetry carry `config_revision` (the revision running), `config_state`
and, after a rollback, `config_rolled_back` {revision, reason, at}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.errors import RemoteConfigError
from agent.station.checks import check_config_file
from agent.station.trial_clock import SYSTEM, Clocks, Stamp, left

if TYPE_CHECKING:
    from agent.station.uplink import Uplink

log = logging.getLogger(__name__)

MAX_REVISION_CHARS = 64


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def real_path(path: Path) -> Path:
    """The file a (possibly symlinked) agent.toml is. A shipped install links
    /etc/madoguchi/agent.toml, which the service sees read-only, to a file in its state
    directory (provisioning/install.sh): every write goes beside the real file."""
    return Path(os.path.realpath(path))


def previous_path(path: Path) -> Path:
    real = real_path(path)
    return real.with_name(real.name + ".previous")


def candidate_path(path: Path) -> Path:
    real = real_path(path)
    return real.with_name(real.name + ".candidate")


def state_path(path: Path) -> Path:
    real = real_path(path)
    return real.with_name(real.name + ".state.json")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Sibling temp file, fsync, rename: the file is the old one or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RemoteConfigError(f"{e.filename or path}: {e.strerror}") from e


def read_state(path: Path) -> dict[str, Any] | None:
    """The last remote configuration attempt for this agent.toml, or None."""
    try:
        state = json.loads(state_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("%s: unreadable, ignored: %s", state_path(path), type(e).__name__)
        return None
    return state if isinstance(state, dict) and "state" in state else None


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(state_path(path), json.dumps(state, indent=1).encode() + b"\n", 0o600)


def roll_back(path: Path, reason: str, now: Callable[[], float] = time.time) -> dict[str, Any]:
    """Restore agent.toml.previous over agent.toml and mark the attempt rolled back."""
    state = read_state(path) or {"revision": None}
    try:
        old = previous_path(path).read_bytes()
    except OSError as e:
        raise RemoteConfigError(
            f"{previous_path(path)}: cannot roll back: {e.strerror}; {path} stays"
        ) from e
    write_atomic(real_path(path), old, 0o600)
    state.update(state="rolled_back", reason=reason[:300], rolled_back_at=now())
    save_state(path, state)
    log.error("configuration revision %s rolled back: %s", state.get("revision"), reason)
    return state


def load_or_roll_back(path: Path) -> tuple[Config | None, list[str]]:
    """`check_config_file` for a start or a restart; a revision on trial that no longer
    loads (a file it names vanished) is rolled back at once and the old one checked."""
    config, problems, _ = check_config_file(path, isolated=True)
    state = read_state(path)
    if problems and state is not None and state.get("state") == "applied":
        roll_back(path, f"the new configuration does not start: {problems[0]}")
        config, problems, _ = check_config_file(path, isolated=True)
    return (None if problems else config), problems


class RemoteConfig:
    """`cmd/config` and the trial of an applied revision (see the module docstring)."""

    def __init__(self, config: Config, *, clocks: Clocks = SYSTEM) -> None:
        self.config = config
        self.path = config.source
        self.clocks = clocks
        self.state = None if self.path is None else read_state(self.path)
        if self.state is not None and self.state.get("state") == "applied" and self.path:
            # an apply interrupted before the rename: the file is still the old one
            with contextlib.suppress(OSError):
                if sha256_hex(self.path.read_text()) != self.state.get("sha256"):
                    self.state = roll_back(self.path, "the apply was interrupted", self.clocks.wall)
        self.registry_online = False  # a registry consumer's retained status said online
        self._progress: asyncio.Event | None = None  # the uplink's, once guarding
        self.restart: Callable[[str], None] | None = None  # the app's loop restart
        self.after_result: Callable[[Callable[[], None]], None] | None = None

    @property
    def on_trial(self) -> bool:
        return self.state is not None and self.state.get("state") == "applied"

    def describe(self) -> dict[str, Any]:
        st = self.state
        if st is None:
            return {"config_revision": None}
        rolled = st.get("state") == "rolled_back"
        out: dict[str, Any] = {
            "config_revision": st.get("previous_revision") if rolled else st.get("revision"),
            "config_state": st.get("state"),
        }
        if rolled:
            out["config_rolled_back"] = {
                "revision": st.get("revision"),
                "reason": st.get("reason"),
                "at": _iso(float(st.get("rolled_back_at") or 0)),
            }
        return out

    # -- cmd/config ----------------------------------------------------------------

    async def command(self, body: dict[str, Any]) -> dict[str, Any]:
        text, revision, digest = body.get("toml"), body.get("revision"), body.get("sha256")
        if not isinstance(text, str) or not isinstance(digest, str):
            raise ValueError("toml and sha256 must be strings")
        if not isinstance(revision, str) or not 0 < len(revision) <= MAX_REVISION_CHARS:
            raise ValueError(f"revision must be a string of 1 to {MAX_REVISION_CHARS} characters")
        if sha256_hex(text) != digest.lower():
            return {"ok": False, "revision": revision, "error": "sha256 does not match the text"}
        if self.path is None:
            return {
                "ok": False,
                "revision": revision,
                "error": "this station was not started from a file: no remote configuration",
            }
        if self.on_trial:
            assert self.state is not None
            return {
                "ok": False,
                "revision": revision,
                "error": f"revision {self.state.get('revision')} is still on trial; "
                "push again once it is confirmed or rolled back",
            }
        try:
            problems = await asyncio.to_thread(self._validate, text)
            if not problems:
                deadline = await asyncio.to_thread(self._apply, text, revision)
        except RemoteConfigError as e:  # a read-only /etc/madoguchi, a full disk
            return {"ok": False, "revision": revision, "error": f"nothing applied: {e}"}
        if problems:
            return {
                "ok": False,
                "revision": revision,
                "error": f"{len(problems)} problem(s); nothing applied",
                "problems": problems,
            }
        if self.after_result is not None and self.restart is not None:
            restart = self.restart
            self.after_result(lambda: restart(f"configuration revision {revision} applied"))
        return {"applied": True, "revision": revision, "rollback_after_s": deadline}

    def _validate(self, text: str) -> list[str]:
        assert self.path is not None
        candidate = candidate_path(self.path)
        write_atomic(candidate, text.encode(), 0o600)
        # relative profiles and data_dir as the running file sees them
        config, problems, _ = check_config_file(
            candidate, relative_to=self.path.parent, isolated=True
        )
        if config is not None:
            mine = (self.config.agent.site, self.config.agent.name)
            theirs = (config.agent.site, config.agent.name)
            if theirs != mine:
                problems.append(
                    f"{candidate}: agent.site / agent.name: {'/'.join(theirs)} is not this "
                    f"station ({'/'.join(mine)}): its certificate and topics are its name"
                )
        if problems:
            with contextlib.suppress(OSError):
                candidate.unlink()
        return problems

    def _apply(self, text: str, revision: str) -> float:
        """.previous, then the state, then the rename (see the module docstring)."""
        assert self.path is not None
        try:
            current = self.path.read_bytes()
        except OSError as e:
            raise RemoteConfigError(f"{self.path}: {e.strerror}") from e
        write_atomic(previous_path(self.path), current, 0o600)
        deadline = self._deadline_of(
            candidate_path(self.path), self.path.parent
        )  # the new file's own
        running = None if self.state is None else self.describe()["config_revision"]
        before = self.state
        stamp = Stamp.now(self.clocks)
        self.state = {
            "revision": revision,
            "sha256": sha256_hex(text),
            "state": "applied",
            "applied_at": stamp.wall,
            **stamp.as_dict(),  # the boot and its clock: the trial's time, never stepped
            "deadline_s": deadline,
            "previous_revision": running,
        }
        try:
            save_state(self.path, self.state)
            os.replace(candidate_path(self.path), real_path(self.path))
        except (OSError, RemoteConfigError) as e:
            self.state = before  # not on trial: the file is still the old one
            with contextlib.suppress(OSError, RemoteConfigError):
                if before is None:
                    state_path(self.path).unlink()
                else:
                    save_state(self.path, before)
            if isinstance(e, RemoteConfigError):
                raise
            raise RemoteConfigError(f"{self.path}: {e.strerror}") from e
        log.warning(
            "configuration revision %s applied; rolled back unless confirmed within %.0f s",
            revision,
            deadline,
        )
        return deadline

    @staticmethod
    def _deadline_of(candidate: Path, relative_to: Path) -> float:
        config, _, _ = check_config_file(
            candidate, config_only=True, relative_to=relative_to, isolated=True
        )
        assert config is not None  # validated just before
        return config.agent.config_rollback_after_s

    # -- the trial of an applied revision -----------------------------------------

    async def registry_status(self, topic: str, payload: Any) -> bool:
        """`_registry/+/status` (an uplink subscription while on trial): a registry
        consumer online, as seen through the new configuration's broker and prefix."""
        if "/_registry/" not in topic or not topic.endswith("/status"):
            return False
        try:
            body = json.loads(payload)
        except (TypeError, ValueError):
            return True
        if isinstance(body, dict) and body.get("state") == "online":
            self.registry_online = True
            if self._progress is not None:
                self._progress.set()
        return True

    async def guard(self, uplink: Uplink) -> None:
        """Confirm the revision on trial, or roll it back at its deadline and restart."""
        if not self.on_trial or self.path is None:
            return
        assert self.state is not None
        self._progress = uplink.progress
        deadline = float(self.state["deadline_s"])
        since = Stamp.from_dict(float(self.state["applied_at"]), self.state)
        try:
            async with asyncio.timeout(left(since, deadline, self.clocks)):
                await self._until_confirmed(uplink)
        except TimeoutError:
            # no error yet: connected (but no registry), or a first attempt still unanswered
            waiting = "connected, no registry ack" if uplink.connected else "no answer yet"
            reason = (
                f"no broker and registry within {deadline:.0f} s of applying "
                f"(broker {self.config.mqtt.host}:{self.config.mqtt.port}: "
                f"{uplink.last_error or waiting})"
            )
            self.state = await asyncio.to_thread(roll_back, self.path, reason, self.clocks.wall)
            if self.restart is not None:
                self.restart(f"configuration revision {self.state.get('revision')} rolled back")
            return
        self.state["state"] = "confirmed"
        self.state["confirmed_at"] = self.clocks.wall()
        await asyncio.to_thread(save_state, self.path, self.state)
        uplink.republish_status()
        log.info("configuration revision %s confirmed", self.state.get("revision"))

    async def _until_confirmed(self, uplink: Uplink) -> None:
        """Connected, and the registry heard from: an ack, or its retained online status."""
        while True:
            await uplink.progress.wait()
            uplink.progress.clear()
            if uplink.connected and (uplink.acks_received > 0 or self.registry_online):
                return
