"""The dashboard's command audit: who sent which command to which station, when, and how.

An append-only JSONL file (mode 0600), one line when a command is sent and one
with its outcome, each flushed and fsynced before the dashboard goes on: a
command that reached a station is on disk first. The page shows the newest
lines (`/api/audit`). Lines hold names, station ids and command names only:
commands carry no personal data.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from agent.errors import AuditError


class AuditLog:
    """`record()` appends one line durably; `tail()` reads the newest ones."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(
        self,
        *,
        who: str,
        site: str,
        agent: str,
        command: str,
        request_id: str,
        outcome: str,
        error: str | None = None,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ts": time.time(),
            "who": who,
            "site": site,
            "agent": agent,
            "command": command,
            "request_id": request_id,
            "outcome": outcome,
        }
        if error is not None:
            entry["error"] = error
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise AuditError(f"{self.path}: dashboard.audit_file: {e.strerror}") from e
        return entry

    def tail(self, n: int = 50) -> list[dict[str, Any]]:
        """The newest n entries, newest last; a torn last line (crash) is skipped."""
        try:
            with self.path.open("rb") as f:
                last = deque(f, maxlen=n)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise AuditError(f"{self.path}: dashboard.audit_file: {e.strerror}") from e
        out = []
        for raw in last:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out
