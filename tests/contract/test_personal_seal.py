"""The personal part sealed to the registry's key (agent/personal_seal.py): round trip,
the documented errors, the envelope parser against hostile input, the key files."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.central.registry import describe_record, mask_identifiers
from agent.errors import ConfigError, PersonalSealError
from agent.personal_seal import (
    MAX_CT_BYTES,
    PersonalOpener,
    PersonalSealer,
    generate_keypair,
    parse_envelope,
)

RID = "01936f6e-7b7a-7cc3-8a1e-5f2b9c3d4e5f"
PERSONAL = {
    "name": "試験 花子",
    "address": "埼玉県戸田市上戸田1-18-1",
    "birth_date": "1985-04-12",
    "my_number": "123456789018",
}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[PersonalSealer, PersonalOpener]:
    generate_keypair(tmp_path / "reg.key", tmp_path / "reg.pub")
    return PersonalSealer.from_file(tmp_path / "reg.pub"), PersonalOpener.from_file(
        tmp_path / "reg.key"
    )


def test_round_trip_and_only_ciphertext_in_the_envelope(
    keys: tuple[PersonalSealer, PersonalOpener],
) -> None:
    sealer, opener = keys
    env = sealer.seal(RID, PERSONAL)
    assert set(env) == {"v", "kid", "epk", "nonce", "ct"}
    assert env["v"] == 1 and env["kid"] == sealer.kid == opener.kid
    text = repr(env).encode()
    for value in PERSONAL.values():
        assert value.encode() not in text
        assert value.encode() not in base64.b64decode(env["ct"])
    assert opener.open(RID, env) == PERSONAL


def test_a_fresh_ephemeral_key_and_nonce_per_record(
    keys: tuple[PersonalSealer, PersonalOpener],
) -> None:
    sealer, _ = keys
    a, b = sealer.seal(RID, PERSONAL), sealer.seal(RID, PERSONAL)
    assert a["epk"] != b["epk"] and a["nonce"] != b["nonce"] and a["ct"] != b["ct"]


def test_another_private_key_cannot_open_it(
    tmp_path: Path, keys: tuple[PersonalSealer, PersonalOpener]
) -> None:
    sealer, _ = keys
    env = sealer.seal(RID, PERSONAL)
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    other = PersonalOpener.from_file(tmp_path / "other.key")
    with pytest.raises(PersonalSealError, match=f"record {RID}: sealed to key {sealer.kid}"):
        other.open(RID, env)
    # even with the key id forged to match, the key agreement gives another key
    with pytest.raises(PersonalSealError, match="does not open"):
        other.open(RID, {**env, "kid": other.kid})


def test_tampered_ciphertext_is_refused(keys: tuple[PersonalSealer, PersonalOpener]) -> None:
    sealer, opener = keys
    env = sealer.seal(RID, PERSONAL)
    ct = bytearray(base64.b64decode(env["ct"]))
    ct[3] ^= 0x01
    with pytest.raises(PersonalSealError, match="does not open"):
        opener.open(RID, {**env, "ct": base64.b64encode(bytes(ct)).decode()})
    epk = bytearray(base64.b64decode(env["epk"]))
    epk[0] ^= 0x80
    with pytest.raises(PersonalSealError, match="does not open"):
        opener.open(RID, {**env, "epk": base64.b64encode(bytes(epk)).decode()})


def test_a_part_moved_to_another_record_is_refused(
    keys: tuple[PersonalSealer, PersonalOpener],
) -> None:
    sealer, opener = keys
    env = sealer.seal(RID, PERSONAL)
    other = "01936f6e-7b7a-7cc3-8a1e-000000000000"
    with pytest.raises(PersonalSealError, match=f"record {other}: personal part does not open"):
        opener.open(other, env)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "personal_sealed.v: must be 1"),
        ({"v": True}, "personal_sealed.v: must be 1"),
        ({"kid": "XYZ"}, "personal_sealed.kid"),
        ({"epk": "@@@"}, "personal_sealed.epk: not base64"),
        ({"nonce": "AB=="}, "personal_sealed.nonce: not canonical base64"),
        ({"epk": base64.b64encode(b"x" * 31).decode()}, "personal_sealed.epk: not 32 bytes"),
        ({"nonce": 12}, "personal_sealed.nonce: not a string"),
        ({"ct": base64.b64encode(b"x" * 15).decode()}, "personal_sealed.ct: 15 bytes"),
        ({"ct": "A" * (MAX_CT_BYTES * 2 + 4)}, "personal_sealed.ct: too long"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_malformed_envelopes_name_the_field(
    keys: tuple[PersonalSealer, PersonalOpener], change: dict[str, Any], message: str
) -> None:
    env = {**keys[0].seal(RID, PERSONAL), **change}
    with pytest.raises(PersonalSealError, match=message):
        parse_envelope(env, RID)
    with pytest.raises(PersonalSealError, match=message):
        keys[1].open(RID, env)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_b64 = st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())
_envelopes = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 0, 2, "1", True, None]),
        "kid": st.text(alphabet="0123456789abcdefX", min_size=15, max_size=17),
        "epk": _b64 | _json,
        "nonce": _b64 | _json,
        "ct": _b64 | _json,
        "other": _json,
    },
)


@settings(max_examples=200, deadline=None)
@given(env=_envelopes | _json)
def test_the_parser_refuses_hostile_envelopes_with_its_one_error(env: Any) -> None:
    """Anything that is not a well-formed envelope raises PersonalSealError, nothing else;
    whatever parses re-encodes to the same envelope."""
    try:
        sealed = parse_envelope(env, RID)
    except PersonalSealError as e:
        assert str(e).startswith(f"record {RID}: personal_sealed")
        return
    assert sealed.envelope() == env


def test_key_files(tmp_path: Path) -> None:
    kid = generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    assert stat.S_IMODE((tmp_path / "a.key").stat().st_mode) == 0o600
    assert PersonalSealer.from_file(tmp_path / "a.pub").kid == kid
    with pytest.raises(FileExistsError):  # never overwritten
        generate_keypair(tmp_path / "a.key", tmp_path / "b.pub")
    os.chmod(tmp_path / "a.key", 0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        PersonalOpener.from_file(tmp_path / "a.key")
    ed = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "ed.pub").write_bytes(
        ed.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match=r"ed.pub: outbox.registry_public_key: not an X25519"):
        PersonalSealer.from_file(tmp_path / "ed.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        PersonalSealer.from_file(tmp_path / "junk.pub")
    with pytest.raises(ConfigError, match="cannot read"):
        PersonalSealer.from_file(tmp_path / "missing.pub")


def test_console_masks_identifiers_unless_asked() -> None:
    assert mask_identifiers("ticket 111122222345") == "ticket 1111-****-2345"
    assert mask_identifiers("1111-2222-2345 at 112089") == "1111-****-2345 at 112089"
    rec = {"seq": 4, "device": "scanner", "kind": "barcode", "data": {"text": "111122222345"}}
    assert "1111-****-2345" in describe_record(rec)
    assert "2222" not in describe_record(rec)
    assert "111122222345" in describe_record(rec, show_data=True)


@settings(max_examples=100, deadline=None)
@given(
    field=st.sampled_from(["epk", "nonce", "ct"]),
    where=st.integers(min_value=0, max_value=10_000),
    bit=st.integers(min_value=0, max_value=7),
)
def test_any_flipped_bit_is_refused(field: str, where: int, bit: int) -> None:
    """Whatever single bit of a sealed part changes, it does not open: one error, no data."""
    sealer, opener = _KEYS
    env = sealer.seal(RID, PERSONAL)
    raw = bytearray(base64.b64decode(env[field]))
    raw[where % len(raw)] ^= 1 << bit
    with pytest.raises(PersonalSealError):
        opener.open(RID, {**env, field: base64.b64encode(bytes(raw)).decode()})


def _keys() -> tuple[PersonalSealer, PersonalOpener]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.generate()
    return PersonalSealer(private.public_key()), PersonalOpener(private)


_KEYS = _keys()
