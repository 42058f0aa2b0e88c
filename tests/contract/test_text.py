"""The control-character rule of a scan (agent/contract/text.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.contract.text import GS, SCAN_CONTROL, TYPED_CONTROL, forbidden_controls

CONTROLS = [chr(i) for i in range(0x20)] + ["\x7f"]


@given(st.text())
def test_exactly_the_controls_outside_the_set_are_forbidden(text: str) -> None:
    bad = forbidden_controls(text)
    assert bad == [c for c in text if c in CONTROLS and c not in SCAN_CONTROL]
    assert all(c not in SCAN_CONTROL for c in bad)


@given(st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"])))
def test_printable_text_is_always_clean(text: str) -> None:
    assert forbidden_controls(text) == []
    assert forbidden_controls(text, TYPED_CONTROL) == []


@given(st.text(), st.sampled_from(sorted(SCAN_CONTROL)))
def test_scan_separators_pass_but_only_gs_may_be_typed(text: str, sep: str) -> None:
    clean = "".join(c for c in text if c not in CONTROLS)
    assert forbidden_controls(clean + sep + clean) == []
    typed = forbidden_controls(clean + sep + clean, TYPED_CONTROL)
    assert typed == ([] if sep == GS else [sep])


def test_the_set_is_tab_eot_gs_rs() -> None:
    assert sorted(SCAN_CONTROL) == ["\x04", "\t", "\x1d", "\x1e"]
    assert forbidden_controls("a\x00b\x7fc\r\n") == ["\x00", "\x7f", "\r", "\n"]
