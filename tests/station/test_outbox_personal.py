"""The outbox seals a personal part to the registry's key once, at the commit: every
(re-)send carries the same ciphertext, the outbox file holds none of the plaintext."""

from __future__ import annotations

from pathlib import Path

from agent.contract.records import Read
from agent.personal_seal import PersonalOpener, PersonalSealer, generate_keypair
from agent.station.outbox import Outbox
from agent.station.sealing import Sealer

SECRET = {"name": "試験 太郎", "my_number": "123456789018"}


async def test_sealed_once_for_the_registry_and_the_same_at_every_send(tmp_path: Path) -> None:
    Sealer.create_key_file(tmp_path / "k")
    generate_keypair(tmp_path / "reg.key", tmp_path / "reg.pub")
    to_registry = PersonalSealer.from_file(tmp_path / "reg.pub")
    path = tmp_path / "outbox.db"
    async with Outbox(
        path, sealer=Sealer.from_file(tmp_path / "k"), personal_sealer=to_registry
    ) as ob:
        rec = await ob.append(
            Read(device="card", kind="card_info", data={"card_type": "mynumber"}, personal=SECRET)
        )
        wire = rec.wire()
        assert "personal" not in wire["data"]
        assert rec.personal is None
        [again] = await ob.next_batch(10, 0)
        assert again.wire_json() == rec.wire_json()  # the same envelope, not sealed anew
    async with Outbox(path, sealer=Sealer.from_file(tmp_path / "k")) as ob:  # after a restart
        [later] = await ob.next_batch(10, 0)
        assert later.wire()["data"] == wire["data"]
    opener = PersonalOpener.from_file(tmp_path / "reg.key")
    assert opener.open(rec.id, wire["data"]["personal_sealed"]) == SECRET
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("outbox.db*"))
    for value in SECRET.values():
        assert value.encode() not in raw
    assert SECRET["my_number"].encode() not in rec.wire_json().encode()


def test_config_checks_the_registry_key_at_load(tmp_path: Path) -> None:
    import pytest

    from agent.config import load_config
    from agent.errors import ConfigError
    from agent.testing import write_config

    Sealer.create_key_file(tmp_path / "k")
    bad = tmp_path / "registry.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    devices = """
[[devices]]
name = "card-reader"
profile = "generic-pcsc-reader"
store_card_info = true
"""
    path = write_config(
        tmp_path,
        1883,
        outbox=f'key_file = "{tmp_path / "k"}"\nregistry_public_key = "{bad}"',
        devices=devices,
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [f"{bad}: outbox.registry_public_key: not a PEM public key"]
    bad.unlink()
    generate_keypair(tmp_path / "reg.key", bad)
    assert load_config(path).outbox.registry_public_key == bad
