"""The back-office hand-off and purge of sealed personal parts (docs/central.md).

The registry only ever holds ciphertext (agent/personal_seal.py). The back office,
with the private key no registry host has, runs `madoguchi registry export-personal`:
every sealed part not handed off yet is opened and written to a new file (mode 0600,
never overwritten), the records are marked handed off, and the access log gets who,
which record ids and when — never the data. `purge-personal` deletes them early; the
running registry purges them after `--personal-retention-hours` anyway.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import cast

from agent.central.store import PersonalStore
from agent.central.stores import open_store
from agent.errors import PersonalSealError
from agent.personal_seal import PersonalOpener

log = logging.getLogger(__name__)


async def export_personal(
    db: str | Path, key: Path, out: Path, *, who: str, again: bool = False
) -> tuple[int, list[str]]:
    """Open every pending sealed part into `out` (JSON Lines); (records written, problems).

    A part that does not open (another key, tampered) is not written and not marked;
    its problem line names the record, never its content.
    """
    opener = PersonalOpener.from_file(key)
    store = open_store(db)
    await store.open()
    try:
        personal = cast(PersonalStore, store)
        pending = await personal.personal_pending(include_handed_off=again)
        lines: list[str] = []
        ids: list[str] = []
        failed: list[str] = []
        for p in pending:
            try:
                part = opener.open(p.record_id, p.envelope)
            except PersonalSealError as e:
                failed.append(str(e))
                continue
            row = {
                "id": p.record_id,
                "site": p.site,
                "agent": p.agent,
                "captured_at": p.captured_at,
                "personal": part,
            }
            lines.append(json.dumps(row, ensure_ascii=False))
            ids.append(p.record_id)
        _write_new(out, "".join(line + "\n" for line in lines).encode())
        # marked only once the file is durable: a crash or a full disk before this
        # line leaves the records pending, so the next export takes them again
        if ids:
            await personal.mark_handed_off(ids, who, f"to {out}")
        log.info("personal data of %d record(s) handed off to %s by %s", len(ids), out, who)
        return len(ids), failed
    finally:
        await store.close()


async def purge_personal(
    db: str | Path, older_than_s: float, *, who: str, handed_off: bool = False
) -> list[str]:
    """Delete sealed parts stored longer ago than `older_than_s` (and handed-off ones)."""
    store = open_store(db)
    await store.open()
    try:
        return await cast(PersonalStore, store).purge_personal(
            older_than_s, who=who, handed_off=handed_off
        )
    finally:
        await store.close()


def _write_new(out: Path, data: bytes) -> None:
    """Create `out` (0600, never an existing file), write and fsync; on failure (a full
    disk) remove what was written, so no half hand-off file is left behind."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        out.unlink(missing_ok=True)
        raise
