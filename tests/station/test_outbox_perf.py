"""The drain's fast paths (issue #18) say exactly what the slow ones said: the wire JSON
SQLite builds, confirm by seq range, and the state counters behind an O(1) `stats()`."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.contract.records import Read
from agent.station.outbox import Outbox, _query_stats

_FAST = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
_data = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        _json_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=6,
    ),
    max_size=4,
)
_reads = st.builds(
    Read,
    device=st.text(min_size=1, max_size=12),
    kind=st.sampled_from(["barcode", "card", "photo", 'x"\\\n\u3042']),
    data=_data,
    source=st.text(max_size=8),
    clock_synced=st.none() | st.booleans(),
)


@_FAST
@given(reads=st.lists(st.tuples(_reads, st.none() | st.text(max_size=8)), min_size=1, max_size=8))
def test_wire_json_from_sqlite_is_the_records_wire_json(
    tmp_path: Path, reads: list[tuple[Read, str | None]]
) -> None:
    """Hostile text in every column: the bytes SQLite splices equal `Record.wire_json()`."""

    async def go() -> None:
        db = tmp_path / f"{uuid.uuid4()}.db"
        async with Outbox(db, clock=_clock) as ob:
            for read, operator in reads:
                await ob.append(read, operator=operator)
            records = await ob.next_batch(100, 0)
            wire = await ob.next_wire_batch(100, 0)
        assert [o.seq for o in wire] == [r.seq for r in records]
        assert [o.id for o in wire] == [r.id for r in records]
        for o, r in zip(wire, records, strict=True):
            assert o.wire == r.wire_json().encode()
            assert json.loads(o.wire) == r.wire()
            assert (o.record is not None) == (r.kind == "photo")

    asyncio.run(go())


async def _ids(ob: Outbox) -> list[tuple[int, str, int]]:
    return await ob._run(
        lambda: ob.db.execute("SELECT seq, id, state FROM records ORDER BY seq").fetchall()
    )


async def _assert_counts(ob: Outbox, sent: set[int] | None = None) -> None:
    """The counters against a count of the rows; `sent`: the seqs the test marked sent
    (a set kept by the test itself, not the outbox's ranges), the unconfirmed of which
    must be counted as sent and must not be handed out again before they are due."""
    stats = await ob.stats()
    counted = await ob._run(lambda: _query_stats(ob.db, ob._clock()))
    rows = await _ids(ob)
    unconfirmed = [seq for seq, _, state in rows if state < 2]
    in_flight = {seq for seq in unconfirmed if seq in (sent or set())}
    counted["sent"] = len(in_flight)
    counted["pending"] = counted["unconfirmed"] - len(in_flight)
    got = {k: getattr(stats, k) for k in counted}
    assert got == counted
    not_due = [o.seq for o in await ob.next_wire_batch(1000, 30)]
    assert not_due == [seq for seq in unconfirmed if seq not in in_flight]
    all_due = [o.seq for o in await ob.next_wire_batch(1000, 0)]
    assert all_due == unconfirmed
    after = unconfirmed[len(unconfirmed) // 2] if unconfirmed else 0
    above = [o.seq for o in await ob.next_wire_batch(3, 30, after_seq=after)]
    assert above == [s for s in unconfirmed if s > after and s not in in_flight][:3]


def _clock() -> float:
    return 1_800_000_000.0  # fixed: the oldest age is compared exactly


_op = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 6)),
    st.tuples(st.just("send"), st.integers(1, 8)),
    st.tuples(st.just("send_some"), st.integers(0, 2**32)),
    st.tuples(st.just("confirm_run"), st.integers(1, 8)),
    st.tuples(st.just("confirm_some"), st.integers(0, 2**32)),
    st.tuples(st.just("reset"), st.just(0)),
    st.tuples(st.just("purge"), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0)),
)


@_FAST
@given(ops=st.lists(_op, min_size=1, max_size=14))
def test_state_counters_equal_a_count_after_any_sequence(
    tmp_path: Path, ops: list[tuple[str, int]]
) -> None:
    async def go() -> None:
        db = tmp_path / f"{uuid.uuid4()}.db"
        ob = Outbox(db, clock=_clock)
        await ob.__aenter__()
        try:
            n = 0
            sent: set[int] = set()  # what the test marked sent since the last reset
            for op, arg in ops:
                rng = random.Random(arg)
                rows = await _ids(ob)
                open_rows = [r for r in rows if r[2] < 2]
                if op == "append":
                    for _ in range(arg):
                        n += 1
                        await ob.append(Read("s", "barcode", {"text": f"T{n}"}))
                elif op == "send":
                    batch = await ob.next_wire_batch(arg, 0)
                    await ob.mark_sent([o.seq for o in batch])
                    sent |= {o.seq for o in batch}
                elif op == "send_some":
                    seqs = [r[0] for r in rows if rng.random() < 0.5]
                    # unordered, repeated, and one not stored yet (appended later: pending)
                    mixed = [*seqs, *seqs[:2], (rows[-1][0] if rows else 0) + 1]
                    rng.shuffle(mixed)
                    await ob.mark_sent(mixed)
                    sent |= set(seqs)
                elif op == "confirm_run":
                    await ob.confirm([r[1] for r in open_rows[:arg]])
                elif op == "confirm_some":
                    ids = [r[1] for r in rows if rng.random() < 0.5]
                    rng.shuffle(ids)
                    await ob.confirm([*ids, str(uuid.uuid4())])
                elif op == "reset":
                    await ob.reset_sent()
                    sent.clear()
                elif op == "purge":
                    await ob.purge(retention_days=0)
                else:
                    await ob.__aexit__(None, None, None)
                    ob = Outbox(db, clock=_clock)
                    await ob.__aenter__()
                    sent.clear()
                await _assert_counts(ob, sent)
        finally:
            await ob.__aexit__(None, None, None)

    asyncio.run(go())


def _template(path: Path, n: int) -> None:
    async def fill() -> None:
        async with Outbox(path, clock=_clock) as ob:
            for i in range(n):
                await ob.append(Read("s", "barcode", {"text": f"R{i}"}))
            batch = await ob.next_wire_batch(n // 2, 0)
            await ob.mark_sent([o.seq for o in batch])
            await ob.confirm([o.id for o in batch[: n // 8]])

    asyncio.run(fill())


@_FAST
@given(seed=st.integers(0, 2**32), shape=st.sampled_from(["run", "reversed", "gap", "random"]))
def test_confirm_by_range_equals_confirm_by_ids(tmp_path: Path, seed: int, shape: str) -> None:
    """The same acks applied to two copies of one outbox, through `confirm` (by range where
    it can) and through `_confirm_by_ids`: the same rows confirmed, the same counts."""
    base = tmp_path / f"base-{seed}-{shape}.db"
    if not base.exists():
        _template(base, 40)
    rng = random.Random(seed)
    copies = []
    for name in ("range", "ids"):
        target = tmp_path / f"{name}-{seed}-{shape}.db"
        shutil.copy(base, target)
        copies.append(target)

    async def apply(path: Path, by_ids: bool, acks: list[list[str]]) -> tuple[list[Any], list[int]]:
        async with Outbox(path, clock=_clock) as ob:
            counts = []
            for ids in acks:
                if by_ids:
                    counts.append(await ob._run(ob._confirm_by_ids, ids))
                else:
                    counts.append(await ob.confirm(ids))
            await _assert_counts(ob)
            rows = await ob._run(
                lambda: ob.db.execute(
                    "SELECT seq, state, sealed IS NULL FROM records ORDER BY seq"
                ).fetchall()
            )
            return rows, counts

    async def go() -> None:
        async with Outbox(base, clock=_clock) as ob:
            rows = await _ids(ob)
        ids = [r[1] for r in rows]
        acks = []
        for _ in range(4):
            a = rng.randrange(len(ids))
            b = rng.randrange(a, min(len(ids), a + 12))
            ack = ids[a : b + 1]
            if shape == "reversed":
                ack.reverse()
            elif shape == "gap" and len(ack) > 2:
                del ack[len(ack) // 2]
                ack.append(str(uuid.uuid4()))  # same length as the run, one unknown id
            elif shape == "random":
                ack = rng.sample(ids, rng.randrange(1, 10))
                ack += ack[:1]  # a duplicate
            acks.append(ack)
        by_range = await apply(copies[0], False, acks)
        by_ids = await apply(copies[1], True, acks)
        assert by_range == by_ids

    asyncio.run(go())
