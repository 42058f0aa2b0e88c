"""Which seqs the broker has taken (PUBACK) and when: the outbox's "sent" state.

Kept in memory, not in the rows. "Sent" only decides when a record is due again
(`resend_after_s`), and it is discarded at every connect, when everything unconfirmed is
sent again. As a column it cost one more rewrite of every row and its index entry per
record drained (issue #18). A crash or power cut loses nothing: it only means resending,
and the registry acks a record it already holds again.

Pure and small: disjoint seq ranges in seq order, each with the time it was sent. A range
may cover seqs confirmed since, or never stored. The outbox counts only the unconfirmed
rows inside, so such holes never count.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence


class SentRanges:
    """Disjoint ranges `[first, last]` of seqs, each sent at one time (`at`)."""

    __slots__ = ("_ats", "_firsts", "_lasts")

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []
        self._ats: list[float] = []

    def __len__(self) -> int:
        return len(self._firsts)

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        return iter(list(zip(self._firsts, self._lasts, self._ats, strict=True)))

    def clear(self) -> None:
        self._firsts.clear()
        self._lasts.clear()
        self._ats.clear()

    def set(self, first: int, last: int, at: float) -> list[tuple[int, int]]:
        """Mark `[first, last]` sent at `at` (a resend moves the time on). Returns the
        parts of it no range covered before: the seqs that have just become sent."""
        return self._replace(first, last, at)

    def cut(self, first: int, last: int) -> None:
        """`[first, last]` is no longer sent (confirmed)."""
        self._replace(first, last, None)

    def _replace(self, first: int, last: int, at: float | None) -> list[tuple[int, int]]:
        if first > last:
            return []
        firsts, lasts, ats = self._firsts, self._lasts, self._ats
        i = bisect_left(lasts, first)  # the first range that ends at or after `first`
        j, cur, uncovered = i, first, []
        while j < len(firsts) and firsts[j] <= last:
            if firsts[j] > cur:
                uncovered.append((cur, firsts[j] - 1))
            cur = lasts[j] + 1
            j += 1
        if cur <= last:
            uncovered.append((cur, last))
        new: list[tuple[int, int, float]] = []
        if i < j and firsts[i] < first:
            new.append((firsts[i], first - 1, ats[i]))
        if at is not None:
            new.append((first, last, at))
        if i < j and lasts[j - 1] > last:
            new.append((last + 1, lasts[j - 1], ats[j - 1]))
        firsts[i:j] = [n[0] for n in new]
        lasts[i:j] = [n[1] for n in new]
        ats[i:j] = [n[2] for n in new]
        return uncovered

    def covering(self, first: int, last: int) -> list[tuple[int, int]]:
        """The parts of `[first, last]` a range covers, in seq order."""
        firsts, lasts = self._firsts, self._lasts
        i, out = bisect_left(lasts, first), []
        while i < len(firsts) and firsts[i] <= last:
            out.append((max(first, firsts[i]), min(last, lasts[i])))
            i += 1
        return out

    def count_in(self, seqs: Sequence[int]) -> int:
        """How many of `seqs` (ascending) a range covers."""
        if not seqs:
            return 0
        firsts, lasts = self._firsts, self._lasts
        i, total, top = bisect_left(lasts, seqs[0]), 0, seqs[-1]
        while i < len(firsts) and firsts[i] <= top:
            total += bisect_right(seqs, lasts[i]) - bisect_left(seqs, firsts[i])
            i += 1
        return total

    def not_due(self, after: int, due: float) -> Iterator[tuple[int, int]]:
        """The ranges ending above `after`, in seq order, sent after `due`: not to be sent
        again yet."""
        firsts, lasts, ats = self._firsts, self._lasts, self._ats
        for i in range(bisect_right(lasts, after), len(firsts)):
            if ats[i] > due:
                yield firsts[i], lasts[i]

    def oldest(self) -> tuple[int, int, float] | None:
        """The range sent longest ago."""
        if not self._ats:
            return None
        i = min(range(len(self._ats)), key=self._ats.__getitem__)
        return self._firsts[i], self._lasts[i], self._ats[i]


def runs(seqs: Sequence[int]) -> Iterator[tuple[int, int]]:
    """The maximal runs `first, first + 1, ..., last` of ascending, distinct `seqs`."""
    if not seqs:
        return
    if seqs[-1] - seqs[0] + 1 == len(seqs):  # one run (a message's seqs): no loop
        yield seqs[0], seqs[-1]
        return
    first = prev = seqs[0]
    for s in seqs[1:]:
        if s != prev + 1:
            yield first, prev
            first = s
        prev = s
    yield first, prev
