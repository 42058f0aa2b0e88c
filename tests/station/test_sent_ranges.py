"""SentRanges against the plainest model of it: a dict of seq -> time sent."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from agent.station.sent_ranges import SentRanges, runs

_span = st.tuples(st.integers(0, 60), st.integers(0, 12))
_op = st.one_of(
    st.tuples(st.just("set"), _span, st.integers(0, 9)),
    st.tuples(st.just("cut"), _span, st.just(0)),
)


def _covered(r: SentRanges) -> dict[int, float]:
    return {s: at for first, last, at in r for s in range(first, last + 1)}


def _as_ranges(seqs: list[int]) -> list[tuple[int, int]]:
    return list(runs(sorted(seqs)))


@given(ops=st.lists(_op, max_size=30), probe=st.lists(st.integers(-2, 80), max_size=20))
def test_ranges_say_what_a_dict_of_seqs_says(
    ops: list[tuple[str, tuple[int, int], int]], probe: list[int]
) -> None:
    r, model = SentRanges(), dict[int, float]()
    for op, (first, width), at in ops:
        span = range(first, first + width)  # width 0: an empty span (last < first)
        if op == "set":
            new = r.set(first, first + width - 1, float(at))
            assert new == _as_ranges([s for s in span if s not in model])
            model.update(dict.fromkeys(span, float(at)))
        else:
            r.cut(first, first + width - 1)
            for s in span:
                model.pop(s, None)
        assert _covered(r) == model
        listed = list(r)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(listed))  # disjoint
        assert all(f <= last for f, last, _ in listed)
    seqs = sorted(set(probe))
    assert r.count_in(seqs) == sum(1 for s in seqs if s in model)
    for after, due in ((-1, 4.0), (20, -1.0), (35, 9.0)):
        got = [s for first, last in r.not_due(after, due) for s in range(first, last + 1)]
        # a range that ends above `after` is named whole, seqs up to `after` included
        want = {s for s, at in model.items() if at > due}
        assert set(got) <= want and {s for s in want if s > after} <= set(got)
    oldest = r.oldest()
    if model:
        assert oldest is not None and oldest[2] == min(model.values())
        assert all(model[s] == oldest[2] for s in range(oldest[0], oldest[1] + 1))
    else:
        assert oldest is None
    r.clear()
    assert len(r) == 0 and r.oldest() is None


def test_runs_cut_at_every_gap() -> None:
    assert list(runs([])) == []
    assert list(runs([4])) == [(4, 4)]
    assert list(runs([5, 6, 7])) == [(5, 7)]
    assert list(runs([1, 2, 3, 7, 8, 10])) == [(1, 3), (7, 8), (10, 10)]


@given(ops=st.lists(_op, max_size=20), span=_span)
def test_covering_names_every_covered_seq_of_a_span(
    ops: list[tuple[str, tuple[int, int], int]], span: tuple[int, int]
) -> None:
    r = SentRanges()
    for op, (first, width), at in ops:
        if op == "set":
            r.set(first, first + width - 1, float(at))
        else:
            r.cut(first, first + width - 1)
    first, width = span
    parts = r.covering(first, first + width - 1)
    got = [s for a, b in parts for s in range(a, b + 1)]
    assert got == [s for s in range(first, first + width) if s in _covered(r)]
