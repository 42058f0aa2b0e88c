"""The one place that picks a registry backend from what the operator gave.

psycopg is imported only when a DSN asks for PostgreSQL: a SQLite registry
(the demo, a desk, the tests) never loads it.
"""

from __future__ import annotations

from pathlib import Path

from agent.central.store import RecordStore
from agent.central.store_sqlite import SqliteStore


def is_dsn(db: str | Path) -> bool:
    """A PostgreSQL connection URI, not a file path."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def open_store(db: str | Path) -> RecordStore:
    """A `postgresql://` DSN selects PostgreSQL; anything else is a SQLite file path."""
    if is_dsn(db):
        from agent.central.store_pg import PostgresStore

        return PostgresStore(str(db))
    return SqliteStore(Path(db))
