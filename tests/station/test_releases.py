"""The A/B releases directory (agent/station/releases.py): verify, install, switch,
confirm, roll back; never in place."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from agent.errors import ReleaseRefused
from agent.station.releases import Releases, verify
from agent.testing import FakeClocks
from tests.support import releases


@pytest.fixture
def rel(tmp_path: Path) -> tuple[Releases, FakeClocks]:
    clock = FakeClocks()
    r = Releases(tmp_path / "releases", clocks=clock)
    releases.tree(r.root / "1.0", releases.healthy("1.0"))
    r.point("1.0")
    return r, clock


def test_wrong_key_and_tampering_are_refused(tmp_path: Path) -> None:
    key, pub = releases.keypair(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_pub = releases.keypair(tmp_path / "other")
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"))
    manifest = releases.signed(key, b, "1.1")
    assert verify(manifest, pub).version == "1.1"
    with pytest.raises(ReleaseRefused, match="signature does not verify"):
        verify(manifest, other_pub)
    with pytest.raises(ReleaseRefused, match="signature does not verify"):
        verify({**manifest, "min_config_schema": 0}, pub)


def test_install_beside_switch_confirm(rel: tuple[Releases, FakeClocks], tmp_path: Path) -> None:
    r, clock = rel
    key, pub = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"))
    m = verify(releases.signed(key, b, "1.1"), pub)
    before = (r.root / "1.0" / "bin" / "madoguchi").read_bytes()
    dest = r.install(m, b)
    assert dest == r.root / "1.1" and os.access(dest / "bin" / "madoguchi", os.X_OK)
    assert (r.root / "1.0" / "bin" / "madoguchi").read_bytes() == before  # not in place
    assert r.current() == "1.0"  # installing does not switch
    s = r.switch("1.1", 30)
    assert (s.previous, s.to, s.state) == ("1.0", "1.1", "switched")
    assert r.current() == "1.1"
    clock.advance(10)
    assert r.confirm("1.1")
    assert r.rollback_if_overdue() is None
    clock.advance(100)
    assert r.rollback_if_overdue() is None  # confirmed: stays
    assert r.current() == "1.1"


def test_an_unconfirmed_switch_past_its_deadline_flips_back(
    rel: tuple[Releases, FakeClocks], tmp_path: Path
) -> None:
    r, clock = rel
    releases.tree(r.root / "1.1", releases.healthy("1.1"))
    r.switch("1.1", 30)
    clock.advance(29)
    assert r.rollback_if_overdue() is None
    clock.advance(2)
    assert not r.confirm("1.1")  # too late to confirm
    s = r.rollback_if_overdue()
    assert s is not None and s.state == "rolled_back" and "deadline" in (s.reason or "")
    assert r.current() == "1.0"
    assert r.rollback_if_overdue() is None  # once: no flapping on every start


def test_the_health_check_deadline_is_kept_whatever_ntp_does_and_across_a_reboot(
    rel: tuple[Releases, FakeClocks],
) -> None:
    """Counted on the boot's clock: a wall clock stepped back a day (a Pi without RTC)
    does not postpone the rollback, one stepped forward does not bring it early; after a
    reboot the wall clock counts, never for more than the whole deadline."""
    r, clock = rel
    releases.tree(r.root / "1.1", releases.healthy("1.1"))
    r.switch("1.1", 30)
    clock.step_wall(+3600)
    assert r.rollback_if_overdue() is None
    clock.advance(29)
    clock.step_wall(-86_400 - 3600)
    assert r.rollback_if_overdue() is None
    s = r.switch_state()
    assert s is not None and s.left(clock) == pytest.approx(1)
    clock.reboot(wall_step=-86_400)  # booted a day in the past: a whole deadline again
    assert r.switch_state() is not None and r.switch_state().left(clock) == 30  # type: ignore[union-attr]
    clock.reboot(wall_step=86_400 * 2 + 40)
    assert r.rollback_if_overdue() is not None and r.current() == "1.0"


def test_a_bundle_that_differs_from_its_manifest_is_not_installed(
    rel: tuple[Releases, FakeClocks], tmp_path: Path
) -> None:
    r, _ = rel
    key, pub = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"))
    m = verify(releases.signed(key, b, "1.1"), pub)
    other = releases.bundle(tmp_path / "x", "1.1", releases.broken("1.1"))
    with pytest.raises(ReleaseRefused, match="sha256"):
        r.install(m, other)
    assert not (r.root / "1.1").exists()


def test_an_irreversible_outbox_schema_is_refused(
    rel: tuple[Releases, FakeClocks], tmp_path: Path
) -> None:
    r, _ = rel
    key, pub = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "2.0", releases.healthy("2.0"))
    m = verify(releases.signed(key, b, "2.0", outbox_schema=2), pub)
    with pytest.raises(ReleaseRefused, match="cannot go back from"):
        r.install(m, b)
    assert not (r.root / "2.0").exists()


def test_a_download_resumes_and_refuses_wrong_chunks(tmp_path: Path) -> None:
    """The bundle in chunks (agent/contract/releases.py): each chunk at its offset, the
    indices held survive a new Download of the same release (a restart, an offer again)."""
    from agent.contract.blobs import CHUNK_BYTES
    from agent.contract.releases import check_bundle
    from agent.station.releases import Download

    key, pub = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"), pad_bytes=500_000)
    m = verify(releases.signed(key, b, "1.1"), pub)
    data = b.read_bytes()
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    assert len(chunks) >= 3
    d = Download(tmp_path / "releases", m)
    assert d.missing() == list(range(len(chunks)))
    assert not d.put(0, chunks[0][:-1])  # the wrong length for chunk 0
    assert not d.put(len(chunks), b"x")  # no such chunk
    assert d.put(1, chunks[1]) and not d.put(1, chunks[1])  # once
    again = Download(tmp_path / "releases", m)  # as after a restart
    assert again.missing() == [i for i in range(len(chunks)) if i != 1]
    for i in again.missing():
        assert again.put(i, chunks[i])
    assert again.complete.is_set()
    with again.path.open("rb") as f:
        assert check_bundle(m, f) == []


def test_a_wheelhouse_pip_cannot_install_leaves_no_half_release(
    rel: tuple[Releases, FakeClocks], tmp_path: Path
) -> None:
    """A `make bundle`-shaped tarball whose madoguchi wheel is not a wheel: the venv is
    built where it will run (a venv cannot move), pip fails, and what was built is gone;
    the refusal names pip and what it said. The running release is untouched."""
    r, _ = rel
    src = tmp_path / "madoguchi-bundle-1.2"
    (src / "wheels" / "x86_64").mkdir(parents=True)
    (src / "wheels" / "x86_64" / "madoguchi-1.2-py3-none-any.whl").write_bytes(b"not a zip")
    b = tmp_path / "madoguchi-bundle-1.2.tar.gz"
    with tarfile.open(b, "w:gz") as t:
        t.add(src, arcname=src.name)
    key, pub = releases.keypair(tmp_path)
    m = verify(releases.signed(key, b, "1.2"), pub)
    with pytest.raises(ReleaseRefused, match="pip install: ") as e:
        r.install(m, b)
    assert e.value.version == "1.2" and str(e.value).startswith("release 1.2: pip install: ")
    assert not (r.root / "1.2").exists() and not r.installed("1.2")
    assert r.current() == "1.0" and r.installed("1.0")
    assert [p.name for p in r.root.iterdir() if p.name.startswith(".")] == []
