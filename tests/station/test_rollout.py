"""cmd/update's refusals (agent/station/rollout.py): each one answered with the reason,
nothing installed, nothing switched."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.station.releases import Releases
from agent.station.rollout import Rollout
from agent.testing import write_config
from tests.support import releases


def rollout(tmp_path: Path, pub: str | None) -> Rollout:
    extra = f'releases_dir = "{tmp_path / "releases"}"'
    if pub is not None:
        extra += f'\nrelease_public_key = "{pub}"'
    cfg = write_config(tmp_path, 1883, scanner=tmp_path / "tty", extra_agent=extra)
    return Rollout(load_config(cfg), asyncio.Event())


def offer(tmp_path: Path, key: Path, version: str = "1.1") -> tuple[dict[str, Any], Path]:
    b = releases.bundle(tmp_path, version, releases.healthy(version))
    return releases.signed(key, b, version), b


async def test_refusals_name_their_reason(tmp_path: Path) -> None:
    key, pub = releases.keypair(tmp_path)
    (tmp_path / "other").mkdir()
    other_key, _ = releases.keypair(tmp_path / "other")
    manifest, b = offer(tmp_path, key)
    r = rollout(tmp_path, pub)

    async def answer(body: dict[str, Any]) -> str:
        result = await r.cmd_update(body)
        assert result["ok"] is False and result["state"] == "refused"
        assert r.describe()["release"]["state"] == "refused"
        return str(result["error"])

    assert "absolute path" in await answer({"manifest": manifest, "bundle": "rel/x.tar.gz"})
    forged, _ = offer(tmp_path / "other", other_key)
    assert "does not verify" in await answer({"manifest": forged, "bundle": str(b)})
    assert "does not verify" in await answer({"manifest": {**manifest, "version": "1.2"}})
    irreversible = releases.signed(key, b, "1.1", outbox_schema=7)
    assert "cannot go back from" in await answer({"manifest": irreversible})
    # a switch not confirmed yet: no second one on top of it
    rel = Releases(tmp_path / "releases")
    for v in ("1.0", "1.1"):
        releases.tree(rel.root / v, releases.healthy(v))
    rel.point("1.0")
    rel.switch("1.1", 60)
    (tmp_path / "x").mkdir()
    second, b2 = offer(tmp_path / "x", key, "1.2")
    assert "not confirmed yet" in await answer({"manifest": second, "bundle": str(b2)})
    assert not (rel.root / "1.2").exists()
    assert rel.current() == "1.1"


async def test_a_station_without_a_pinned_key_refuses(tmp_path: Path) -> None:
    key, _ = releases.keypair(tmp_path)
    manifest, b = offer(tmp_path, key)
    result = await rollout(tmp_path, None).cmd_update({"manifest": manifest, "bundle": str(b)})
    assert result == {
        "ok": False,
        "state": "refused",
        "error": "agent.release_public_key is not set on this station",
    }
