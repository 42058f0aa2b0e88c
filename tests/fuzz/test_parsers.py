"""Every parser of outside input, fed anything, raises only its documented error.

Issue #15 point 9. One test per parser: the config loader (ConfigError), the evtest
capture parser (CaptureError), the HID decoder and the serial framing (nothing: bad
input is a Fault / ReadFault), the ack and command parsers (MessageError), the blob
missing-chunk request handler (nothing), and interpretation (nothing: a result for
every text). The example count comes from tests/fuzz/_budget.py (`make fuzz`: 200,000
each); an input that takes over 100 ms of CPU fails as well (tests/fuzz/_budget.py).
"""

from __future__ import annotations

import json
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.config import SerialDevice, load_config
from agent.contract.messages import MessageError, load_object, parse_ack, parse_command
from agent.contract.topics import DEFAULT_PREFIX, Topics
from agent.drivers.serial import LineFramer, SerialDriver
from agent.errors import CaptureError, ConfigError
from agent.interpret import interpret
from agent.keymap import KEYS, LAYOUTS, Decoder, Fault, KeyEvent, Scan, parse_evtest
from agent.station.blobs import BlobSender, BlobStore
from tests.fuzz._budget import FUZZ, budgeted

# -- the config loader -------------------------------------------------------------------

_KEYS = {
    "agent": ["site", "name", "data_dir", "profile_dirs", "log_level", "telemetry_interval_s"],
    "mqtt": ["host", "port", "protocol", "keepalive_s", "max_inbound_bytes", "tls_ca"],
    "outbox": ["max_bytes", "resend_after_s", "retention_days", "key_file"],
    "api": ["enabled", "host", "port", "manual_device", "token_file", "unix_socket"],
    "devices": ["name", "profile", "port", "driver", "terminator", "encoding", "host_ack"],
}
_scalar = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=12),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["s", "a", "127.0.0.1", "generic-serial-scanner", "/tmp/x", "\r", "あ"]),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def _config_text(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for section, keys in _KEYS.items():
        if not draw(st.booleans()):
            continue
        lines.append("[[devices]]" if section == "devices" else f"[{section}]")
        for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml_value(draw(_value))}")
    return "\n".join(lines) + "\n"


_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="madoguchi-fuzz-config-"))
_config_input = st.one_of(
    _config_text().map(str.encode),
    st.binary(max_size=200),
)


@FUZZ
@given(_config_input)
@budgeted
def test_config_loader_raises_only_config_error(text: bytes) -> None:
    path = _CONFIG_DIR / "agent.toml"  # one file, rewritten: a directory per input is slow
    path.write_bytes(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert e.problems and all(p.startswith(str(path)) for p in e.problems), e.problems


# -- evtest captures ---------------------------------------------------------------------

_digits = st.text(alphabet="0123456789", min_size=1, max_size=20) | st.text(max_size=5)
_hexish = st.text(alphabet="0123456789abcdefABCDEF-", min_size=1, max_size=20) | st.text(max_size=5)


@st.composite
def _evtest_line(draw: st.DrawFn) -> str:
    form = draw(st.integers(0, 3))
    sec, usec = draw(_digits), draw(_digits)
    if form == 0:
        return (
            f"Event: time {sec}.{usec}, type {draw(_digits)} (EV_KEY), "
            f"code {draw(_digits)} (KEY_A), value {draw(_hexish)}"
        )
    if form == 1:
        what = draw(st.sampled_from(["SYN_REPORT", "Report Sync", "SYN_DROPPED", "X"]))
        return f"Event: time {sec}.{usec}, -------------- {what} ------------"
    if form == 2:
        return draw(st.sampled_from(["Testing ... (interrupt to exit)", "Input driver version"]))
    return draw(st.text(max_size=80))


@FUZZ
@given(st.lists(_evtest_line(), max_size=12))
@budgeted
def test_evtest_parser_raises_only_capture_error(lines: list[str]) -> None:
    try:
        events = list(parse_evtest(lines))
    except CaptureError as e:
        assert str(e).startswith("line ")
        return
    assert all(isinstance(ev, KeyEvent) for ev in events)


# -- the HID decoder -------------------------------------------------------------------

_codes = st.one_of(st.sampled_from(sorted(KEYS.values())), st.integers(-5, 0x300))
_events = st.builds(
    KeyEvent,
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
    st.sampled_from([0, 1, 4]) | st.integers(-1, 40),
    _codes,
    st.sampled_from([0, 1, 2]) | st.integers(-(2**31), 2**31),
)


@FUZZ
@given(
    st.sampled_from(sorted(LAYOUTS)),
    st.booleans(),
    st.integers(1, 64),
    st.lists(_events, max_size=60),
)
@budgeted
def test_hid_decoder_never_raises(
    layout: str, alt_codes: bool, max_length: int, events: list[KeyEvent]
) -> None:
    decoder = Decoder(layout, alt_codes=alt_codes, max_length=max_length)
    out = []
    for ev in events:
        out += decoder.feed(ev)
        if not decoder.pending:
            continue
    out += [f for f in (decoder.expire(), decoder.finish()) if f is not None]
    for r in out:
        assert isinstance(r, Scan | Fault)
        if isinstance(r, Scan):
            assert len(r.text) <= max_length


# -- serial framing and decoding ------------------------------------------------------------

_terminators = st.sampled_from(["\r", "\n", "\r\n", "\x03", "\x00", "ÿ"])
_encodings = st.sampled_from(["utf-8", "shift_jis", "cp932", "latin-1", "ascii", "idna"])


@FUZZ
@given(
    _terminators,
    _encodings,
    st.integers(16, 64),
    st.lists(st.binary(max_size=80) | st.sampled_from([b"\r", b"\r\n", b"\x1d"]), max_size=10),
)
@budgeted
def test_serial_framing_never_raises(
    terminator: str, encoding: str, max_line: int, chunks: list[bytes]
) -> None:
    cfg = SerialDevice(
        name="fuzz",
        profile="fuzz",
        driver="serial",
        port="/dev/null",
        terminator=terminator,
        encoding=encoding,
        max_line_bytes=max_line,
    )
    driver = SerialDriver(cfg)
    framer = LineFramer(terminator.encode("latin-1"), max_line)
    total = sum(map(len, chunks))
    seen = 0
    for chunk in chunks:
        for line in framer.feed(chunk):
            if line is None:
                continue
            assert len(line) <= max_line and terminator.encode("latin-1") not in line
            seen += len(line)
            driver._decode(line)  # a Read, a ReadFault or None; never an exception
    assert seen <= total
    assert len(framer._buf) <= max_line + len(terminator)


# -- acks, commands, blob requests -----------------------------------------------------------

_nested = st.integers(1, 300_000).map(lambda n: b"[" * n) | st.integers(1, 300_000).map(
    lambda n: b'{"ids":' * n
)
_payloads = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["ids", "request_id", "x"]), inner, max_size=3)
        ),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
    _nested,
)


@FUZZ
@given(_payloads, st.sampled_from([64, 1_048_576]))
@budgeted
def test_control_parsers_raise_only_message_error(payload: bytes, limit: int) -> None:
    for parse in (
        lambda: load_object(payload, limit),
        lambda: parse_ack(payload, limit),
        lambda: parse_command("ping", payload, limit),
    ):
        try:
            parse()
        except MessageError as e:
            assert len(str(e)) < 200  # one short line, safe to log
        else:
            assert len(payload) <= limit


_RID = "00000000-0000-0000-0000-000000000000"
_blob_bodies = st.one_of(
    _payloads,
    st.fixed_dictionaries(
        {
            "missing": st.lists(st.integers() | st.booleans() | st.text(max_size=3), max_size=8)
            | st.integers(),
            "sha256": st.sampled_from(["ab" * 32, "", 5]) | st.text(max_size=8),
        }
    ).map(lambda d: json.dumps(d).encode()),
)


@FUZZ
@given(st.sampled_from([_RID, "x", "../..", _RID + "/y"]), _blob_bodies)
@budgeted
def test_blob_missing_request_handler_never_raises(rid: str, body: bytes) -> None:
    topics = Topics(DEFAULT_PREFIX).station("site", "agent")
    sender = BlobSender(BlobStore(_CONFIG_DIR / "blobs", None), topics)
    sender._data[_RID] = {"sha256": "ab" * 32, "bytes": 100_000}  # a blob this agent holds
    sender.handle(f"{topics.base}/blobs/{rid}/missing", body)
    for job in sender._jobs.values():
        assert job.chunks is None or all(isinstance(i, int) and i >= 0 for i in job.chunks)


# -- interpretation ----------------------------------------------------------------------

_texts = st.one_of(
    st.text(max_size=120),
    st.text(alphabet="0123456789()\x1d ABC]", max_size=80),
    st.sampled_from(["01", "]d201", "]C1", "0104912345123459"]).flatmap(
        lambda head: st.text(alphabet="0123456789\x1d", max_size=60).map(lambda t: head + t)
    ),
)


# one-time costs (the GS1 tables, regex compiles) are not an input's time
for _t in ("0104912345123459", "]d20104912345123459\x1d10AB", "4912345678904", "x"):
    interpret(_t, today=date(2026, 1, 1))


@FUZZ
@given(
    _texts,
    st.sampled_from([None, "]d2", "]C1", "]E0", "]Q3", "]A0"]),
    st.none() | st.text(max_size=1),
)
@budgeted
def test_interpretation_always_answers(text: str, symbology: str | None, gs: str | None) -> None:
    result = interpret(text, symbology=symbology, gs_substitute=gs, today=date(2026, 1, 1))
    assert isinstance(result["type"], str) and result["type"]
    # the catch-all in interpret() is a last resort, not the way a parser says "no"
    assert "interpretation_failed" not in result.get("problems", []), result
