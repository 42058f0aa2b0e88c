"""The keyboard-wedge decoder: layouts, modifiers, GS, terminators, faults, evtest captures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli.main import main
from agent.errors import CaptureError
from agent.keymap import (
    EV_KEY,
    EV_SYN,
    KEYS,
    Decoder,
    Fault,
    KeyEvent,
    Scan,
    decode,
    parse_combo,
    parse_evtest,
    type_text,
)
from tests.support.hid import DATA

ROOT = Path(__file__).resolve().parents[2]
GS = "\x1d"


class Keys:
    """Builds key events by name: k.down("KEY_LEFTSHIFT"), k.tap("KEY_A") ..."""

    def __init__(self, start: float = 1000.0, step: float = 0.003) -> None:
        self.t = start
        self.step = step
        self.events: list[KeyEvent] = []

    def _ev(self, name: str, value: int) -> Keys:
        self.events.append(KeyEvent(self.t, EV_KEY, KEYS[name], value))
        self.events.append(KeyEvent(self.t, EV_SYN, 0, 0))
        self.t += self.step
        return self

    def down(self, name: str) -> Keys:
        return self._ev(name, 1)

    def up(self, name: str) -> Keys:
        return self._ev(name, 0)

    def tap(self, *names: str) -> Keys:
        for name in names:
            self.down(name).up(name)
        return self

    def wait(self, seconds: float) -> Keys:
        self.t += seconds
        return self


def run(events: list[KeyEvent], layout: str = "us", **kw: object) -> list[Scan | Fault]:
    return list(decode(events, Decoder(layout, **kw)))  # type: ignore[arg-type]


def one_char(layout: str, key: str, shift: bool) -> str:
    k = Keys()
    if shift:
        k.down("KEY_RIGHTSHIFT")
    k.tap(key)
    if shift:
        k.up("KEY_RIGHTSHIFT")
    k.tap("KEY_ENTER")
    [result] = run(k.events, layout)
    assert isinstance(result, Scan), result
    return result.text


# -- symbol tables ------------------------------------------------------------------

US_TABLE = [
    ("KEY_2", True, "@"), ("KEY_6", True, "^"), ("KEY_7", True, "&"), ("KEY_0", True, ")"),
    ("KEY_MINUS", False, "-"), ("KEY_MINUS", True, "_"), ("KEY_EQUAL", True, "+"),
    ("KEY_LEFTBRACE", False, "["), ("KEY_RIGHTBRACE", True, "}"),
    ("KEY_SEMICOLON", True, ":"), ("KEY_APOSTROPHE", False, "'"),
    ("KEY_APOSTROPHE", True, '"'), ("KEY_GRAVE", False, "`"), ("KEY_GRAVE", True, "~"),
    ("KEY_BACKSLASH", False, "\\"), ("KEY_BACKSLASH", True, "|"), ("KEY_SLASH", True, "?"),
    ("KEY_COMMA", True, "<"), ("KEY_DOT", False, "."), ("KEY_SPACE", False, " "),
]  # fmt: skip

# JIS 106/109: what a Japanese keyboard prints on each key
JP106_TABLE = [
    ("KEY_2", True, '"'), ("KEY_6", True, "&"), ("KEY_7", True, "'"), ("KEY_8", True, "("),
    ("KEY_9", True, ")"), ("KEY_MINUS", False, "-"), ("KEY_MINUS", True, "="),
    ("KEY_EQUAL", False, "^"), ("KEY_EQUAL", True, "~"), ("KEY_YEN", False, "\\"),
    ("KEY_YEN", True, "|"), ("KEY_LEFTBRACE", False, "@"), ("KEY_LEFTBRACE", True, "`"),
    ("KEY_RIGHTBRACE", False, "["), ("KEY_RIGHTBRACE", True, "{"),
    ("KEY_SEMICOLON", False, ";"), ("KEY_SEMICOLON", True, "+"),
    ("KEY_APOSTROPHE", False, ":"), ("KEY_APOSTROPHE", True, "*"),
    ("KEY_BACKSLASH", False, "]"), ("KEY_BACKSLASH", True, "}"),
    ("KEY_RO", False, "\\"), ("KEY_RO", True, "_"), ("KEY_SLASH", True, "?"),
    ("KEY_COMMA", True, "<"), ("KEY_DOT", True, ">"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "shift", "char"), US_TABLE)
def test_us_symbols(key: str, shift: bool, char: str) -> None:
    assert one_char("us", key, shift) == char


@pytest.mark.parametrize(("key", "shift", "char"), JP106_TABLE)
def test_jp106_symbols(key: str, shift: bool, char: str) -> None:
    assert one_char("jp106", key, shift) == char


def test_jp106_keys_without_a_character_spoil_the_scan() -> None:
    # 半角/全角 sits where US has `; Shift+0 types nothing on a Japanese host
    for keys in (["KEY_GRAVE"], ["KEY_LEFTSHIFT", "KEY_0"]):
        k = Keys().tap("KEY_1")
        for name in keys:
            k.down(name)
        for name in reversed(keys):
            k.up(name)
        k.tap("KEY_2", "KEY_ENTER")
        [result] = run(k.events, "jp106")
        assert isinstance(result, Fault)
        assert "no character on jp106" in result.reason


def test_us_scanner_read_as_jp106_gives_the_trap_table() -> None:
    """FORMATS.md: a US-set scanner on a jp106 host types these instead."""
    sent = "@[]\\:'\"_=+&*("
    typed_by_jp106_host = "\"@[]+:*=^~'()"
    [result] = run(type_text(sent, "us"), "jp106")
    assert isinstance(result, Scan)
    assert result.text == typed_by_jp106_host
    # and ")" (Shift+0) has no character on jp106: a fault, not a wrong "~"
    [bad] = run(type_text("A)", "us"), "jp106")
    assert isinstance(bad, Fault)


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    layout=st.sampled_from(["us", "jp106"]),
    hold=st.booleans(),
)
def test_any_printable_ascii_round_trips(text: str, layout: str, hold: bool) -> None:
    results = run(type_text(text, layout, hold_shift=hold), layout)
    if text == "":
        assert results == []
    else:
        assert results == [Scan(text, results[0].started, results[0].ended, results[0].keys)]  # type: ignore[union-attr]


# -- modifiers -------------------------------------------------------------------------


def test_shift_held_across_characters_and_both_shifts() -> None:
    k = Keys().down("KEY_LEFTSHIFT").tap("KEY_A", "KEY_B")
    k.down("KEY_RIGHTSHIFT").up("KEY_LEFTSHIFT").tap("KEY_C", "KEY_2")  # right shift still down
    k.up("KEY_RIGHTSHIFT").tap("KEY_D", "KEY_2", "KEY_ENTER")
    assert [r.text for r in run(k.events) if isinstance(r, Scan)] == ["ABC@d2"]


def test_caps_lock_us_and_jp106() -> None:
    k = Keys().tap("KEY_CAPSLOCK", "KEY_A", "KEY_1")
    k.down("KEY_LEFTSHIFT").tap("KEY_B").up("KEY_LEFTSHIFT").tap(
        "KEY_CAPSLOCK", "KEY_C", "KEY_ENTER"
    )
    assert [r.text for r in run(k.events, "us") if isinstance(r, Scan)] == ["A1bc"]
    # jp106: the key alone is 英数 (no change); Shift+CapsLock toggles caps lock
    k = Keys().tap("KEY_CAPSLOCK", "KEY_A")
    k.down("KEY_LEFTSHIFT").tap("KEY_CAPSLOCK").up("KEY_LEFTSHIFT").tap("KEY_B", "KEY_ENTER")
    assert [r.text for r in run(k.events, "jp106") if isinstance(r, Scan)] == ["aB"]


def test_numpad_is_digits_and_kpenter_terminates() -> None:
    k = Keys().tap("KEY_NUMLOCK", "KEY_KP4", "KEY_KP9", "KEY_KPDOT", "KEY_KP0", "KEY_KPMINUS")
    k.tap("KEY_KPSLASH", "KEY_KPASTERISK", "KEY_KPPLUS", "KEY_KPENTER")
    assert [r.text for r in run(k.events, "jp106") if isinstance(r, Scan)] == ["49.0-/*+"]


def test_terminators_are_configurable() -> None:
    k = Keys().tap("KEY_1", "KEY_TAB", "KEY_2", "KEY_ENTER")
    assert [r.text for r in run(k.events) if isinstance(r, Scan)] == ["1\t2"]
    got = run(k.events, terminators=["KEY_TAB", "KEY_ENTER"])
    assert [r.text for r in got if isinstance(r, Scan)] == ["1", "2"]


# -- GS ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["us", "jp106"])
def test_gs_inside_a_gs1_code(layout: str) -> None:
    # (01) GTIN, (10) lot ABC1 ended by FNC1 = GS, (21) serial
    [scan] = run(type_text("0104912345678904" + "10ABC1" + GS + "21XYZ", layout), layout)
    assert isinstance(scan, Scan)
    assert scan.text == "010491234567890410ABC1\x1d21XYZ"


def test_ctrl_bracket_follows_the_scanner_layout() -> None:
    us = Keys().tap("KEY_1").down("KEY_LEFTCTRL").tap("KEY_RIGHTBRACE").up("KEY_LEFTCTRL")
    us.tap("KEY_2", "KEY_ENTER")
    assert [r.text for r in run(us.events, "us") if isinstance(r, Scan)] == ["1\x1d2"]
    # on jp106 that key is "[": Ctrl+[ is ESC, not a character a scan may hold
    [fault] = run(us.events, "jp106")
    assert isinstance(fault, Fault)
    assert "0x1B" in fault.reason
    jp = Keys().tap("KEY_1").down("KEY_RIGHTCTRL").tap("KEY_BACKSLASH").up("KEY_RIGHTCTRL")
    jp.tap("KEY_2", "KEY_ENTER")
    assert [r.text for r in run(jp.events, "jp106") if isinstance(r, Scan)] == ["1\x1d2"]


def test_ctrl_shift_bracket_is_still_gs() -> None:
    # shift still held from "A" when Ctrl+] comes: Ctrl+} is the same key, GS
    k = Keys().down("KEY_LEFTSHIFT").tap("KEY_A").down("KEY_LEFTCTRL").tap("KEY_RIGHTBRACE")
    k.up("KEY_LEFTCTRL").tap("KEY_B").up("KEY_LEFTSHIFT").tap("KEY_ENTER")
    assert [r.text for r in run(k.events, "us") if isinstance(r, Scan)] == ["A\x1dB"]


def test_configured_gs_keys_and_alt_codes() -> None:
    k = Keys().tap("KEY_1", "KEY_F8", "KEY_2")
    k.down("KEY_LEFTALT").tap("KEY_KP0", "KEY_KP0", "KEY_KP2", "KEY_KP9").up("KEY_LEFTALT")
    k.tap("KEY_3", "KEY_ENTER")
    got = run(k.events, gs_keys=["ctrl+]", "KEY_F8"])
    assert [r.text for r in got if isinstance(r, Scan)] == ["1\x1d2\x1d3"]
    [fault] = run(k.events)  # F8 is not GS unless configured
    assert isinstance(fault, Fault)
    assert "KEY_F8" in fault.reason


def test_parse_combo() -> None:
    assert parse_combo("ctrl+]", "jp106").code == KEYS["KEY_BACKSLASH"]
    assert parse_combo("ctrl+]", "us").code == KEYS["KEY_RIGHTBRACE"]
    assert parse_combo("ctrl+shift+KEY_6", "us").shift
    with pytest.raises(ValueError, match="unknown key"):
        parse_combo("ctrl+KEY_NOPE", "us")
    with pytest.raises(ValueError, match="no key types"):
        parse_combo("ctrl+é", "us")


# -- faults ----------------------------------------------------------------------


def test_read_cut_off_without_terminator() -> None:
    k = Keys().tap("KEY_1", "KEY_2", "KEY_3").wait(2.0).tap("KEY_4", "KEY_5", "KEY_ENTER")
    k.tap("KEY_6", "KEY_7")
    results = run(k.events, idle_timeout_ms=500)
    assert [type(r) for r in results] == [Fault, Scan, Fault]
    assert "scan cut off" in results[0].reason  # type: ignore[union-attr]
    assert results[1].text == "45"  # type: ignore[union-attr]
    assert "without a terminator" in results[2].reason  # type: ignore[union-attr]


def test_decoder_expire_is_what_the_driver_calls_on_silence() -> None:
    d = Decoder("us")
    for ev in Keys().tap("KEY_9", "KEY_8").events:
        assert d.feed(ev) == []
    assert d.pending
    fault = d.expire()
    assert isinstance(fault, Fault)
    assert not d.pending
    assert d.expire() is None
    # a lone lock key is not a cut-off scan
    for ev in Keys().tap("KEY_CAPSLOCK").events:
        d.feed(ev)
    assert d.expire() is None


def test_fault_reasons_never_carry_the_scanned_text() -> None:
    k = Keys().tap("KEY_7", "KEY_3", "KEY_5", "KEY_F5", "KEY_9", "KEY_ENTER")
    k.tap("KEY_8", "KEY_6", "KEY_4")
    faults = run(k.events)
    assert len(faults) == 2
    for f in faults:
        assert isinstance(f, Fault)
        assert not any(s in f.reason for s in ("735", "759", "864"))


def test_min_key_rate_rejects_human_typing() -> None:
    human = type_text("hello", "us", report_interval=0.15)
    scanner = type_text("hello", "us", start=2000.0, report_interval=0.004)
    results = run(human + scanner, min_key_rate=30)
    assert isinstance(results[0], Fault)
    assert "min_key_rate=30" in results[0].reason
    assert isinstance(results[1], Scan)
    assert results[1].text == "hello"


def test_syn_dropped_and_max_length_spoil_a_scan() -> None:
    evs = type_text("123", "us")
    dropped = [*evs[:3], KeyEvent(evs[3].time, EV_SYN, 3, 0), *evs[3:]]
    [f] = run(dropped)
    assert isinstance(f, Fault)
    assert "SYN_DROPPED" in f.reason
    [f] = run(type_text("1" * 40, "us"), max_length=32)
    assert isinstance(f, Fault)
    assert "max_length=32" in f.reason


def test_autorepeat_and_bare_enter_make_nothing() -> None:
    k = Keys().tap("KEY_ENTER")
    k.down("KEY_5")
    k.events.append(KeyEvent(k.t, EV_KEY, KEYS["KEY_5"], 2))  # kernel autorepeat
    k.up("KEY_5").tap("KEY_ENTER")
    assert [r.text for r in run(k.events) if isinstance(r, Scan)] == ["5"]


# -- evtest captures and hid-replay ------------------------------------------------

CAPTURED = [
    "111122410000012345",
    "]C101049123456789041726123110LOT-A1\x1d21SN42",
    "A-1/b_2:c@d[e]f\\g'h\"i=j+k&l*m(n)o!p#q$r%s^t~u`v|w{x}y<z>?,.;",
    "4901234567894",
]


@pytest.mark.parametrize(
    ("capture", "layout"), [("us-zebra-ds2208.txt", "us"), ("jp106-opticon.txt", "jp106")]
)
def test_evtest_captures_decode_exactly(capture: str, layout: str) -> None:
    lines = (DATA / capture).read_text().splitlines()
    results = list(decode(parse_evtest(lines), Decoder(layout)))
    assert [r.text for r in results if isinstance(r, Scan)] == CAPTURED
    assert not [r for r in results if isinstance(r, Fault)]


def test_parse_evtest_reads_msc_hex_syn_and_rejects_garbage() -> None:
    lines = [
        'Input device name: "x"',
        "Testing ... (interrupt to exit)",
        "Event: time 1700000000.123456, type 4 (EV_MSC), code 4 (MSC_SCAN), value 70004",
        "Event: time 1700000000.123456, type 1 (EV_KEY), code 30 (KEY_A), value 1",
        "Event: time 1700000000.123456, -------------- SYN_REPORT ------------",
        "Event: time 1700000000.130000, >>>>>>>>>>>>>> SYN_DROPPED <<<<<<<<<<<<",
    ]
    evs = list(parse_evtest(lines))
    assert [(e.type, e.code, e.value) for e in evs] == [
        (4, 4, 0x70004),
        (1, 30, 1),
        (0, 0, 0),
        (0, 3, 0),
    ]
    assert evs[0].time == pytest.approx(1700000000.123456)
    with pytest.raises(CaptureError, match="line 3"):
        list(parse_evtest([*lines[:2], "Event: time 1.0, something else", lines[2]]))
    # a capture stopped with Ctrl-C may end in half a line: that line is dropped
    assert len(list(parse_evtest([*lines, "Event: time 1700000000.2, type 1 (EV_K"]))) == 4


def out_lines(out: str) -> list[str]:
    """One scan per "\n" line (str.splitlines() would also split at GS, 0x1D)."""
    assert out.endswith("\n") or out == ""
    return out.split("\n")[:-1]


def test_hid_replay_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hid-replay", str(DATA / "jp106-opticon.txt"), "--layout", "jp106"]) == 0
    assert out_lines(capsys.readouterr().out) == CAPTURED
    # the same capture read with the wrong layout: wrong symbols faulted or changed, exit 1
    assert main(["hid-replay", str(DATA / "jp106-opticon.txt"), "--layout", "us"]) == 1
    out, err = capsys.readouterr()
    assert out_lines(out) == ["111122410000012345", "4901234567894"]
    assert err.count("hid-replay:") == 2
    assert (
        main(["hid-replay", str(DATA / "numpad-altcode.txt"), "--layout", "us", "--show-control"])
        == 0
    )
    assert out_lines(capsys.readouterr().out) == ["4901234567894", "010491234567890410ab<GS>217"]


def test_hid_replay_cli_faults_and_terminator(capsys: pytest.CaptureFixture[str]) -> None:
    cut = str(DATA / "us-cutoff.txt")
    assert main(["hid-replay", cut, "--layout", "us"]) == 1
    out, err = capsys.readouterr()
    assert out == "4901234567894\n"
    assert "scan cut off" in err and "without a terminator" in err
    human = str(DATA / "us-human-typing.txt")
    assert main(["hid-replay", human, "--layout", "us", "--min-key-rate", "30"]) == 1
    out, err = capsys.readouterr()
    assert out == "4901234567894\n" and "person at a keyboard" in err
    # KEY_KPENTER is not a terminator when only KEY_ENTER is asked for
    numpad = str(DATA / "numpad-altcode.txt")
    assert main(["hid-replay", numpad, "--layout", "us", "--terminator", "KEY_ENTER"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "scan cut off (and key KEY_KPENTER has no character on us)" in err
    assert main(["hid-replay", str(DATA / "missing.txt"), "--layout", "us"]) == 2


def test_hid_replay_as_a_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "hid-replay", "-", "--layout", "us"],
        input=(DATA / "us-zebra-ds2208.txt").read_text(),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out_lines(done.stdout) == CAPTURED
