"""Interpretation: vectors per format (FORMATS.md and the sources it names) and properties."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from biip.checksums import gs1_standard_check_digit
from hypothesis import assume, given
from hypothesis import strategies as st

import agent.interpret as interp_pkg
from agent.cli.main import main
from agent.cli.tools import unescape, visible
from agent.interpret import interpret, split_aim
from agent.interpret.gtin import gtin_check_digit, is_valid_gtin
from agent.interpret.municipality import is_valid_municipality_code, municipality_check_digit
from agent.interpret.text import url_host

TODAY = date(2026, 11, 22)
GS = "\x1d"
KEYS = {"type", "valid", "fields", "problems"}
GS1_AIMS = ["]C1", "]e0", "]d2", "]Q3"]


def ask(text: str, **kw: object) -> dict[str, object]:
    kw.setdefault("today", TODAY)
    return interpret(text, **kw)  # type: ignore[arg-type]


# -- municipality code ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("112241", "戸田市"),
        ("122076", "松戸市"),
        ("122114", "成田市"),
        ("131130", "渋谷区"),
        ("131016", "千代田区"),
    ],
)
def test_municipality_code_worked_examples(code: str, name: str) -> None:
    assert municipality_check_digit(code[:5]) == int(code[5]), name
    assert is_valid_municipality_code(code)


@pytest.mark.parametrize(
    "code", ["112240", "122074", "131131", "11224", "1122411", "11224a", "１１２２４１", ""]
)
def test_municipality_code_invalid(code: str) -> None:
    assert not is_valid_municipality_code(code)


@pytest.mark.parametrize("first5", ["1122", "112241", "1122a", "１１２２４"])
def test_municipality_check_digit_needs_five_ascii_digits(first5: str) -> None:
    with pytest.raises(ValueError, match="5 digits"):
        municipality_check_digit(first5)


def _remainder(first5: str) -> int:
    return sum(w * int(c) for w, c in zip((6, 5, 4, 3, 2), first5, strict=True)) % 11


@given(
    st.text("0123456789", min_size=5, max_size=5),
    st.integers(0, 5),
    st.integers(1, 9),
)
def test_municipality_single_digit_change_caught_except_the_r0_r10_blind_spot(
    first5: str, pos: int, delta: int
) -> None:
    code = first5 + str(municipality_check_digit(first5))
    changed = code[:pos] + str((int(code[pos]) + delta) % 10) + code[pos + 1 :]
    blind = {_remainder(code[:5]), _remainder(changed[:5])} == {0, 10}
    assert is_valid_municipality_code(changed) is blind
    if pos == 5:
        assert not blind


# -- vaccination ticket -----------------------------------------------------------------


def test_ticket_18_digits_fields() -> None:
    r = ask("121122410123456789")
    assert r == {
        "type": "vaccination_ticket",
        "valid": True,
        "fields": {
            "kind_code": "1",
            "round_code": "2",
            "municipality_code": "112241",
            "ticket_number": "0123456789",
        },
        "problems": [],
    }


@pytest.mark.parametrize("municipality", ["112240", "122074", "131131"])
def test_ticket_bad_municipality_check_digit(municipality: str) -> None:
    r = ask(f"11{municipality}0000000001")
    assert r["type"] == "vaccination_ticket"
    assert r["valid"] is False
    assert r["problems"] == ["bad_check_digit"]


@pytest.mark.parametrize(
    ("text", "symbology"),
    [
        ("0123456789", None),
        ("A0123456789B", None),
        ("a0123456789d", None),
        ("C0123456789C", "]F0"),
        ("0123456789", "]F0"),
    ],
)
def test_ticket_number_nw7_with_and_without_start_stop(text: str, symbology: str | None) -> None:
    r = ask(text, symbology=symbology)
    assert r == {
        "type": "vaccination_ticket_number",
        "valid": True,
        "fields": {"ticket_number": "0123456789"},
        "problems": [],
    }


def test_ticket_18_digits_in_codabar() -> None:
    r = ask("D111311300000000042A", symbology="]F0")
    assert r["type"] == "vaccination_ticket"
    assert r["fields"]["municipality_code"] == "131130"
    assert r["fields"]["ticket_number"] == "0000000042"
    assert r["valid"] is True


@pytest.mark.parametrize(
    "text",
    ["012345678", "01234567890", "A012345678B", "E0123456789E", "012345678９", "A0123456789"],
)
def test_not_a_ticket(text: str) -> None:
    assert ask(text)["type"] not in ("vaccination_ticket", "vaccination_ticket_number")


tickets = st.builds(
    lambda kind, rnd, first5, number: (
        f"{kind}{rnd}{first5}{municipality_check_digit(first5)}{number}"
    ),
    st.text("0123456789", min_size=1, max_size=1),
    st.text("0123456789", min_size=1, max_size=1),
    st.text("0123456789", min_size=5, max_size=5),
    st.text("0123456789", min_size=10, max_size=10),
)


@given(tickets, st.sampled_from(["", "A", "b"]), st.sampled_from([None, "]Q1", "]F0"]))
def test_generated_tickets_are_valid(ticket: str, frame: str, symbology: str | None) -> None:
    text = f"{frame}{ticket}{frame}" if frame else ticket
    r = ask(text, symbology=symbology)
    assert r["type"] == "vaccination_ticket"
    assert r["valid"] is True
    assert "".join(r["fields"].values()) == ticket


@given(tickets, st.integers(0, 17), st.integers(1, 9))
def test_ticket_single_digit_change(ticket: str, pos: int, delta: int) -> None:
    """Only the municipality code (digits 3-8) is protected, and it has its r 0/10 blind spot."""
    changed = ticket[:pos] + str((int(ticket[pos]) + delta) % 10) + ticket[pos + 1 :]
    r = ask(changed)
    assert r["type"] == "vaccination_ticket"
    if 2 <= pos < 8:
        blind = {_remainder(ticket[2:7]), _remainder(changed[2:7])} == {0, 10}
        assert r["valid"] is blind
        if not blind:
            assert r["problems"] == ["bad_check_digit"]
    else:
        assert r["valid"] is True


# -- GTIN -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "symbology", "fmt"),
    [
        ("4901234567894", None, "GTIN-13"),  # FORMATS.md JAN
        ("4901234567894", "]E0", "GTIN-13"),
        ("96385074", None, "GTIN-8"),  # EAN-8
        ("96385074", "]E4", "GTIN-8"),
        ("14901234567891", None, "GTIN-14"),  # ITF-14
        ("14901234567891", "]I1", "GTIN-14"),
        ("036000291452", "]E0", "GTIN-12"),  # UPC-A, only with its AIM identifier
    ],
)
def test_gtin_valid(text: str, symbology: str | None, fmt: str) -> None:
    r = ask(text, symbology=symbology)
    assert r["type"] == "gtin"
    assert r["valid"] is True
    assert r["fields"] == {"gtin": text, "gtin14": text.rjust(14, "0"), "format": fmt}


@pytest.mark.parametrize(
    ("text", "symbology", "problem"),
    [
        ("4901234567895", None, "bad_check_digit"),  # FORMATS.md
        ("96385075", "]E4", "bad_check_digit"),
        ("14901234567890", None, "bad_check_digit"),
        ("49012345678", "]E0", "wrong_length"),
        ("49012345678A4", "]E0", "malformed"),
    ],
)
def test_gtin_invalid(text: str, symbology: str | None, problem: str) -> None:
    r = ask(text, symbology=symbology)
    assert r["type"] == "gtin"
    assert r["valid"] is False
    assert r["problems"] == [problem]


def test_twelve_digits_without_aim_are_not_a_gtin() -> None:
    """12 digits is also the length of a My Number: no GTIN reading without ]E."""
    assert ask("036000291452")["type"] == "text"


@given(st.text("0123456789", min_size=1, max_size=20))
def test_gtin_check_digit_agrees_with_biip(payload: str) -> None:
    assert gtin_check_digit(payload) == gs1_standard_check_digit(payload)


gtins = st.sampled_from([7, 12, 13]).flatmap(
    lambda n: st.text("0123456789", min_size=n, max_size=n).map(
        lambda p: p + str(gtin_check_digit(p))
    )
)


@given(gtins)
def test_generated_gtins_are_valid(code: str) -> None:
    symbology = "]E0" if len(code) == 12 else None
    r = ask(code, symbology=symbology)
    assert r["type"] == "gtin"
    assert r["valid"] is True
    assert is_valid_gtin(code)


@given(gtins, st.data())
def test_gtin_single_digit_change_is_caught(code: str, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(code) - 1))
    delta = data.draw(st.integers(1, 9))
    changed = code[:pos] + str((int(code[pos]) + delta) % 10) + code[pos + 1 :]
    r = ask(changed, symbology="]E0" if len(code) == 12 else None)
    assert r["type"] == "gtin"
    assert r["problems"] == ["bad_check_digit"]


# -- My Number card application form ----------------------------------------------------


def test_application_id_23_digits() -> None:
    r = ask("12345678901234567890123", symbology="]Q1")
    assert r == {
        "type": "mynumber_application_id",
        "valid": True,
        "fields": {"application_id": "12345678901234567890123"},
        "problems": [],
    }


@pytest.mark.parametrize(
    "text", ["1234567890123456789012", "123456789012345678901234", "1234567890123456789012X"]
)
def test_application_id_needs_exactly_23_digits(text: str) -> None:
    assert ask(text)["type"] != "mynumber_application_id"


def test_23_digits_that_are_a_clean_gs1_message() -> None:
    """01 + GTIN-14 + 10 + 5-digit lot is 23 digits too; a valid GTIN settles it."""
    assert ask("01049123456789041012345")["type"] == "gs1"
    # one digit off in the GTIN: no clean GS1 reading, so it stays an application ID
    assert ask("01049123456789051012345")["type"] == "mynumber_application_id"
    # with the GS1 DataMatrix identifier there is no doubt
    r = ask("01049123456789051012345", symbology="]d2")
    assert (r["type"], r["problems"]) == ("gs1", ["bad_check_digit"])


# -- GS1 --------------------------------------------------------------------------------

VIAL = f"0114987123456781172705311012AB34{GS}21SN0001"


@pytest.mark.parametrize("aim", [None, *GS1_AIMS])
def test_gs1_vial_fields(aim: str | None) -> None:
    r = ask(VIAL, symbology=aim)
    assert r == {
        "type": "gs1",
        "valid": True,
        "fields": {
            "gtin": "14987123456781",
            "expiry": "2027-05-31",
            "lot": "12AB34",
            "serial": "SN0001",
            "ai": {"01": "14987123456781", "17": "270531", "10": "12AB34", "21": "SN0001"},
        },
        "problems": [],
    }


def test_gs1_other_ais_and_biip_reference_vector() -> None:
    """biip's own documentation example: (01) (15) best before (10) lot."""
    r = ask("010703206980498815210526100329", symbology="]C1")
    assert r["valid"] is True
    assert r["fields"]["gtin"] == "07032069804988"
    assert r["fields"]["lot"] == "0329"
    assert r["fields"]["ai"] == {"01": "07032069804988", "15": "210526", "10": "0329"}


def test_gs1_count_and_production_date_kept_as_other_ais() -> None:
    r = ask(f"0114987123456781112601151726013130100{GS}10L1", symbology="]C1")
    assert r["fields"]["ai"]["11"] == "260115"
    assert r["fields"]["ai"]["30"] == "100"
    assert r["fields"]["expiry"] == "2026-01-31"
    assert r["problems"] == ["expired"]


@pytest.mark.parametrize(
    ("raw", "iso"),
    [("270500", "2027-05-31"), ("280200", "2028-02-29"), ("270200", "2027-02-28")],
)
def test_gs1_expiry_day_00_is_the_last_day_of_the_month(raw: str, iso: str) -> None:
    r = ask(f"011498712345678117{raw}", symbology="]e0")
    assert r["fields"]["expiry"] == iso


@pytest.mark.parametrize(
    ("today", "expired"),
    [(date(2027, 5, 30), False), (date(2027, 5, 31), False), (date(2027, 6, 1), True)],
)
def test_gs1_expired_against_today(today: date, expired: bool) -> None:
    r = interpret(VIAL, symbology="]d2", today=today)
    assert ("expired" in r["problems"]) is expired
    assert r["valid"] is not expired


def test_gs1_expiry_uses_the_clock_when_today_is_not_given() -> None:
    r = interpret("011498712345678117000131", symbology="]e0")  # 2000-01-31
    assert r["problems"] == ["expired"]


@pytest.mark.parametrize("sub", ["|", "#", "~", "^"])
def test_gs1_substitute_separator(sub: str) -> None:
    text = VIAL.replace(GS, sub)
    r = ask(text, gs_substitute=sub)
    assert r["valid"] is True
    assert r["fields"]["lot"] == "12AB34"
    assert r["fields"]["serial"] == "SN0001"
    # the real GS still works on a device that has a substitute configured
    assert ask(VIAL, gs_substitute=sub)["valid"] is True


def test_gs1_substitute_not_configured_is_malformed() -> None:
    r = ask(VIAL.replace(GS, "|"))
    assert r["type"] == "gs1"
    assert r["problems"] == ["malformed"]
    assert r["fields"]["lot"] == "12AB34"  # what parsed before the unknown separator is kept


def test_gs1_bad_gtin_check_digit() -> None:
    r = ask("0114987123456785172705311012AB34", symbology="]d2")
    assert r["type"] == "gs1"
    assert r["problems"] == ["bad_check_digit"]
    assert r["fields"]["gtin"] == "14987123456785"


@pytest.mark.parametrize(
    ("text", "symbology"),
    [
        ("10ABC12317261231", "]C1"),  # FORMATS.md: the lot swallowed (17)
        ("011498712345678110ABC12317261231", None),
        ("011498712345678110ABC1231726123121SN1", "]d2"),  # (17) and (21) both swallowed
        ("1726123110ABC0114987123456781", "]C1"),  # lot swallowed (01)
    ],
)
def test_gs1_missing_separator(text: str, symbology: str | None) -> None:
    r = ask(text, symbology=symbology)
    assert r["type"] == "gs1"
    assert "missing_separator" in r["problems"]
    assert r["valid"] is False


@pytest.mark.parametrize(
    "text",
    [
        "01149871234567811727053110A17250101",  # (17) present: a lot may end in 17+date
        "011498712345678117270531" + "10ABC1299999",  # 17 + impossible date inside the lot
        "01149871234567811727053110LOT1172601",  # too short to hold 17 + 6 digits
    ],
)
def test_gs1_lot_with_digits_is_not_a_missing_separator(text: str) -> None:
    r = ask(text, symbology="]C1")
    assert r["problems"] == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0114987123456781172713311012", "bad_date"),  # month 13
        ("0114987123456781172702301012", "bad_date"),  # 30 February
        ("01149871234567819", "malformed"),  # a lone digit is no AI
        ("0114987123", "malformed"),  # GTIN cut short
        ("", "malformed"),
    ],
)
def test_gs1_malformed(text: str, problem: str) -> None:
    r = ask(text, symbology="]d2")
    assert r["type"] == "gs1"
    assert problem in r["problems"]
    assert r["valid"] is False


def test_gs1_leading_gs_and_trailing_newline_are_tolerated() -> None:
    assert ask(GS + VIAL + "\r\n", symbology="]d2")["valid"] is True


def test_gs1_printed_form_hri() -> None:
    r = ask("(01)14987123456781(17)270500(10)12AB34")
    assert r["type"] == "gs1"
    assert r["fields"]["expiry"] == "2027-05-31"
    assert r["fields"]["lot"] == "12AB34"
    assert ask("(01)14987123456785")["problems"] == ["bad_check_digit"]
    assert ask("(99")["type"] == "text"
    assert ask("(03) 1234-5678")["type"] == "text"  # a phone number, not a broken GS1
    # under a GS1 symbology the content is element strings, never the printed form
    assert ask("(01)14987123456781", symbology="]C1")["problems"] == ["malformed"]


def test_gs1_sscc_check_digit() -> None:
    assert ask("00349123451234567891", symbology="]C1")["problems"] == ["bad_check_digit"]
    sscc = "0034912345123456789"
    sscc += str(gtin_check_digit(sscc[2:]))
    assert ask(sscc)["valid"] is True


def test_gs1_results_are_fresh_dicts_despite_the_cache() -> None:
    first = ask(VIAL, symbology="]d2")
    first["fields"]["lot"] = "tampered"
    first["fields"]["ai"]["10"] = "tampered"
    first["problems"].append("tampered")
    again = ask(VIAL, symbology="]d2")
    assert again["fields"]["lot"] == "12AB34"
    assert again["fields"]["ai"]["10"] == "12AB34"
    assert again["problems"] == []


GS1_CHARSET_82 = (
    "!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
)


@st.composite
def gs1_messages(draw: st.DrawFn) -> tuple[str, str | None, str | None]:
    """(text, symbology, gs_substitute): GTIN + future expiry + lot [+ serial], any order."""
    payload = draw(st.text("0123456789", min_size=13, max_size=13))
    gtin14 = payload + str(gtin_check_digit(payload))
    yy = draw(st.integers(27, 70))
    mm = draw(st.integers(1, 12))
    dd = draw(st.integers(0, 28))
    lot = draw(st.text(GS1_CHARSET_82, min_size=1, max_size=20))
    serial = draw(st.none() | st.text(GS1_CHARSET_82, min_size=1, max_size=20))
    sub = draw(st.sampled_from([None, "|", "#", "^"]))
    sep = sub or GS
    fixed = f"01{gtin14}17{yy:02d}{mm:02d}{dd:02d}"
    variable = [f"10{lot}"] + ([f"21{serial}"] if serial is not None else [])
    text = fixed + sep.join(variable)
    symbology = draw(st.sampled_from([None, *GS1_AIMS]))
    return text, symbology, sub


@given(gs1_messages())
def test_generated_gs1_messages_are_valid(msg: tuple[str, str | None, str | None]) -> None:
    text, symbology, sub = msg
    r = interpret(text, symbology=symbology, gs_substitute=sub, today=date(2026, 1, 1))
    assert r["type"] == "gs1", r
    assert r["valid"] is True, r
    assert r["fields"]["gtin"] == text[2:16]


@given(gs1_messages(), st.integers(2, 15), st.integers(1, 9))
def test_gs1_single_digit_change_in_the_gtin_is_caught(
    msg: tuple[str, str | None, str | None], pos: int, delta: int
) -> None:
    text, symbology, sub = msg
    changed = text[:pos] + str((int(text[pos]) + delta) % 10) + text[pos + 1 :]
    r = interpret(changed, symbology=symbology or "]d2", gs_substitute=sub, today=TODAY)
    assert r["type"] == "gs1"
    assert "bad_check_digit" in r["problems"]


# -- text, url, AIM, robustness ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "fields"),
    [
        (
            "https://www.city.toda.saitama.jp/a?b=1",
            "url",
            {"scheme": "https", "host": "www.city.toda.saitama.jp"},
        ),
        ("HTTP://EXAMPLE.JP", "url", {"scheme": "http", "host": "example.jp"}),
        ("http://[::1", "url", {"scheme": "http", "host": "::1"}),  # urlsplit would raise
        ("戸田市役所", "text", {}),
        ("hello world", "text", {}),
        ("", "text", {}),
        ("112241", "text", {}),
    ],
)
def test_text_and_url(text: str, kind: str, fields: dict[str, str]) -> None:
    assert ask(text) == {"type": kind, "valid": True, "fields": fields, "problems": []}


@given(
    st.sampled_from(["http", "https", "HTTPS"]),
    st.text(st.sampled_from("aZ0.-_~%!$&'()*+,;=:@[]/?#"), max_size=40),
)
def test_url_host_agrees_with_urlsplit(scheme: str, rest: str) -> None:
    """The hand-rolled host extraction (hot path) matches the standard library."""
    url = f"{scheme}://{rest}"
    try:
        expected = urlsplit(url).hostname or ""
    except ValueError:  # urlsplit rejects broken IPv6 literals; we still give a result
        assume(False)
    assert url_host(rest) == expected
    assert ask(url)["fields"] == {"scheme": scheme.lower(), "host": expected}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("]d2010", ("]d2", "010")),
        ("]E04901234567894", ("]E0", "4901234567894")),
        ("]C1", ("]C1", "")),
        ("]F", (None, "]F")),
        ("]あ1x", (None, "]あ1x")),
        ("]d２x", (None, "]d２x")),
        ("4901234567894", (None, "4901234567894")),
    ],
)
def test_split_aim(text: str, expected: tuple[str | None, str]) -> None:
    assert split_aim(text) == expected


@pytest.mark.parametrize("bad", [None, b"4901234567894", 4901234567894])
def test_non_strings_give_a_result_not_an_exception(bad: object) -> None:
    r = interpret(bad, today=TODAY)  # type: ignore[arg-type]
    assert r == {
        "type": "text",
        "valid": False,
        "fields": {},
        "problems": ["interpretation_failed"],
    }


def test_internal_failure_is_contained_and_logged_without_the_text(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom 0114987123456781")

    monkeypatch.setattr(interp_pkg.gs1, "parse", broken)
    with caplog.at_level(logging.WARNING):
        r = ask(VIAL, symbology="]d2")
    assert r["problems"] == ["interpretation_failed"]
    assert r["type"] == "text"
    assert "RuntimeError" in caplog.text
    assert "0114987123456781" not in caplog.text


@given(
    st.text(),
    st.sampled_from([None, "]C1", "]e0", "]d2", "]Q3", "]E0", "]E4", "]I1", "]F0", "]Q1", "]X"]),
    st.sampled_from([None, "|", "#", GS, "0", "1", "A", ""]),
)
def test_no_string_raises(text: str, symbology: str | None, sub: str | None) -> None:
    r = interpret(text, symbology=symbology, gs_substitute=sub, today=TODAY)
    assert set(r) == KEYS
    assert r["valid"] is (not r["problems"])
    assert "interpretation_failed" not in r["problems"]  # no hidden internal error either
    json.dumps(r)


barcode_like = st.text(st.sampled_from("0123456789" * 4 + "ABCDabcd()|" + GS + "\r\n"), max_size=60)


@given(barcode_like, st.sampled_from([None, *GS1_AIMS, "]E0", "]F0"]))
def test_no_barcode_like_string_raises(text: str, symbology: str | None) -> None:
    r = interpret(text, symbology=symbology, gs_substitute="|", today=TODAY)
    assert set(r) == KEYS
    assert "interpretation_failed" not in r["problems"]


# -- madoguchi decode -------------------------------------------------------------------


def test_decode_human_output_escapes_gs(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["decode", "]d2" + VIAL.replace(GS, "\\x1d"), "--today", "2026-11-22"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "symbology:  ]d2" in out
    assert "type:       gs1" in out
    assert "valid:      yes" in out
    assert "12AB34\\x1d21SN0001" in out
    assert "expiry: 2027-05-31" in out
    assert GS not in out


def test_decode_json_and_exit_status_on_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["decode", "4901234567895", "--aim", "]E0", "--json"])
    assert rc == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "text": "4901234567895",
        "symbology": "]E0",
        "interpretation": {
            "type": "gtin",
            "valid": False,
            "fields": {"gtin": "4901234567895", "gtin14": "04901234567895", "format": "GTIN-13"},
            "problems": ["bad_check_digit"],
        },
    }


def test_decode_gs_substitute_and_expired(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["decode", VIAL.replace(GS, "|"), "--gs-substitute", "|", "--today", "2027-06-01", "--json"]
    )
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert doc["interpretation"]["problems"] == ["expired"]
    assert doc["interpretation"]["fields"]["serial"] == "SN0001"


def test_decode_rejects_a_long_substitute(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["decode", "x", "--gs-substitute", "||"])
    assert exc.value.code == 2
    assert "exactly one character" in capsys.readouterr().err


def test_unescape_and_visible() -> None:
    assert unescape("10A\\x1d21B\\x1D") == f"10A{GS}21B{GS}"
    assert unescape("no escapes") == "no escapes"
    assert visible(f"a{GS}b\r\n\x7f") == "a\\x1db\\x0d\\x0a\\x7f"


def test_decode_as_a_real_command() -> None:
    """The way a technician runs it: a process, text with the \\x1d escape."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "decode", "--json", "]C110ABC12317261231"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["symbology"] == "]C1"
    assert doc["interpretation"]["problems"] == ["missing_separator"]
