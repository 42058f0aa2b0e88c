"""Keyboard-wedge decoding: Linux key events in, scanned text out. Pure, no I/O.

A scanner in USB keyboard mode "types" each code as key presses laid out for
the keyboard layout *the scanner is set to*. Decoding those key codes with the
same layout (not the host's) gives back exactly the text in the barcode, and
reading the device through evdev with a grab keeps it out of the kiosk's
focused text field. One `Decoder` per device: modifier state is per device.

What the state machine follows:
- key-down events only (value 1); releases matter only for modifiers, autorepeat
  (value 2) is ignored;
- both shifts (either one held = shifted, across any number of characters),
  caps lock (letters only; on jp106 the key alone is 英数, Shift+CapsLock toggles,
  as on a Japanese Windows host), the numpad (always digits: a scanner means digits);
- Ctrl+<char> as an ASCII control code (Ctrl+] = GS 0x1D), extra configurable
  combinations for GS (`gs_keys`), and Alt+numpad codes (Alt+0029 = GS);
- terminator keys end a scan; a scan that stops without one for `idle_timeout_ms`
  is a `Fault`, never a record; an optional `min_key_rate` rejects human typing;
- any key the layout has no character for (F-keys, arrows, 半角/全角 ...) spoils
  the scan: the whole scan becomes a `Fault`, so wrong text is never recorded.

Fault reasons never contain the scanned text (it may be personal data).

Also here: `parse_evtest()`, which reads the text `evtest` prints, so captures
made at a site replay through the same decoder (`madoguchi hid-replay`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from agent.contract.text import forbidden_controls
from agent.errors import CaptureError

# -- Linux input event codes (include/uapi/linux/input-event-codes.h) ---------------

EV_SYN, EV_KEY, EV_MSC, EV_LED = 0, 1, 4, 17
SYN_REPORT, SYN_DROPPED = 0, 3
LED_NUML, LED_CAPSL = 0, 1

#: key name -> code, for every key the decoder knows by name
KEYS: dict[str, int] = {
    "KEY_ESC": 1,
    **{f"KEY_{d}": 1 + int(d) for d in "123456789"},
    "KEY_0": 11,
    "KEY_MINUS": 12,
    "KEY_EQUAL": 13,
    "KEY_BACKSPACE": 14,
    "KEY_TAB": 15,
    **{f"KEY_{c}": 16 + i for i, c in enumerate("QWERTYUIOP")},
    "KEY_LEFTBRACE": 26,
    "KEY_RIGHTBRACE": 27,
    "KEY_ENTER": 28,
    "KEY_LEFTCTRL": 29,
    **{f"KEY_{c}": 30 + i for i, c in enumerate("ASDFGHJKL")},
    "KEY_SEMICOLON": 39,
    "KEY_APOSTROPHE": 40,
    "KEY_GRAVE": 41,
    "KEY_LEFTSHIFT": 42,
    "KEY_BACKSLASH": 43,
    **{f"KEY_{c}": 44 + i for i, c in enumerate("ZXCVBNM")},
    "KEY_COMMA": 51,
    "KEY_DOT": 52,
    "KEY_SLASH": 53,
    "KEY_RIGHTSHIFT": 54,
    "KEY_KPASTERISK": 55,
    "KEY_LEFTALT": 56,
    "KEY_SPACE": 57,
    "KEY_CAPSLOCK": 58,
    **{f"KEY_F{n}": 58 + n for n in range(1, 11)},
    "KEY_NUMLOCK": 69,
    "KEY_SCROLLLOCK": 70,
    "KEY_KP7": 71,
    "KEY_KP8": 72,
    "KEY_KP9": 73,
    "KEY_KPMINUS": 74,
    "KEY_KP4": 75,
    "KEY_KP5": 76,
    "KEY_KP6": 77,
    "KEY_KPPLUS": 78,
    "KEY_KP1": 79,
    "KEY_KP2": 80,
    "KEY_KP3": 81,
    "KEY_KP0": 82,
    "KEY_KPDOT": 83,
    "KEY_ZENKAKUHANKAKU": 85,
    "KEY_102ND": 86,
    "KEY_F11": 87,
    "KEY_F12": 88,
    "KEY_RO": 89,
    "KEY_KATAKANA": 90,
    "KEY_HIRAGANA": 91,
    "KEY_HENKAN": 92,
    "KEY_KATAKANAHIRAGANA": 93,
    "KEY_MUHENKAN": 94,
    "KEY_KPJPCOMMA": 95,
    "KEY_KPENTER": 96,
    "KEY_RIGHTCTRL": 97,
    "KEY_KPSLASH": 98,
    "KEY_SYSRQ": 99,
    "KEY_RIGHTALT": 100,
    "KEY_HOME": 102,
    "KEY_UP": 103,
    "KEY_PAGEUP": 104,
    "KEY_LEFT": 105,
    "KEY_RIGHT": 106,
    "KEY_END": 107,
    "KEY_DOWN": 108,
    "KEY_PAGEDOWN": 109,
    "KEY_INSERT": 110,
    "KEY_DELETE": 111,
    "KEY_KPEQUAL": 117,
    "KEY_KPCOMMA": 121,
    "KEY_YEN": 124,
    "KEY_LEFTMETA": 125,
    "KEY_RIGHTMETA": 126,
    "KEY_COMPOSE": 127,
}
KEY_NAMES: dict[int, str] = {code: name for name, code in KEYS.items()}

K = KEYS
SHIFTS = frozenset({K["KEY_LEFTSHIFT"], K["KEY_RIGHTSHIFT"]})
CTRLS = frozenset({K["KEY_LEFTCTRL"], K["KEY_RIGHTCTRL"]})
ALTS = frozenset({K["KEY_LEFTALT"], K["KEY_RIGHTALT"]})
METAS = frozenset({K["KEY_LEFTMETA"], K["KEY_RIGHTMETA"]})
MODIFIERS = SHIFTS | CTRLS | ALTS | METAS
#: lock keys that carry no character; caps lock is handled, num lock is irrelevant
#: (numpad keys always mean digits from a scanner), scroll lock is noise
LOCKS = frozenset({K["KEY_CAPSLOCK"], K["KEY_NUMLOCK"], K["KEY_SCROLLLOCK"]})

#: numpad -> character, the same on every layout
NUMPAD: dict[int, str] = {
    **{K[f"KEY_KP{d}"]: d for d in "0123456789"},
    K["KEY_KPDOT"]: ".",
    K["KEY_KPSLASH"]: "/",
    K["KEY_KPASTERISK"]: "*",
    K["KEY_KPMINUS"]: "-",
    K["KEY_KPPLUS"]: "+",
    K["KEY_KPEQUAL"]: "=",
    K["KEY_KPCOMMA"]: ",",
    K["KEY_KPJPCOMMA"]: ",",
}
NUMPAD_DIGITS: dict[int, int] = {K[f"KEY_KP{d}"]: int(d) for d in "0123456789"}

# -- layouts: key code -> (unshifted, shifted); None = no character -----------------

Level = tuple[str | None, str | None]


def _letters() -> dict[int, Level]:
    return {K[f"KEY_{c}"]: (c.lower(), c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def _row(keys: str, pairs: Iterable[Level]) -> dict[int, Level]:
    return {K[name]: pair for name, pair in zip(keys.split(), pairs, strict=True)}


_DIGIT_KEYS = "KEY_1 KEY_2 KEY_3 KEY_4 KEY_5 KEY_6 KEY_7 KEY_8 KEY_9 KEY_0"

#: US 104-key (ANSI)
US: dict[int, Level] = {
    **_letters(),
    **_row(_DIGIT_KEYS, zip("1234567890", "!@#$%^&*()", strict=True)),
    **_row(
        "KEY_MINUS KEY_EQUAL KEY_LEFTBRACE KEY_RIGHTBRACE KEY_SEMICOLON KEY_APOSTROPHE "
        "KEY_GRAVE KEY_BACKSLASH KEY_COMMA KEY_DOT KEY_SLASH KEY_SPACE",
        zip("-=[];'`\\,./ ", '_+{}:"~|<>? ', strict=True),
    ),
}

#: Japanese 106/109-key (JIS), as xkeyboard-config's symbols/jp and a Japanese
#: Windows host map it. Position differences from US: Shift+2 is `"`, Shift+6..9
#: are `&'()`, `-=` / `^~` / `\|` (KEY_YEN) on the top row, `@`` and `[{` right of P,
#: `;+` `:*` `]}` (KEY_BACKSLASH) on the home row, `\_` (KEY_RO) left of right shift.
#: KEY_GRAVE is 半角/全角 (IME toggle) and has no character. Shift+0 has none on
#: Windows and OADG 109A (xkb's jp(106) gives `~`): left unmapped, so a US-set
#: scanner decoded as jp106 faults instead of recording a wrong `~`.
JP106: dict[int, Level] = {
    **_letters(),
    **_row(_DIGIT_KEYS, [*zip("123456789", "!\"#$%&'()", strict=True), ("0", None)]),
    **_row(
        "KEY_MINUS KEY_EQUAL KEY_YEN KEY_LEFTBRACE KEY_RIGHTBRACE KEY_SEMICOLON "
        "KEY_APOSTROPHE KEY_BACKSLASH KEY_COMMA KEY_DOT KEY_SLASH KEY_RO KEY_SPACE",
        zip("-^\\@[;:],./\\ ", "=~|`{+*}<>?_ ", strict=True),
    ),
}

LAYOUTS: dict[str, dict[int, Level]] = {"us": US, "jp106": JP106}

#: the keys that end a scan unless configured otherwise
DEFAULT_TERMINATORS = ("KEY_ENTER", "KEY_KPENTER")
#: the combinations that mean GS unless configured otherwise
DEFAULT_GS_KEYS = ("ctrl+]",)

GS = "\x1d"


# -- combinations ("ctrl+]", "ctrl+shift+KEY_6", "KEY_F8") ---------------------------


@dataclass(frozen=True, slots=True)
class Combo:
    """A key with an exact set of modifiers held."""

    code: int
    ctrl: bool = False
    shift: bool = False
    alt: bool = False


_MOD_NAMES = ("ctrl", "shift", "alt")


def parse_combo(spec: str, layout: str) -> Combo:
    """`ctrl+]` (a character, found on `layout`), `ctrl+KEY_RIGHTBRACE`, `KEY_F8`.

    Raises ValueError naming what is wrong.
    """
    parts = spec.split("+")
    if spec.endswith("++"):  # "ctrl++": the character "+"
        parts = [*parts[:-2], "+"]
    *mods, key = parts
    unknown = [m for m in mods if m.lower() not in _MOD_NAMES]
    if unknown or not key:
        raise ValueError(f"'{spec}': write modifiers (ctrl, shift, alt) then one key, '+'-joined")
    want = {m.lower() for m in mods}
    shift = "shift" in want
    if key.upper().startswith("KEY_"):
        code = KEYS.get(key.upper())
        if code is None:
            raise ValueError(f"'{spec}': unknown key name {key}")
    elif len(key) == 1:
        found = find_char(key, layout)
        if found is None:
            raise ValueError(f"'{spec}': no key types '{key}' on the {layout} layout")
        code, shift = found[0], shift or found[1]
    else:
        raise ValueError(f"'{spec}': the key is a single character or a KEY_ name")
    return Combo(code=code, ctrl="ctrl" in want, shift=shift, alt="alt" in want)


def find_char(char: str, layout: str) -> tuple[int, bool] | None:
    """(key code, shift needed) that types `char` on `layout`, main block first."""
    table = LAYOUTS[layout]
    for code in sorted(table):
        lower, upper = table[code]
        if lower == char:
            return code, False
        if upper == char:
            return code, True
    return None


def key_code(name: str) -> int:
    """`KEY_ENTER` -> 28; ValueError for a name the decoder does not know."""
    code = KEYS.get(name.upper())
    if code is None:
        raise ValueError(f"unknown key name {name}")
    return code


# -- events and results ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One input event: `time` in seconds (evdev's timestamp), type, code, value."""

    time: float
    type: int
    code: int
    value: int


@dataclass(frozen=True, slots=True)
class Scan:
    """A complete scan: the text (terminator stripped) and its key timing."""

    text: str
    started: float
    ended: float
    keys: int


@dataclass(frozen=True, slots=True)
class Fault:
    """A scan that must not become a record. `reason` never holds scanned text."""

    reason: str
    started: float | None = None
    ended: float | None = None


Result = Scan | Fault


class Decoder:
    """The per-device state machine. `feed()` events, get `Scan`s and `Fault`s."""

    def __init__(
        self,
        layout: str = "us",
        *,
        terminators: Iterable[str] = DEFAULT_TERMINATORS,
        gs_keys: Iterable[str] = DEFAULT_GS_KEYS,
        idle_timeout_ms: float = 500.0,
        min_key_rate: float | None = None,
        alt_codes: bool = True,
        max_length: int = 4096,
        caps_lock: bool = False,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout '{layout}' (one of {', '.join(LAYOUTS)})")
        self.layout = layout
        self._table = LAYOUTS[layout]
        self._terminators = frozenset(key_code(t) for t in terminators)
        self._gs = frozenset(parse_combo(s, layout) for s in gs_keys)
        self._idle_s = idle_timeout_ms / 1000.0
        self._min_rate = min_key_rate
        self._alt_codes = alt_codes
        self._max_length = max_length
        self.caps_lock = caps_lock
        self._held: set[int] = set()
        self._alt_digits = ""
        self._reset_scan()

    # -- state ---------------------------------------------------------------------

    def _reset_scan(self) -> None:
        self._chars: list[str] = []
        self._keys = 0
        self._first: float | None = None
        self._last: float | None = None
        self._spoiled: str | None = None

    @property
    def pending(self) -> bool:
        """Keys of an unfinished scan are buffered."""
        return self._first is not None

    @property
    def idle_timeout_s(self) -> float:
        return self._idle_s

    def sync_keys(self, pressed: Iterable[int]) -> None:
        """Take the held keys from the device (after SYN_DROPPED or at open)."""
        self._held = {c for c in pressed if c in MODIFIERS}

    def _shift(self) -> bool:
        return bool(self._held & SHIFTS)

    def _ctrl(self) -> bool:
        return bool(self._held & CTRLS)

    def _alt(self) -> bool:
        return bool(self._held & ALTS)

    # -- input ---------------------------------------------------------------------

    def feed(self, ev: KeyEvent) -> list[Result]:
        """One event in; the scans or faults it completed out (usually none)."""
        out: list[Result] = []
        if ev.type == EV_SYN:
            if ev.code == SYN_DROPPED:
                self._spoil(ev.time, "the kernel dropped input events (SYN_DROPPED)")
            return out
        if ev.type == EV_LED:
            if ev.code == LED_CAPSL:
                self.caps_lock = bool(ev.value)
            return out
        if ev.type != EV_KEY:
            return out  # EV_MSC scan codes and the rest carry nothing we need
        if self.pending and self._last is not None and ev.time - self._last > self._idle_s:
            expired = self.expire()
            if expired is not None:
                out.append(expired)
        code, value = ev.code, ev.value
        if code in MODIFIERS:
            if value == 1:
                self._held.add(code)
            elif value == 0:
                self._held.discard(code)
                if code in ALTS and not self._alt():
                    self._end_alt_code(ev.time)
            return out
        if value != 1:
            return out  # key up, autorepeat
        self._touch(ev.time)
        if code in LOCKS:
            if code == K["KEY_CAPSLOCK"] and (self.layout != "jp106" or self._shift()):
                self.caps_lock = not self.caps_lock
            return out
        if self._alt() and self._alt_codes and code in NUMPAD_DIGITS:
            self._alt_digits += str(NUMPAD_DIGITS[code])
            return out
        combo = Combo(code, ctrl=self._ctrl(), shift=self._shift(), alt=self._alt())
        if combo in self._gs:
            self._add(GS, ev.time)
            return out
        if code in self._terminators and not (combo.ctrl or combo.alt):
            result = self._finish(ev.time)
            if result is not None:
                out.append(result)
            return out
        char = self._char(code)
        if char is None:
            why = f"key {_name(code)}{_mods(combo)} has no character on {self.layout}"
            self._spoil(ev.time, why)
        else:
            self._add(char, ev.time)
        return out

    def _touch(self, t: float) -> None:
        if self._first is None:
            self._first = t
        self._last = t
        self._keys += 1

    def _char(self, code: int) -> str | None:
        if code in NUMPAD:
            return None if (self._ctrl() or self._alt()) else NUMPAD[code]
        if code == K["KEY_TAB"]:
            return None if (self._ctrl() or self._alt()) else "\t"
        level = self._table.get(code)
        if level is None or self._alt():
            return None
        shifted = self._shift()
        lower = level[0]
        if self.caps_lock and lower is not None and lower.isalpha():
            shifted = not shifted
        char = level[1] if shifted else level[0]
        if not self._ctrl():
            return char
        # Ctrl+@ .. Ctrl+_ are NUL .. US (Ctrl+] is GS, Ctrl+^ is RS); a shift still
        # held from the previous character does not change which key it is
        for c in (char, level[0], level[1]):
            if c is not None and "@" <= c.upper() <= "_":
                return chr(ord(c.upper()) - 0x40)
        return None

    def _add(self, char: str, t: float) -> None:
        if self._first is None:
            self._touch(t)
        if len(self._chars) >= self._max_length:
            self._spoil(t, f"longer than max_length={self._max_length}")
            return
        self._chars.append(char)

    def _spoil(self, t: float, reason: str) -> None:
        if self._first is None:
            self._first = self._last = t
        if self._spoiled is None:
            self._spoiled = reason

    def _end_alt_code(self, t: float) -> None:
        digits, self._alt_digits = self._alt_digits, ""
        if not digits:
            return
        value = int(digits)
        if value > 255:
            self._spoil(t, f"Alt+numpad code {value} is not a byte")
        elif value < 128:
            self._add(chr(value), t)
        else:  # Windows: a leading 0 selects the ANSI code page, else the OEM one
            page = "cp1252" if digits[0] == "0" else "cp437"
            self._add(bytes([value]).decode(page, "replace"), t)

    def _finish(self, t: float) -> Result | None:
        chars, keys, first, spoiled = self._chars, self._keys, self._first, self._spoiled
        self._reset_scan()
        if first is None or (not chars and spoiled is None):
            return None  # a bare terminator: nothing was scanned
        if spoiled is not None:
            return Fault(f"{spoiled}; scan of {keys} key(s) dropped", first, t)
        text = "".join(chars)
        bad = forbidden_controls(text)
        if bad:
            names = ", ".join(sorted({f"0x{ord(c):02X}" for c in bad}))
            return Fault(f"control character(s) {names} in a scan of {len(text)} chars", first, t)
        if self._min_rate is not None and keys >= 3 and t > first:
            rate = (keys - 1) / (t - first)
            if rate < self._min_rate:
                return Fault(
                    f"typed at {rate:.1f} keys/s, below min_key_rate={self._min_rate:g}: "
                    "a person at a keyboard, not a scanner",
                    first,
                    t,
                )
        return Scan(text=text, started=first, ended=t, keys=keys)

    def expire(self) -> Fault | None:
        """The idle timeout passed: an unfinished scan is a fault, not a record."""
        if not self.pending:
            return None
        first, last, n, spoiled = self._first, self._last, len(self._chars), self._spoiled
        empty = n == 0 and spoiled is None and not self._alt_digits
        self._reset_scan()
        self._alt_digits = ""
        if empty:
            return None  # a lone lock or modifier key, nothing was typed
        also = f" (and {spoiled})" if spoiled else ""
        return Fault(
            f"no terminator within idle_timeout_ms={self._idle_s * 1000:g} "
            f"after {n} char(s): scan cut off{also}",
            first,
            last,
        )

    def finish(self) -> Fault | None:
        """End of input (end of a capture, device gone): an open scan is a fault."""
        if not self.pending:
            return None
        first, last, n = self._first, self._last, len(self._chars)
        empty = n == 0 and self._spoiled is None and not self._alt_digits
        self._reset_scan()
        self._alt_digits = ""
        if empty:
            return None
        return Fault(f"input ended without a terminator after {n} char(s)", first, last)


def _name(code: int) -> str:
    return KEY_NAMES.get(code, f"code {code}")


def _mods(c: Combo) -> str:
    mods = [m for m, on in (("ctrl", c.ctrl), ("shift", c.shift), ("alt", c.alt)) if on]
    return f" (with {'+'.join(mods)})" if mods else ""


def decode(events: Iterable[KeyEvent], decoder: Decoder) -> Iterator[Result]:
    """Run a whole recorded stream through `decoder`, flushing an open scan at the end."""
    for ev in events:
        yield from decoder.feed(ev)
    tail = decoder.finish()
    if tail is not None:
        yield tail


# -- evtest captures -------------------------------------------------------------

# Bounded, ASCII-only fields: a 400-digit timestamp or a 1,000-character value is not
# something evtest prints (and would overflow a float), so it is a malformed line.
_EVENT = re.compile(
    r"^Event: time (?P<sec>[0-9]{1,12})\.(?P<usec>[0-9]{1,9}), "
    r"type (?P<type>[0-9]{1,5}) \([^)]{0,64}\), code (?P<code>[0-9]{1,5}) \([^)]{0,64}\), "
    r"value (?P<value>-?[0-9a-fA-F]{1,16})$",
    re.ASCII,
)
_SYN = re.compile(
    r"^Event: time (?P<sec>[0-9]{1,12})\.(?P<usec>[0-9]{1,9}), [-+>]{14} "
    r"(?P<what>[A-Za-z_ ]{1,32}?) [-+<]{12}$",
    re.ASCII,
)
_SYN_CODES = {
    "SYN_REPORT": 0,
    "Report Sync": 0,
    "SYN_CONFIG": 1,
    "Config Sync": 1,
    "SYN_MT_REPORT": 2,
    "SYN_DROPPED": 3,
}


def parse_evtest(lines: Iterable[str]) -> Iterator[KeyEvent]:
    """Events from `evtest` output; the header (device info, supported events) is skipped.

    evtest prints MSC_SCAN / MSC_RAW values in hex and every other value in decimal.
    A malformed line is a `CaptureError`, except a last line cut short (Ctrl-C).
    """
    started = False
    bad: int | None = None
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if bad is not None:
            raise CaptureError(f"line {bad}: not an evtest event line")
        if not line.startswith("Event: time "):
            if started and not line.startswith("Testing"):
                bad = n
            continue
        started = True
        event = _event_line(line)
        if event is None:
            bad = n
        else:
            yield event


def _event_line(line: str) -> KeyEvent | None:
    m = _EVENT.match(line)
    if m is not None:
        etype, code = int(m["type"]), int(m["code"])
        hexa = etype == EV_MSC and code in (3, 4)  # MSC_RAW, MSC_SCAN
        try:
            value = int(m["value"], 16 if hexa else 10)
        except ValueError:
            return None  # hex digits where evtest prints decimal, e.g. EV_KEY value 1b6
        return KeyEvent(_time(m["sec"], m["usec"]), etype, code, value)
    s = _SYN.match(line)
    if s is not None and s["what"].strip() in _SYN_CODES:
        return KeyEvent(_time(s["sec"], s["usec"]), EV_SYN, _SYN_CODES[s["what"].strip()], 0)
    return None


def _time(sec: str, usec: str) -> float:
    return int(sec) + int(usec.ljust(6, "0")[:6]) / 1e6


# -- making captures (tests, docs, the bench) --------------------------------------


#: Linux key code -> HID keyboard usage (page 7), for MSC_SCAN lines as usbhid reports them
HID_USAGE: dict[int, int] = {
    **{K[f"KEY_{c}"]: 0x04 + i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")},
    **{K[f"KEY_{d}"]: 0x1E + i for i, d in enumerate("1234567890")},
    **{
        K[name]: usage
        for name, usage in (
            ("KEY_ENTER", 0x28),
            ("KEY_ESC", 0x29),
            ("KEY_BACKSPACE", 0x2A),
            ("KEY_TAB", 0x2B),
            ("KEY_SPACE", 0x2C),
            ("KEY_MINUS", 0x2D),
            ("KEY_EQUAL", 0x2E),
            ("KEY_LEFTBRACE", 0x2F),
            ("KEY_RIGHTBRACE", 0x30),
            ("KEY_BACKSLASH", 0x31),
            ("KEY_SEMICOLON", 0x33),
            ("KEY_APOSTROPHE", 0x34),
            ("KEY_GRAVE", 0x35),
            ("KEY_COMMA", 0x36),
            ("KEY_DOT", 0x37),
            ("KEY_SLASH", 0x38),
            ("KEY_CAPSLOCK", 0x39),
            ("KEY_KPSLASH", 0x54),
            ("KEY_KPASTERISK", 0x55),
            ("KEY_KPMINUS", 0x56),
            ("KEY_KPPLUS", 0x57),
            ("KEY_KPENTER", 0x58),
            ("KEY_KPDOT", 0x63),
            ("KEY_RO", 0x87),
            ("KEY_KATAKANAHIRAGANA", 0x88),
            ("KEY_YEN", 0x89),
            ("KEY_HENKAN", 0x8A),
            ("KEY_MUHENKAN", 0x8B),
            ("KEY_LEFTCTRL", 0xE0),
            ("KEY_LEFTSHIFT", 0xE1),
            ("KEY_LEFTALT", 0xE2),
            ("KEY_LEFTMETA", 0xE3),
            ("KEY_RIGHTCTRL", 0xE4),
            ("KEY_RIGHTSHIFT", 0xE5),
            ("KEY_RIGHTALT", 0xE6),
            ("KEY_RIGHTMETA", 0xE7),
        )
    },
    **{K[f"KEY_KP{d}"]: 0x59 + i for i, d in enumerate("123456789")},
    K["KEY_KP0"]: 0x62,
}


def type_text(
    text: str,
    layout: str = "us",
    *,
    start: float = 1_700_000_000.0,
    report_interval: float = 0.002,
    terminator: str | None = "KEY_ENTER",
    shift_key: str = "KEY_LEFTSHIFT",
    hold_shift: bool = True,
) -> list[KeyEvent]:
    """The events the kernel makes of a scanner set to `layout` typing `text`.

    Shaped like usbhid's output: one HID report per key press and per release,
    each an MSC_SCAN + EV_KEY pair per changed key and a SYN_REPORT. GS is sent
    as Ctrl+]. With `hold_shift` the shift bit stays set across consecutive
    shifted characters (many scanners do this); otherwise it goes up with each key.
    """
    events: list[KeyEvent] = []
    t_us, step_us = round(start * 1e6), round(report_interval * 1e6)
    shift, ctrl = KEYS[shift_key], KEYS["KEY_LEFTCTRL"]
    mods: set[int] = set()

    def report(changes: list[tuple[int, int]]) -> None:
        nonlocal t_us
        t = t_us / 1e6
        for code, value in changes:
            usage = HID_USAGE.get(code, 0)
            if code == KEYS["KEY_BACKSLASH"] and layout == "jp106":
                usage = 0x32  # the JIS ]} key is "Non-US #"
            events.append(KeyEvent(t, EV_MSC, 4, 0x70000 | usage))
            events.append(KeyEvent(t, EV_KEY, code, value))
        events.append(KeyEvent(t, EV_SYN, SYN_REPORT, 0))
        t_us += step_us

    def strokes() -> Iterator[tuple[int, set[int]]]:
        for ch in text:
            if ch == GS:
                found = find_char("]", layout)
                assert found is not None
                yield found[0], {ctrl}
            elif ch == "\t":
                yield KEYS["KEY_TAB"], set()
            else:
                spot = find_char(ch, layout)
                if spot is None:
                    raise ValueError(f"the {layout} layout has no key for {ch!r}")
                yield spot[0], {shift} if spot[1] else set()
        if terminator is not None:
            yield KEYS[terminator], set()

    keys = list(strokes())
    for i, (code, want) in enumerate(keys):
        press = [(m, 1) for m in sorted(want - mods)] + [(m, 0) for m in sorted(mods - want)]
        mods = set(want)
        report([*press, (code, 1)])
        following = keys[i + 1][1] if i + 1 < len(keys) else set()
        keep = mods & following if hold_shift else set()
        release = [(m, 0) for m in sorted(mods - keep)]
        mods = keep
        report([*release, (code, 0)])
    return events


def format_evtest(events: Iterable[KeyEvent]) -> str:
    """Event lines exactly as evtest prints them (names from our table)."""
    out = []
    for ev in events:
        sec, usec = divmod(round(ev.time * 1e6), 1_000_000)
        stamp = f"Event: time {sec}.{usec:06d}, "
        if ev.type == EV_SYN:
            name = {0: "SYN_REPORT", 1: "SYN_CONFIG", 2: "SYN_MT_REPORT", 3: "SYN_DROPPED"}
            left, right = {2: ("+", "+"), 3: (">", "<")}.get(ev.code, ("-", "-"))
            out.append(f"{stamp}{left * 14} {name.get(ev.code, '?')} {right * 12}")
        elif ev.type == EV_MSC:
            out.append(f"{stamp}type 4 (EV_MSC), code {ev.code} (MSC_SCAN), value {ev.value:02x}")
        elif ev.type == EV_KEY:
            out.append(
                f"{stamp}type 1 (EV_KEY), code {ev.code} ({_name(ev.code)}), value {ev.value}"
            )
        elif ev.type == EV_LED:
            led = {0: "LED_NUML", 1: "LED_CAPSL"}.get(ev.code, "?")
            out.append(f"{stamp}type 17 (EV_LED), code {ev.code} ({led}), value {ev.value}")
    return "\n".join(out) + "\n"
