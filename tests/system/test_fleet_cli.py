"""`madoguchi fleet release-keygen | release sign | update` (agent/cli/fleet.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from agent.central.fleet import canary, parse_share
from agent.cli.main import main
from agent.station.releases import verify
from agent.testing import Broker, Pty, running_station, write_config
from tests.support import releases


def test_keygen_then_sign_writes_a_manifest_the_station_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = tmp_path / "release.key", tmp_path / "release.pub"
    assert main(["fleet", "release-keygen", "--private", str(priv), "--public", str(pub)]) == 0
    assert (priv.stat().st_mode & 0o777) == 0o600
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"))
    assert main(["fleet", "release", "sign", "--key", str(priv), "--version", "1.1", str(b)]) == 0
    out = b.with_name(b.name + ".release.json")
    assert "2 file(s) signed" in capsys.readouterr().out
    manifest = json.loads(out.read_bytes())
    assert verify(manifest, pub.read_text().strip()).files.keys() == {
        "release/bin/madoguchi",
        "release/VERSION",
    }
    # a second keygen never overwrites the key
    assert main(["fleet", "release-keygen", "--private", str(priv), "--public", str(pub)]) == 1


def test_sign_refuses_a_version_that_is_not_a_directory_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"))
    assert main(["fleet", "release", "sign", "--key", str(key), "--version", "../x", str(b)]) == 1
    assert "not one path component" in capsys.readouterr().err


def test_canary_share() -> None:
    names = [f"s{i:02d}" for i in range(40)]
    assert canary(names, parse_share("10%")) == ["s00", "s01", "s02", "s03"]
    assert canary(["b", "a"], parse_share("1%")) == ["a"]  # at least one
    assert canary(names, 1.0) == sorted(names)
    with pytest.raises(ValueError, match="canary"):
        parse_share("150%")


@pytest.mark.broker
async def test_update_reports_a_station_that_refuses(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    """A station with no pinned release key refuses; the command says so and exits 1."""
    key, _ = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"))
    assert main(["fleet", "release", "sign", "--key", str(key), "--version", "1.1", str(b)]) == 0
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    argv = [sys.executable, "-m", "agent", "fleet", "update", "--to", "1.1", "--bundle", str(b)]
    argv += ["--site", "toda-city-hall-1f", "--canary", "50%", "--port", str(broker.port)]
    argv += ["--staged", str(b)]
    async with running_station(cfg):
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, (out, err)
    assert "offering 1.1 to toda-city-hall-1f: station-03" in out.decode(), err
    assert "refused: agent.release_public_key is not set" in out.decode()


@pytest.mark.broker
async def test_update_serves_the_bundle_over_mqtt(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    """The default: the command serves the bundle in chunks; the station installs it
    beside, switches and stops (here nobody restarts it: no supervisor)."""
    key, pub = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"), pad_bytes=450_000)
    assert main(["fleet", "release", "sign", "--key", str(key), "--version", "1.1", str(b)]) == 0
    rel = tmp_path / "releases"
    extra = f'release_public_key = "{pub}"\nreleases_dir = "{rel}"'
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link, extra_agent=extra)
    argv = [sys.executable, "-m", "agent", "fleet", "update", "--to", "1.1", "--bundle", str(b)]
    argv += ["--site", "toda-city-hall-1f", "--agent", "station-03", "--port", str(broker.port)]
    async with running_station(cfg) as station:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        await asyncio.wait_for(station.task, 20)  # it ended itself, to be restarted
    assert proc.returncode == 0, (out, err)
    assert "toda-city-hall-1f/station-03: downloaded, switching" in out.decode()
    assert (rel / "current").readlink() == Path("1.1")
    assert (rel / "1.1" / "release" / "padding.bin").exists() is False  # the tree is the release
    assert (rel / "1.1" / "padding.bin").stat().st_size == 450_000
    assert not list((rel / ".incoming").iterdir())  # the download is cleaned up


async def test_supervise_starts_current_with_the_arguments_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """`madoguchi supervise --releases DIR -- ARGS`: `DIR/current/bin/madoguchi ARGS`,
    started again when it ends; SIGTERM ends both."""
    import signal

    from agent.station.releases import Releases

    rel = Releases(tmp_path / "releases")
    releases.tree(rel.root / "1.0", 'echo "args: $*"\nexec sleep 30\n')
    rel.point("1.0")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "supervise",
        "--releases",
        str(rel.root),
        "--",
        "run",
        "--config",
        "x.toml",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[bytes] = []
    async with asyncio.timeout(20):  # both lines, in either order (two processes)
        while b"args: run --config x.toml\n" not in seen or not any(
            b"started release 1.0" in line for line in seen
        ):
            seen.append(await proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
