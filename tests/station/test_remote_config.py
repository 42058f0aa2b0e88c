"""cmd/config on the station, without a broker: what is refused, what is written, and
the recoveries a restart makes (agent/station/remote_config.py). Fast; the end-to-end
runs are in tests/system/test_fleet_config.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agent.config import BUNDLED_PROFILE_DIR, load_config
from agent.station.remote_config import (
    RemoteConfig,
    load_or_roll_back,
    previous_path,
    roll_back,
    sha256_hex,
    state_path,
)
from agent.testing import FakeClocks


def agent_toml(tmp: Path, *, name: str = "station-01", port: int = 1883) -> str:
    return f"""
[agent]
site = "site-a"
name = "{name}"
data_dir = "{tmp / "data"}"
config_rollback_after_s = 30

[mqtt]
host = "localhost"
port = {port}
"""


def body(text: str, revision: str = "r1") -> dict[str, Any]:
    return {"toml": text, "revision": revision, "sha256": sha256_hex(text)}


def remote(tmp: Path) -> tuple[RemoteConfig, Path, str]:
    path = tmp / "agent.toml"
    path.write_text(text := agent_toml(tmp))
    return RemoteConfig(load_config(path)), path, text


async def test_a_wrong_sha256_or_a_rename_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    rc, path, original = remote(tmp_path)
    new = agent_toml(tmp_path, port=1884)
    got = await rc.command({**body(new), "sha256": sha256_hex(new + " ")})
    assert got == {"ok": False, "revision": "r1", "error": "sha256 does not match the text"}
    got = await rc.command(body(agent_toml(tmp_path, name="station-02")))
    assert got["ok"] is False and len(got["problems"]) == 1
    assert "site-a/station-02 is not this station (site-a/station-01)" in got["problems"][0]
    assert path.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]


async def test_an_applied_revision_is_kept_on_trial_and_a_second_push_is_refused(
    tmp_path: Path,
) -> None:
    rc, path, original = remote(tmp_path)
    new = agent_toml(tmp_path, port=1884)
    got = await rc.command(body(new, "r1"))
    assert got == {"applied": True, "revision": "r1", "rollback_after_s": 30.0}
    assert path.read_text() == new and previous_path(path).read_text() == original
    state = json.loads(state_path(path).read_text())
    assert (state["revision"], state["state"], state["sha256"]) == (
        "r1",
        "applied",
        sha256_hex(new),
    )
    assert rc.describe() == {"config_revision": "r1", "config_state": "applied"}
    again = await rc.command(body(agent_toml(tmp_path, port=1885), "r2"))
    assert again["ok"] is False and "revision r1 is still on trial" in again["error"]
    assert path.read_text() == new and previous_path(path).read_text() == original


async def test_an_interrupted_apply_is_rolled_back_at_the_next_start(tmp_path: Path) -> None:
    rc, path, original = remote(tmp_path)
    await rc.command(body(agent_toml(tmp_path, port=1884), "r1"))
    path.write_text(original)  # as if the rename had not happened (power cut)
    again = RemoteConfig(load_config(path))
    assert again.describe()["config_rolled_back"]["reason"] == "the apply was interrupted"
    assert again.describe()["config_revision"] is None
    assert not again.on_trial


async def test_a_revision_on_trial_that_no_longer_loads_is_rolled_back_at_start(
    tmp_path: Path,
) -> None:
    rc, path, original = remote(tmp_path)
    ca = tmp_path / "x"
    new = agent_toml(tmp_path).replace("[mqtt]\n", f'[mqtt]\ntls_ca = "{ca}"\n')
    (tmp_path / "x").write_text("-----BEGIN CERTIFICATE-----\n")
    assert (await rc.command(body(new, "r1")))["applied"] is True
    ca.unlink()  # a file it names is gone before the restart
    config, problems = load_or_roll_back(path)
    assert problems == [] and config is not None and config.mqtt.tls_ca is None
    assert path.read_text() == original
    state = json.loads(state_path(path).read_text())
    assert state["state"] == "rolled_back" and "mqtt.tls_ca" in state["reason"]
    # a revision no longer on trial is never acted on again
    assert load_or_roll_back(path)[1] == [] and path.read_text() == original


async def test_a_file_that_cannot_be_written_is_an_answer_not_a_fault(tmp_path: Path) -> None:
    """(A read-only /etc/madoguchi, a full disk: here, a directory where the temp goes.)"""
    rc, path, original = remote(tmp_path)
    blocker = tmp_path / ".agent.toml.candidate.tmp"
    blocker.mkdir()
    (blocker / "x").write_text("")
    got = await rc.command(body(agent_toml(tmp_path, port=1884), "r1"))
    assert got["ok"] is False and got["error"].startswith("nothing applied: ")
    assert ".agent.toml.candidate.tmp" in got["error"]
    assert path.read_text() == original and not rc.on_trial
    assert not state_path(path).exists()


async def test_a_symlinked_agent_toml_is_written_through_and_checked_where_it_runs(
    tmp_path: Path,
) -> None:
    """The shipped install: /etc/madoguchi/agent.toml -> ../../var/lib/madoguchi/config/
    agent.toml (provisioning/install.sh), /etc read-only to the service. Everything is
    written beside the target; a profile in the link's directory (station-local
    device_profiles) is found when the candidate is checked, as it will be at the restart."""
    etc, state_dir = tmp_path / "etc", tmp_path / "state"
    (etc / "device_profiles").mkdir(parents=True)
    state_dir.mkdir()
    (etc / "device_profiles" / "desk-scanner.toml").write_bytes(
        (BUNDLED_PROFILE_DIR / "generic-serial-scanner.toml").read_bytes()
    )
    (state_dir / "agent.toml").write_text(original := agent_toml(tmp_path))
    link = etc / "agent.toml"
    link.symlink_to(Path("..") / "state" / "agent.toml")
    before = sorted(p.name for p in etc.iterdir())
    rc = RemoteConfig(load_config(link))
    new = agent_toml(tmp_path, port=1884) + (
        '\n[[devices]]\nname = "desk"\nprofile = "desk-scanner"\nport = "/dev/ttyACM0"\n'
    )
    got = await rc.command(body(new, "r1"))
    assert got.get("applied") is True, got
    assert sorted(p.name for p in etc.iterdir()) == before  # nothing written in /etc
    assert link.is_symlink() and link.read_text() == new
    assert previous_path(link) == state_dir / "agent.toml.previous"
    assert previous_path(link).read_text() == original
    assert json.loads(state_path(link).read_text())["state"] == "applied"
    config, problems = load_or_roll_back(link)
    assert problems == [] and config is not None and config.devices[0].name == "desk"
    rolled = await asyncio.to_thread(roll_back, link, "broker not reached")
    assert rolled["state"] == "rolled_back"
    assert link.is_symlink() and link.read_text() == original
    assert sorted(p.name for p in etc.iterdir()) == before


class NoBroker:
    """What the trial reads of an uplink that never connects."""

    def __init__(self) -> None:
        self.progress = asyncio.Event()
        self.connected = False
        self.acks_received = 0
        self.last_error = "[Errno 111] Connection refused"

    def republish_status(self) -> None:
        raise AssertionError("never confirmed")


async def test_the_trial_ends_on_time_whatever_ntp_does_to_the_wall_clock(
    tmp_path: Path,
) -> None:
    """The trial counts on the boot's clock: a wall clock stepped back an hour (a Pi
    without RTC, NTP after boot) neither postpones the rollback nor, restarted, gives the
    revision a new trial. Counted on the wall clock it waited an hour more."""
    path = tmp_path / "agent.toml"
    path.write_text(original := agent_toml(tmp_path))
    clocks = FakeClocks()
    rc = RemoteConfig(load_config(path), clocks=clocks)
    assert (await rc.command(body(agent_toml(tmp_path, port=1884), "r1")))["applied"]
    clocks.advance(29.8)  # the process restarted with the new file, 0.2 s of trial left
    clocks.step_wall(-3600)
    again = RemoteConfig(load_config(path), clocks=clocks)
    assert again.on_trial
    restarts: list[str] = []
    again.restart = restarts.append
    async with asyncio.timeout(5):
        await again.guard(NoBroker())  # type: ignore[arg-type]
    assert restarts == ["configuration revision r1 rolled back"]
    assert path.read_text() == original
    state = json.loads(state_path(path).read_text())
    assert state["state"] == "rolled_back" and "Connection refused" in state["reason"]
