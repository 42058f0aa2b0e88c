"""The release manifest (agent/contract/releases.py): shape, tamper detection, refusals."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest

from agent.contract.messages import MessageError
from agent.contract.releases import (
    REVERSIBLE_OUTBOX_SCHEMAS,
    check_bundle,
    parse_manifest,
    refusal,
    signed_bytes,
)
from tests.support import releases


@pytest.fixture
def signed(tmp_path: Path) -> tuple[dict, Path]:  # type: ignore[type-arg]
    key, _ = releases.keypair(tmp_path)
    b = releases.bundle(tmp_path, "1.1", releases.healthy("1.1"))
    return releases.signed(key, b, "1.1"), b


def test_manifest_names_every_file_and_parses(signed: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    manifest, b = signed
    m = parse_manifest(manifest)
    assert m.version == "1.1"
    assert set(m.files) == {"release/bin/madoguchi", "release/VERSION"}
    assert check_bundle(m, io.BytesIO(b.read_bytes())) == []


def test_signature_covers_the_file_list(signed: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    manifest, _ = signed
    tampered = copy.deepcopy(manifest)
    tampered["files"]["release/VERSION"] = "0" * 64
    assert signed_bytes(tampered) != signed_bytes(manifest)


def test_a_changed_member_is_named(signed: tuple[dict, Path], tmp_path: Path) -> None:  # type: ignore[type-arg]
    manifest, _ = signed
    other = releases.bundle(tmp_path / "x", "1.1", releases.broken("1.1"))
    m = parse_manifest(manifest)
    # a different tarball: the whole-bundle digest differs first
    assert check_bundle(m, io.BytesIO(other.read_bytes()))[0].startswith("bundle: sha256")
    # the same bytes as the manifest says, but a member's digest is wrong in the manifest
    fake = copy.deepcopy(manifest)
    fake["bundle_sha256"] = manifest["bundle_sha256"]
    fake["files"]["release/bin/madoguchi"] = "f" * 64
    problems = check_bundle(parse_manifest(fake), io.BytesIO(_bytes(signed)))
    assert problems == ["bundle: 'release/bin/madoguchi': sha256 differs"]


def _bytes(signed: tuple[dict, Path]) -> bytes:  # type: ignore[type-arg]
    return signed[1].read_bytes()


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("version", "../etc", "version"),
        ("bundle_sha256", "xyz", "bundle_sha256"),
        ("outbox_schema", -1, "outbox_schema"),
        ("files", {"/abs": "0" * 64}, "files"),
        ("signature", "AAAA", "signature"),
    ],
)
def test_bad_fields_are_refused_by_name(
    signed: tuple[dict, Path],  # type: ignore[type-arg]
    field: str,
    value: object,
    reason: str,
) -> None:
    manifest = {**signed[0], field: value}
    with pytest.raises(MessageError, match=reason):
        parse_manifest(manifest)


def test_refusals_outbox_schema_and_config_schema(signed: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    m = parse_manifest(signed[0])
    assert refusal(m) is None
    newer = parse_manifest({**signed[0], "outbox_schema": max(REVERSIBLE_OUTBOX_SCHEMAS) + 1})
    assert "cannot go back from" in (refusal(newer) or "")
    config = parse_manifest({**signed[0], "min_config_schema": 99})
    assert "config schema 99" in (refusal(config) or "")
