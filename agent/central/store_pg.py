"""The registry's PostgreSQL backend (psycopg 3, async): the `RecordStore` for a city.

Each `store()` is one transaction of a fixed number of set-based statements
(arrays through `unnest`), however many messages and agents it covers: it
locks the agents' rows in (site, agent) order, so that consumers sharing the
load never deadlock; inserts the records with `INSERT ... ON CONFLICT (id) DO
NOTHING RETURNING id` (the ids returned are the new ones); and rewrites the
open gaps of the agents that changed. Another consumer storing the same agent
waits on that row lock; another storing the same record id waits on the
primary key and then finds it there.

Times are Unix seconds (double precision), as in the SQLite backend, so both
share `plan_gaps` and the dashboard's arithmetic. Bodies are `json` (kept as
sent; `jsonb` refuses `\\u0000`, and a record must never be refused for that).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg

from agent.central.store import (
    CONFLICTS_PER_ID,
    DEAD_LETTER_PAYLOAD_BYTES,
    DEAD_LETTER_ROWS,
    AgentSummary,
    Batch,
    Conflict,
    DeadLetter,
    Gap,
    PersonalAccess,
    Problems,
    SealedPersonal,
    Stored,
    accounted_for,
    canonical,
    carry_alerted,
    group_batches,
    log_gap_changes,
    plan_gaps,
    same_content,
    split_personal,
    verify_blob,
)
from agent.errors import BlobMismatch, RegistryStoreError

log = logging.getLogger(__name__)

_SCHEMA_LOCK = 0x6D61646F  # "mado": one consumer creates the schema at a time

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS records (
        id          text PRIMARY KEY,
        site        text NOT NULL,
        agent       text NOT NULL,
        seq         bigint NOT NULL,
        captured_at text NOT NULL,
        device      text NOT NULL,
        kind        text NOT NULL,
        source      text NOT NULL,
        body        json NOT NULL,
        stored_at   double precision NOT NULL
    )""",
    # no index on (site, agent, seq): no query here reads one, and it cost the server
    # 2.5 µs of 21.5 per record stored (issue #18, as on SQLite); a database made before
    # keeps its records_agent_seq (docs/central.md)
    "CREATE INDEX IF NOT EXISTS records_stored_at ON records (stored_at)",
    """CREATE TABLE IF NOT EXISTS agents (
        site text NOT NULL, agent text NOT NULL, max_seq bigint NOT NULL DEFAULT 0,
        records bigint NOT NULL DEFAULT 0, last_stored_at double precision,
        clock_synced boolean, PRIMARY KEY (site, agent)
    )""",
    """CREATE TABLE IF NOT EXISTS gaps (
        site text NOT NULL, agent text NOT NULL, first bigint NOT NULL, last bigint NOT NULL,
        opened_at double precision NOT NULL, alerted_at double precision,
        PRIMARY KEY (site, agent, first)
    )""",
    """CREATE TABLE IF NOT EXISTS blobs (
        record_id text NOT NULL, name text NOT NULL, site text NOT NULL, agent text NOT NULL,
        content_type text NOT NULL, sha256 text NOT NULL, size bigint NOT NULL,
        data bytea NOT NULL, stored_at double precision NOT NULL,
        PRIMARY KEY (record_id, name)
    )""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id bigserial PRIMARY KEY, at double precision NOT NULL, topic text NOT NULL,
        site text NOT NULL, agent text NOT NULL, reason text NOT NULL, payload bytea NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS conflicts (
        record_id text NOT NULL, digest text NOT NULL, site text NOT NULL, agent text NOT NULL,
        first_site text NOT NULL, first_agent text NOT NULL, body json NOT NULL,
        at double precision NOT NULL, PRIMARY KEY (record_id, digest)
    )""",
    "CREATE INDEX IF NOT EXISTS conflicts_at ON conflicts (at)",
    """CREATE TABLE IF NOT EXISTS personal_sealed (
        record_id text PRIMARY KEY, site text NOT NULL, agent text NOT NULL,
        captured_at text NOT NULL, envelope json NOT NULL,
        stored_at double precision NOT NULL, handed_off_at double precision
    )""",
    "CREATE INDEX IF NOT EXISTS personal_sealed_stored_at ON personal_sealed (stored_at)",
    """CREATE TABLE IF NOT EXISTS personal_access (
        at double precision NOT NULL, who text NOT NULL, action text NOT NULL,
        record_ids json NOT NULL, detail text NOT NULL
    )""",
]

_CONFLICTS = """
INSERT INTO conflicts (record_id, digest, site, agent, first_site, first_agent, body, at)
SELECT u.record_id, u.digest, u.site, u.agent, u.first_site, u.first_agent, u.body::json, %(now)s
FROM unnest(%(ids)s::text[], %(digests)s::text[], %(sites)s::text[], %(agents)s::text[],
            %(first_sites)s::text[], %(first_agents)s::text[], %(bodies)s::text[])
     AS u(record_id, digest, site, agent, first_site, first_agent, body)
WHERE (SELECT count(*) FROM conflicts c WHERE c.record_id = u.record_id) < %(per_id)s
ON CONFLICT DO NOTHING
"""

_INSERT = """
INSERT INTO records (id, site, agent, seq, captured_at, device, kind, source, body, stored_at)
SELECT u.id, u.site, u.agent, u.seq, u.captured_at, u.device, u.kind, u.source,
       u.body::json, %(now)s
FROM unnest(%(ids)s::text[], %(sites)s::text[], %(agents)s::text[], %(seqs)s::bigint[],
            %(captured)s::text[], %(devices)s::text[], %(kinds)s::text[], %(sources)s::text[],
            %(bodies)s::text[])
     AS u(id, site, agent, seq, captured_at, device, kind, source, body)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""


def _dsn_for_log(dsn: str) -> str:
    """The DSN without its password."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
        if "password" in params:
            params["password"] = "***"
        return make_conninfo(**params)  # type: ignore[arg-type]
    except psycopg.Error:
        return "<dsn>"


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _locked(
    method: Callable[Concatenate[PostgresStore, _P], Awaitable[_T]],
) -> Callable[Concatenate[PostgresStore, _P], Coroutine[Any, Any, _T]]:
    """Run `method` holding the store's connection lock (see `PostgresStore`)."""

    async def run(self: PostgresStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        async with self._lock:
            return await method(self, *args, **kwargs)

    return run


def _text(v: str) -> str:
    """PostgreSQL text holds neither NUL nor lone surrogates: a topic from anyone may."""
    return v.replace("\x00", "\ufffd").encode("utf-8", "replace").decode()


class PostgresStore:
    """`RecordStore` on PostgreSQL; one connection, used by one task at a time.

    The registry's consumer, gap watcher and status tasks share the store: psycopg
    serialises single statements but not transactions, so a watcher statement could
    run inside (and be rolled back with) a store transaction. `_lock` holds the
    connection for a whole operation."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        """The open connection, reconnecting after a broken one."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, application_name=f"madoguchi-registry-{os.getpid()}"
            )
        except psycopg.Error as e:
            raise RegistryStoreError(f"PostgreSQL {_dsn_for_log(self.dsn)}: {e}") from e
        return self._conn

    async def open(self) -> None:
        async with self._lock:
            await self._open()

    async def _open(self) -> None:
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _SCHEMA:
                    await conn.execute(statement)
        except psycopg.Error as e:
            raise RegistryStoreError(f"PostgreSQL schema: {e}") from e

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def store(self, batches: Sequence[Batch]) -> list[Stored]:
        now = time.time()
        try:
            async with self._lock:
                conn = await self._connection()
                async with conn.transaction():
                    out = await self._store_all(conn, group_batches(batches), now)
        except (psycopg.Error, ValueError, TypeError, OverflowError) as e:
            # ValueError ...: what psycopg raises adapting a value it cannot send
            raise RegistryStoreError(f"PostgreSQL: {type(e).__name__}: {e}") from e
        return out  # committed: the caller may ack all of it

    async def _store_all(
        self,
        conn: psycopg.AsyncConnection[Any],
        groups: list[tuple[tuple[str, str], list[dict[str, Any]]]],
        now: float,
    ) -> list[Stored]:
        """Set-based: the same seven statements whether the commit holds 1 agent or 500."""
        sites = [site for (site, _), _ in groups]
        agents = [agent for (_, agent), _ in groups]
        await conn.execute(
            "INSERT INTO agents (site, agent) SELECT * FROM unnest(%s::text[], %s::text[])"
            " ON CONFLICT DO NOTHING",
            (sites, agents),
        )
        # lock every agent row of the commit, in (site, agent) order: no deadlocks
        cur = await conn.execute(
            "SELECT a.site, a.agent, a.max_seq FROM agents a"
            " JOIN unnest(%s::text[], %s::text[]) AS k(site, agent)"
            " ON a.site = k.site AND a.agent = k.agent"
            " ORDER BY a.site, a.agent FOR UPDATE OF a",
            (sites, agents),
        )
        max_seqs = {(str(r[0]), str(r[1])): int(r[2]) for r in await cur.fetchall()}
        first: dict[str, dict[str, Any]] = {}
        owner: dict[str, tuple[str, str]] = {}
        sealed: dict[str, dict[str, Any]] = {}
        split = []
        for key, records in groups:  # the sealed personal part goes to its own table
            bodies = []
            for r in records:
                body, envelope = split_personal(r)
                bodies.append(body)
                if envelope is not None and body["id"] not in sealed:
                    sealed[body["id"]] = envelope
            split.append((key, bodies))
        groups = split
        for key, records in groups:
            for r in records:  # a re-send inside one commit is a duplicate, not a second row
                if r["id"] not in first:
                    first[r["id"]] = r
                    owner[r["id"]] = key
        unique = list(first.values())
        cur = await conn.execute(
            _INSERT,
            {
                "now": now,
                "sites": [owner[r["id"]][0] for r in unique],
                "agents": [owner[r["id"]][1] for r in unique],
                "ids": [r["id"] for r in unique],
                "seqs": [int(r["seq"]) for r in unique],
                "captured": [r["captured_at"] for r in unique],
                "devices": [r["device"] for r in unique],
                "kinds": [r["kind"] for r in unique],
                "sources": [str(r.get("source") or "device") for r in unique],
                "bodies": [json.dumps(r, ensure_ascii=False) for r in unique],
            },
        )
        inserted = {str(row[0]) for row in await cur.fetchall()}
        known = await self._known(conn, groups, inserted, first)
        conflicts: list[tuple[str, str, str, str, str, str, str]] = []
        kept = [rid for rid in sealed if rid in inserted]
        if kept:
            await conn.execute(
                "INSERT INTO personal_sealed (record_id, site, agent, captured_at, envelope,"
                " stored_at) SELECT u.id, u.site, u.agent, u.captured_at, u.envelope::json, %s"
                " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
                " AS u(id, site, agent, captured_at, envelope) ON CONFLICT DO NOTHING",
                (
                    now,
                    kept,
                    [owner[rid][0] for rid in kept],
                    [owner[rid][1] for rid in kept],
                    [first[rid]["captured_at"] for rid in kept],
                    [json.dumps(sealed[rid]) for rid in kept],
                ),
            )
        out: list[Stored] = []
        new_seqs: dict[tuple[str, str], list[int]] = {}
        accounted: dict[tuple[str, str], list[int]] = {}  # seqs named by lost_range records
        clocks: dict[tuple[str, str], bool] = {}
        for key, records in groups:
            for r in records:
                new = r["id"] in inserted and first.get(r["id"]) is r and owner[r["id"]] == key
                conflict = False
                if not new and r["id"] in known:
                    fsite, fagent, fbody = known[r["id"]]
                    if (fsite, fagent) != key or not same_content(fbody, r):
                        conflict = True
                        content = canonical(r)
                        digest = hashlib.sha256(content.encode()).hexdigest()
                        conflicts.append((r["id"], digest, *key, fsite, fagent, content))
                out.append(Stored(key[0], key[1], r, new, conflict))
                if new:
                    new_seqs.setdefault(key, []).append(int(r["seq"]))
                    accounted.setdefault(key, []).extend(accounted_for(r))
                    if isinstance(r.get("clock_synced"), bool):
                        clocks[key] = r["clock_synced"]
        if conflicts:
            cols = list(zip(*conflicts, strict=True))
            await conn.execute(
                _CONFLICTS,
                {
                    "now": now,
                    "per_id": CONFLICTS_PER_ID,
                    **{
                        k: list(c)
                        for k, c in zip(
                            ("ids", "digests", "sites", "agents", "first_sites", "first_agents"),
                            cols,
                            strict=False,
                        )
                    },
                    "bodies": list(cols[6]),
                },
            )
        if not new_seqs:
            return out
        touched = sorted(new_seqs)
        cur = await conn.execute(
            "SELECT g.site, g.agent, g.first, g.last, g.opened_at, g.alerted_at FROM gaps g"
            " JOIN unnest(%s::text[], %s::text[]) AS k(site, agent)"
            " ON g.site = k.site AND g.agent = k.agent",
            ([k[0] for k in touched], [k[1] for k in touched]),
        )
        old_gaps: dict[tuple[str, str], list[tuple[int, int, float, float | None]]] = {}
        for site, agent, a, b, opened, alerted in await cur.fetchall():
            old_gaps.setdefault((site, agent), []).append((int(a), int(b), float(opened), alerted))
        rewrite: list[tuple[str, str]] = []
        new_rows: list[tuple[Any, ...]] = []
        updates: list[tuple[str, str, int, int, bool | None]] = []
        for key in touched:
            rows = old_gaps.get(key, [])
            old = sorted((a, b, t) for a, b, t, _ in rows)
            seen = new_seqs[key] + accounted.get(key, [])
            gaps, top = plan_gaps(old, max_seqs.get(key, 0), seen, now)
            if gaps != old:
                log_gap_changes(key[0], key[1], old, gaps)
                rewrite.append(key)
                alerted = {(a, b): al for a, b, _, al in rows}
                new_rows.extend((*key, *g) for g in carry_alerted(alerted, gaps))
            updates.append((*key, top, len(new_seqs[key]), clocks.get(key)))
        if rewrite:
            await conn.execute(
                "DELETE FROM gaps g USING unnest(%s::text[], %s::text[]) AS k(site, agent)"
                " WHERE g.site = k.site AND g.agent = k.agent",
                ([k[0] for k in rewrite], [k[1] for k in rewrite]),
            )
        if new_rows:
            cols = list(zip(*new_rows, strict=True))
            await conn.execute(
                "INSERT INTO gaps SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[],"
                " %s::bigint[], %s::float8[], %s::float8[])",
                tuple(list(c) for c in cols),
            )
        cols = list(zip(*updates, strict=True))
        await conn.execute(
            "UPDATE agents a SET max_seq = u.max_seq, records = a.records + u.n,"
            " last_stored_at = %s, clock_synced = coalesce(u.clock, a.clock_synced)"
            " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bool[])"
            " AS u(site, agent, max_seq, n, clock)"
            " WHERE a.site = u.site AND a.agent = u.agent",
            (now, *(list(c) for c in cols)),
        )
        return out

    @staticmethod
    async def _known(
        conn: psycopg.AsyncConnection[Any],
        groups: list[tuple[tuple[str, str], list[dict[str, Any]]]],
        inserted: set[str],
        first: dict[str, dict[str, Any]],
    ) -> dict[str, tuple[str, str, str]]:
        """The stored (site, agent, body) of every id of the commit that was not new."""
        ids = sorted(
            {
                r["id"]
                for _, records in groups
                for r in records
                if r["id"] not in inserted or first.get(r["id"]) is not r
            }
        )
        if not ids:
            return {}
        cur = await conn.execute(
            "SELECT id, site, agent, body::text FROM records WHERE id = ANY(%s::text[])", (ids,)
        )
        return {str(i): (str(s), str(a), str(b)) for i, s, a, b in await cur.fetchall()}

    @_locked
    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        conn = await self._connection()
        try:
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO dead_letters (at, topic, site, agent, reason, payload)"
                        " VALUES (%s, %s, %s, %s, %s, %s)",
                        [
                            (
                                d.at,
                                _text(d.topic),
                                _text(d.site),
                                _text(d.agent),
                                _text(d.reason),
                                bytes(d.payload[:DEAD_LETTER_PAYLOAD_BYTES]),
                            )
                            for d in letters
                        ],
                    )
                await conn.execute(
                    "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - %s",
                    (DEAD_LETTER_ROWS,),
                )
        except (psycopg.Error, ValueError) as e:
            raise RegistryStoreError(f"PostgreSQL: dead letters: {e}") from e

    async def problems(self, recent: int = 20) -> Problems:
        [(dead,)] = await self._query("SELECT coalesce(max(id), 0) FROM dead_letters")
        [(conflicts,)] = await self._query("SELECT count(*) FROM conflicts")
        letters = [
            DeadLetter(str(t), str(r), bytes(p), float(at), str(s), str(a))
            for at, t, s, a, r, p in await self._query(
                "SELECT at, topic, site, agent, reason, payload FROM dead_letters"
                " ORDER BY id DESC LIMIT %s",
                (recent,),
            )
        ]
        rows = [
            Conflict(str(i), str(s), str(a), str(fs), str(fa), str(b), float(at))
            for i, s, a, fs, fa, b, at in await self._query(
                "SELECT record_id, site, agent, first_site, first_agent, body::text, at"
                " FROM conflicts ORDER BY at DESC LIMIT %s",
                (recent,),
            )
        ]
        return Problems(int(dead), int(conflicts), letters, rows)

    @_locked
    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = await self._connection()
        try:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()
        except psycopg.Error as e:
            raise RegistryStoreError(f"PostgreSQL: {e}") from e

    async def open_gaps(self) -> list[Gap]:
        rows = await self._query(
            "SELECT site, agent, first, last, opened_at FROM gaps ORDER BY site, agent, first"
        )
        return [Gap(s, a, int(f), int(la), float(t)) for s, a, f, la, t in rows]

    async def overdue_gaps(self, older_than_s: float) -> list[Gap]:
        now = time.time()
        rows = await self._query(
            "UPDATE gaps SET alerted_at = %s WHERE alerted_at IS NULL AND opened_at <= %s"
            " RETURNING site, agent, first, last, opened_at",
            (now, now - older_than_s),
        )
        return sorted(Gap(s, a, int(f), int(la), float(t)) for s, a, f, la, t in rows)

    async def count(self) -> int:
        [(n,)] = await self._query("SELECT count(*) FROM records")
        return int(n)

    async def agents(self, minutes: int = 30) -> list[AgentSummary]:
        now = time.time()
        start_minute = int(now // 60) - minutes + 1
        buckets: dict[tuple[str, str], list[int]] = {}
        for s, a, minute, n in await self._query(
            "SELECT site, agent, floor(stored_at / 60)::bigint, count(*) FROM records"
            " WHERE stored_at >= %s GROUP BY 1, 2, 3",
            (start_minute * 60,),
        ):
            b = buckets.setdefault((s, a), [0] * minutes)
            idx = int(minute) - start_minute
            if 0 <= idx < minutes:
                b[idx] = int(n)
        rows = await self._query(
            "SELECT site, agent, max_seq, records, last_stored_at, clock_synced FROM agents"
            " ORDER BY site, agent"
        )
        return [
            AgentSummary(
                s,
                a,
                int(m),
                int(n),
                None if t is None else float(t),
                c,
                buckets.get((s, a), [0] * minutes),
            )
            for s, a, m, n, t, c in rows
        ]

    @_locked
    async def store_blob(
        self,
        *,
        record_id: str,
        site: str,
        agent: str,
        name: str,
        content_type: str,
        sha256: str,
        data: bytes,
    ) -> bool:
        digest = verify_blob(sha256, data)
        conn = await self._connection()
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO blobs VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (record_id, name) DO NOTHING RETURNING sha256",
                    (
                        record_id,
                        name,
                        site,
                        agent,
                        content_type,
                        digest,
                        len(data),
                        data,
                        time.time(),
                    ),
                )
                if await cur.fetchone() is not None:
                    return True
                cur = await conn.execute(
                    "SELECT sha256 FROM blobs WHERE record_id = %s AND name = %s",
                    (record_id, name),
                )
                row = await cur.fetchone()
        except psycopg.Error as e:
            raise RegistryStoreError(f"PostgreSQL: {e}") from e
        if row is None or row[0] != digest:
            raise BlobMismatch(f"blob {record_id}/{name} already stored with another hash")
        return False

    # -- sealed personal parts ----------------------------------------------------------

    async def personal_pending(self, *, include_handed_off: bool = False) -> list[SealedPersonal]:
        where = "" if include_handed_off else " WHERE handed_off_at IS NULL"
        rows = await self._query(
            "SELECT record_id, site, agent, captured_at, envelope, stored_at, handed_off_at"
            f" FROM personal_sealed{where} ORDER BY stored_at, record_id"
        )
        return [
            SealedPersonal(str(i), str(s), str(a), str(c), e, float(t), h)
            for i, s, a, c, e, t, h in rows
        ]

    async def _log_access(
        self,
        conn: psycopg.AsyncConnection[Any],
        who: str,
        action: str,
        ids: Sequence[str],
        detail: str,
    ) -> None:
        await conn.execute(
            "INSERT INTO personal_access VALUES (%s, %s, %s, %s, %s)",
            (time.time(), who, action, json.dumps(list(ids)), detail),
        )

    @_locked
    async def mark_handed_off(self, record_ids: Sequence[str], who: str, detail: str) -> None:
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE personal_sealed SET handed_off_at = %s WHERE record_id = ANY(%s)",
                    (time.time(), list(record_ids)),
                )
                await self._log_access(conn, who, "export", record_ids, detail)
        except psycopg.Error as e:
            raise RegistryStoreError(f"PostgreSQL: {e}") from e

    async def purge_personal(
        self, older_than_s: float, *, who: str, handed_off: bool = False
    ) -> list[str]:
        """Delete and log in one commit, then VACUUM the table so that the dead rows'
        space is reclaimed (docs/central.md: what VACUUM does not erase).

        On a connection of its own: the registry runs it beside the consumer, whose
        connection may be inside a store transaction at that moment."""
        cutoff = time.time() - older_than_s
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, application_name=f"madoguchi-purge-{os.getpid()}"
            )
        except psycopg.Error as e:
            raise RegistryStoreError(f"PostgreSQL {_dsn_for_log(self.dsn)}: {e}") from e
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    "DELETE FROM personal_sealed WHERE stored_at <= %s"
                    + (" OR handed_off_at IS NOT NULL" if handed_off else "")
                    + " RETURNING record_id",
                    (cutoff,),
                )
                ids = sorted(str(r[0]) for r in await cur.fetchall())
                if ids:
                    await self._log_access(
                        conn, who, "purge", ids, f"older than {older_than_s:.0f} s"
                    )
            if ids:
                await conn.execute("VACUUM personal_sealed")
        except psycopg.Error as e:
            raise RegistryStoreError(f"PostgreSQL: {e}") from e
        finally:
            await conn.close()
        return ids

    async def personal_access(self) -> list[PersonalAccess]:
        rows = await self._query(
            "SELECT at, who, action, record_ids, detail FROM personal_access ORDER BY at"
        )
        return [PersonalAccess(float(t), str(w), str(a), list(i), str(d)) for t, w, a, i, d in rows]
