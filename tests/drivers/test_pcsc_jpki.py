"""Is the My Number card genuine: chain check and possession proof (agent/drivers/jpki.py).

Pure checks on certificates made here, then the real driver on a real pcscd with
vpcd's emulated cards (tests/support/pcsc.py): genuine RSA and ECDSA P-384 cards
chaining to the test anchor, a forged card (same DN, self-made CA), an expired
certificate, a chip whose key does not match its certificate, a card with 1 auth
PIN try left and a card answering no known application. Also `card-info`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import PcscDevice
from agent.config_schema import validate_device
from agent.contract.records import Read, ReadFault
from agent.drivers import jpki
from agent.drivers.pcsc import PcscDriver
from agent.errors import CardError, PinRefused
from tests.support.pcsc import (
    TEST_AUTH_PIN,
    TEST_PIN,
    MyNumberCard,
    PcscStack,
    UnknownIsoCard,
    anchor_fingerprint,
    auth_certificate,
    ca_der,
    holder_key,
    make_ca,
    pcsc_stack,
)
from tests.support.pcsc import (
    test_ca as anchor_ca,
)
from tests.support.secrets import pin_in

pcscd = pytest.mark.pcscd
VERIFY = bytes.fromhex("00200080")
NOW = dt.datetime.now(dt.UTC)


def anchors() -> frozenset[str]:
    return frozenset({anchor_fingerprint()})


def pins_sent(card: MyNumberCard) -> list[bytes]:
    """VERIFY APDUs that carried a PIN (the retry-counter query has no data)."""
    return [a for a in card.seen if a[:4] == VERIFY and len(a) > 4]


# -- pure: the chain check ---------------------------------------------------------------


def test_a_certificate_from_the_pinned_ca_is_valid_only_with_a_synced_clock() -> None:
    cert, ca = auth_certificate(7), ca_der(anchor_ca())
    assert jpki.check_chain(cert, ca, anchors(), NOW, True).verdict == "genuine"
    assert jpki.check_chain(cert, ca, anchors(), NOW, False).chain == "clock_unsynced"
    assert jpki.check_chain(cert, ca, anchors(), NOW, None).chain == "clock_unsynced"
    later = NOW + dt.timedelta(days=6 * 365)
    assert jpki.check_chain(cert, ca, anchors(), later, True).chain == "expired"
    earlier = NOW - dt.timedelta(days=60)
    assert jpki.check_chain(cert, ca, anchors(), earlier, True).chain == "not_yet_valid"


def test_the_card_carried_ca_is_only_a_candidate() -> None:
    forged = make_ca(forged=True)
    cert = auth_certificate(7, ca=forged)
    # the forger's CA is on the card, but its fingerprint is not pinned
    result = jpki.check_chain(cert, ca_der(forged), anchors(), NOW, True)
    assert (result.chain, result.verdict) == ("untrusted_issuer", "untrusted_chain")
    # the forged cert next to the genuine CA: the signature does not verify
    result = jpki.check_chain(cert, ca_der(anchor_ca()), anchors(), NOW, True)
    assert result.chain == "untrusted_issuer"
    assert result.reason == "not signed by the pinned CA"
    assert jpki.check_chain(cert, None, anchors(), NOW, True).chain == "untrusted_issuer"


def test_jlis_anchors_are_the_config_default() -> None:
    dev = PcscDevice(name="r", profile="p", driver="pcsc")  # type: ignore[call-arg]
    assert set(dev.jpki_anchors) == set(jpki.JLIS_AUTH_ANCHORS)
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        validate_device(
            {"name": "r", "profile": "p", "driver": "pcsc", "jpki_anchors": ["abcd"]}, PcscDevice
        )


def test_p384_certificate_is_the_2026_generation() -> None:
    cert = auth_certificate(9, key=holder_key("p384"))
    result = jpki.check_chain(cert, ca_der(anchor_ca()), anchors(), NOW, True)
    assert (result.verdict, result.key, result.generation) == (
        "genuine",
        "ecdsa-p384",
        jpki.GEN_P384,
    )


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600), st.one_of(st.none(), st.binary(max_size=300)))
def test_hostile_bytes_are_malformed_or_untrusted_never_genuine(
    cert: bytes, ca: bytes | None
) -> None:
    result = jpki.check_chain(cert, ca, anchors(), NOW, True)
    assert result.verdict != "genuine"
    assert result.chain in ("malformed", "untrusted_issuer")


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_hostile_signatures_never_verify(sig: bytes) -> None:
    assert jpki.verify_possession(auth_certificate(3), b"n" * 32, sig) is False


# -- through the driver on vpcd ----------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PcscStack]:
    with pcsc_stack(tmp_path) as s:
        yield s


@pytest.fixture
async def driver(stack: PcscStack) -> AsyncIterator[PcscDriver]:
    dev = PcscDevice(
        name="card-reader",
        profile="test",
        driver="pcsc",
        reader=stack.reader,
        jpki_anchors=[anchor_fingerprint()],
        prove_possession=True,
    )  # type: ignore[call-arg]
    async with PcscDriver(dev) as d:
        d.clock_synced = lambda: True
        yield d


async def inserted(driver: PcscDriver, stack: PcscStack, card: object) -> Read:
    stack.slot.insert(card)  # type: ignore[arg-type]
    read: Read | ReadFault = await asyncio.wait_for(anext(driver.reads()), 15)
    assert isinstance(read, Read), read
    return read


@pcscd
@pytest.mark.parametrize(
    ("card", "verdict", "chain"),
    [
        (lambda: MyNumberCard(), "genuine", "valid"),
        (lambda: MyNumberCard(forged=True), "untrusted_chain", "untrusted_issuer"),
        (lambda: MyNumberCard(expired=True), "expired", "expired"),
        (lambda: MyNumberCard(key="p384"), "genuine", "valid"),
    ],
    ids=["genuine-rsa", "forged", "expired", "p384"],
)
async def test_every_card_read_carries_the_chain_verdict(
    driver: PcscDriver, stack: PcscStack, card: object, verdict: str, chain: str
) -> None:
    read = await inserted(driver, stack, card())  # type: ignore[operator]
    auth = read.data["card_auth"]
    assert (auth["verdict"], auth["chain"], auth["revocation"]) == (verdict, chain, "not_checked")


@pcscd
async def test_an_unsynced_clock_is_not_judged(driver: PcscDriver, stack: PcscStack) -> None:
    driver.clock_synced = lambda: False
    read = await inserted(driver, stack, MyNumberCard(expired=True))
    assert read.data["card_auth"]["verdict"] == "clock_unsynced"


@pcscd
@pytest.mark.parametrize("key", ["rsa", "p384"])
async def test_possession_is_proven_and_an_auditor_can_verify_it_again(
    driver: PcscDriver, stack: PcscStack, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    caplog.set_level(logging.DEBUG)
    card = MyNumberCard(key=key)
    await inserted(driver, stack, card)
    result = await driver.prove_possession(TEST_AUTH_PIN)
    assert (result["verdict"], result["possession"]) == ("genuine", "proven"), result
    cert, nonce, sig = (bytes.fromhex(result[k]) for k in ("certificate", "nonce", "signature"))
    assert cert == card.cert
    assert jpki.verify_possession(cert, nonce, sig)
    assert not jpki.verify_possession(cert, nonce[::-1], sig)
    assert len(pins_sent(card)) == 1
    record = await asyncio.wait_for(anext(driver.reads()), 15)
    assert isinstance(record, Read) and record.kind == "card_auth"
    assert record.data["card_auth"]["nonce"] == result["nonce"]
    # a second proof uses a fresh nonce
    again = await driver.prove_possession(TEST_AUTH_PIN)
    assert again["nonce"] != result["nonce"]
    await asyncio.wait_for(anext(driver.reads()), 15)
    logged = caplog.text
    assert not pin_in(TEST_AUTH_PIN, logged)
    assert result["nonce"] not in logged and result["signature"] not in logged
    assert card.signed and all(data.hex() not in logged for data in card.signed)


@pcscd
async def test_a_chip_without_the_certificates_key_fails_possession(
    driver: PcscDriver, stack: PcscStack
) -> None:
    card = MyNumberCard(wrong_key=True)
    read = await inserted(driver, stack, card)
    assert read.data["card_auth"]["verdict"] == "genuine"  # the copied cert looks right
    result = await driver.prove_possession(TEST_AUTH_PIN)
    assert (result["verdict"], result["possession"]) == ("possession_failed", "failed")


@pcscd
async def test_one_try_left_never_sends_the_pin(driver: PcscDriver, stack: PcscStack) -> None:
    card = MyNumberCard(auth_tries=1)
    await inserted(driver, stack, card)
    with pytest.raises(PinRefused) as e:
        await driver.prove_possession(TEST_AUTH_PIN)
    assert e.value.tries_left == 1
    assert pins_sent(card) == []
    assert card.auth_tries == 1 and card.signed == []


@pcscd
async def test_wrong_pin_spends_one_try_and_is_not_retried(
    driver: PcscDriver, stack: PcscStack
) -> None:
    card = MyNumberCard()
    await inserted(driver, stack, card)
    with pytest.raises(PinRefused) as e:
        await driver.prove_possession("0000")
    assert e.value.tries_left == 2
    assert len(pins_sent(card)) == 1 and card.signed == []


@pcscd
async def test_a_forged_card_never_sees_the_pin(driver: PcscDriver, stack: PcscStack) -> None:
    card = MyNumberCard(forged=True)
    await inserted(driver, stack, card)
    result = await driver.prove_possession(TEST_AUTH_PIN)
    assert (result["verdict"], result["possession"]) == ("untrusted_chain", "not_attempted")
    assert pins_sent(card) == []


@pcscd
async def test_a_card_with_no_known_application_is_an_unsupported_generation(
    driver: PcscDriver, stack: PcscStack
) -> None:
    card = UnknownIsoCard()
    read = await inserted(driver, stack, card)
    assert read.data["card_type"] == "unknown" and "card_auth" not in read.data
    result = await driver.prove_possession(TEST_AUTH_PIN)
    assert result["verdict"] == "unsupported card generation"
    assert result["possession"] == "not_attempted"
    assert not any(a[:2] == VERIFY[:2] for a in card.seen)


# -- card-info -----------------------------------------------------------------------------


def card_info_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "card-info", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
        check=False,
    )


@pcscd
def test_cli_shows_the_verdict_and_generation_and_proves(stack: PcscStack) -> None:
    synced = jpki.kernel_clock_synced() is True
    anchor = ("--anchor", anchor_fingerprint())
    stack.slot.insert(MyNumberCard(), wait=True)
    done = card_info_cli("--reader", stack.reader, "--json", *anchor)
    assert done.returncode == 0, done.stderr
    auth = json.loads(done.stdout)["card"]["card_auth"]
    assert auth["verdict"] == ("genuine" if synced else "clock_unsynced")
    assert auth["generation"] == jpki.GEN_RSA
    human = card_info_cli("--reader", stack.reader, *anchor)
    assert f"generation: {jpki.GEN_RSA}" in human.stdout
    # without the test anchor (J-LIS defaults) the test card is untrusted
    done = card_info_cli("--reader", stack.reader, "--json")
    assert json.loads(done.stdout)["card"]["card_auth"]["verdict"] == "untrusted_chain"
    proved = card_info_cli("--reader", stack.reader, "--json", "--prove", *anchor, stdin="4321\n")
    assert proved.returncode == 0, proved.stderr
    out = json.loads(proved.stdout)["card_auth"]
    assert out["possession"] == "proven"
    assert not pin_in(TEST_AUTH_PIN, proved.stderr)
    stack.slot.insert(MyNumberCard(auth_tries=1), wait=True)
    refused = card_info_cli("--reader", stack.reader, "--prove", *anchor, stdin="4321\n")
    assert refused.returncode == 3 and "1 auth PIN try left" in refused.stderr
    stack.slot.insert(UnknownIsoCard(), wait=True)
    human = card_info_cli("--reader", stack.reader, *anchor)
    assert "unsupported card generation" in human.stdout
    assert TEST_PIN not in human.stdout


# -- hostile cards: whatever a card answers, the PIN rules hold ----------------------------


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=40), st.integers(0, 0xFFFF)), max_size=40))
def test_a_hostile_card_never_gets_the_pin_against_the_rules(
    answers: list[tuple[bytes, int]],
) -> None:
    sent: list[tuple[bytes, tuple[bytes, int]]] = []
    script = iter(answers)

    def tx(apdu: bytes) -> tuple[bytes, int]:
        reply = next(script, (b"", 0x6A82))
        sent.append((apdu, reply))
        return reply

    try:
        result = jpki.prove_possession(tx, TEST_AUTH_PIN, "hostile", anchors(), NOW, True)
    except (PinRefused, CardError):
        result = None
    with_pin = [i for i, (a, _) in enumerate(sent) if a[:4] == VERIFY and len(a) > 4]
    assert len(with_pin) <= 1  # VERIFY once, never retried
    for i in with_pin:
        counter_apdu, (_, counter_sw) = sent[i - 1]
        assert counter_apdu == VERIFY  # the counter was read just before, for free
        assert counter_sw & 0xFFF0 == 0x63C0 and counter_sw & 0x0F >= 2
    assert result is None or result["possession"] != "proven"


@pcscd
@pytest.mark.parametrize("flow", ["prove", "info"])
async def test_a_card_pulled_out_mid_pin_flow_is_a_card_error_and_the_reader_keeps_working(
    driver: PcscDriver, stack: PcscStack, flow: str
) -> None:
    """Pulled during the signature / the 4-attribute VERIFY. Resetting the absent card
    used to wedge the reader: the next card went unseen (scard.CardLink.gone)."""
    card = MyNumberCard()
    pull = bytes.fromhex("802A0080") if flow == "prove" else VERIFY + b"\x04" + TEST_PIN.encode()
    card.pull_when = lambda apdu: apdu[: len(pull)] == pull
    await inserted(driver, stack, card)
    with pytest.raises(CardError, match="removed"):
        if flow == "prove":
            await driver.prove_possession(TEST_AUTH_PIN)
        else:
            await driver.read_card_info(TEST_PIN)
    stack.slot.remove()
    read = await inserted(driver, stack, MyNumberCard())  # the reader keeps working
    assert read.data["card_auth"]["verdict"] == "genuine"
