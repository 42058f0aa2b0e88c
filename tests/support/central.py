"""Real parts for the central side: a PostgreSQL cluster of the tests' own, envelopes in
the contract's format, and the AsyncAPI document as a checker (registry consumers as real
processes are agent.testing.RegistryProcess)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest
import yaml

from agent.central.dashboard import Dashboard
from agent.contract.records import uuid7
from agent.testing import free_port
from tests.support import ROOT

PG_BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]


def pg_bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"PostgreSQL's {name} is not installed: run `make setup` (apt package postgresql)")


class PgCluster:
    """initdb + pg_ctl in a temporary directory; a unix socket there, no TCP.

    PostgreSQL refuses to run as root: as root, the cluster belongs to the
    `postgres` system user (created by the Debian package) and commands run
    through `runuser`.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="madoguchi-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root without a `postgres` user: apt install postgresql")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._dbs = 0

    def _run(self, *cmd: str) -> None:
        r = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")

    def start(self) -> None:
        self.port = free_port()
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-instructions",
        )
        self.start_server()

    def start_server(self) -> None:
        opts = f"-k {self.dir} -p {self.port} -c listen_addresses='' -c max_connections=100"
        self._run(
            pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.dir / "postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop_server(self) -> None:
        """The database goes away under the consumers (its files stay)."""
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        subprocess.run(
            [*self.as_user, pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.dir}&port={self.port}"

    def new_database(self) -> str:
        """A fresh database, so that tests sharing the cluster share nothing else."""
        import psycopg

        self._dbs += 1
        name = f"registry_{os.getpid()}_{self._dbs}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def query(self, dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(dsn) as conn:
            return conn.execute(sql, params).fetchall()


def record(seq: int, *, rid: str | None = None, text: str | None = None) -> dict[str, Any]:
    """A record in the contract's wire form (as agent.contract.records.Record.wire() makes it)."""
    return {
        "id": rid or str(uuid7()),
        "seq": seq,
        "captured_at": "2026-11-22T06:34:50.123Z",
        "device": "ticket-scanner",
        "kind": "barcode",
        "source": "device",
        "data": {"text": text or f"1111224100000{seq:05d}", "symbology": None},
    }


def envelope(site: str, agent: str, records: list[dict[str, Any]]) -> bytes:
    body = {"schema": "madoguchi.records/1", "site": site, "agent": agent, "records": records}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@contextlib.asynccontextmanager
async def running_dashboard(dashboard: Dashboard) -> AsyncIterator[Dashboard]:
    stop = asyncio.Event()
    task = asyncio.create_task(dashboard.run(stop), name="test-dashboard")
    await asyncio.wait_for(dashboard.serving.wait(), 15)
    await asyncio.wait_for(dashboard.connected.wait(), 15)
    try:
        yield dashboard
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


# -- the AsyncAPI document as a checker ---------------------------------------------------

DOC = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())


def resolve(ref: str) -> Any:
    node: Any = DOC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


class Contract:
    """Channel address templates as regexes, each with the validators of its messages."""

    def __init__(self) -> None:
        assert DOC["asyncapi"].startswith("3.")
        self.channels: list[tuple[str, re.Pattern[str], list[tuple[str, Any]]]] = []
        self.binary: set[str] = set()  # channels whose payload is raw bytes, not JSON
        for name, channel in DOC["channels"].items():
            pattern = re.escape(channel["address"])
            pattern = re.sub(r"\\\{[A-Za-z_]+\\\}", "[^/]+", pattern)
            validators = []
            for msg_name, msg in channel["messages"].items():
                if resolve(msg["$ref"]).get("contentType") == "application/octet-stream":
                    self.binary.add(name)
                payload = resolve(msg["$ref"])["payload"]
                # the document is the root, so its #/components/... refs resolve
                schema = {**DOC, "$ref": payload["$ref"]}
                jsonschema.Draft7Validator.check_schema(resolve(payload["$ref"]))
                validators.append((msg_name, jsonschema.Draft7Validator(schema)))
            self.channels.append((name, re.compile(f"^{pattern}$"), validators))

    def check_raw(self, topic: str, payload: bytes) -> str:
        """As `check`, for a payload as it came off the wire."""
        for name, pattern, validators in self.channels:
            if pattern.match(topic) and name in self.binary:
                assert payload, f"{topic}: empty {name}"
                return f"{name}/{validators[0][0]}"
            if pattern.match(topic):
                break
        return self.check(topic, json.loads(payload))

    def check(self, topic: str, body: Any) -> str:
        """The channel's name; AssertionError if no channel or no message fits."""
        for name, pattern, validators in self.channels:
            if pattern.match(topic):
                errors = []
                for msg_name, v in validators:
                    found = sorted(v.iter_errors(body), key=str)
                    if not found:
                        return f"{name}/{msg_name}"
                    errors.append(f"{msg_name}: {found[0].message}")
                raise AssertionError(f"{topic}: fits no message of {name}: {errors}")
        raise AssertionError(f"{topic}: no channel in docs/asyncapi.yaml")


class ContractSpy:
    """Subscribes to everything under the prefix and checks what agents and registries send.

    `cmd/{name}` itself is left out: tests send malformed commands on purpose.
    Reconnects when a test restarts the broker.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.contract = Contract()
        self.seen: list[str] = []
        self.problems: list[str] = []
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port) as client:
                    await client.subscribe("madoguchi/#", qos=1)
                    self.subscribed.set()
                    async for m in client.messages:
                        self.check(m.topic.value, m.payload)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def check(self, topic: str, payload: Any) -> None:
        levels = topic.split("/")
        if len(levels) == 6 and levels[4] == "cmd":
            return
        try:
            self.seen.append(self.contract.check_raw(topic, bytes(payload)))
        except (AssertionError, ValueError) as e:
            self.problems.append(f"{topic}: {e}")


# -- the dashboard's credentials (agent/central/dashboard_guard.py) ---------------------

DESK_TOKEN = "desk-token-" + "0123456789abcdef" * 3  # >= 32 characters
DESK_USER = "desk-1"


def desk_guard(**kwargs: Any) -> Any:
    """A DashboardGuard that knows DESK_TOKEN as DESK_USER."""
    from agent.central.dashboard_guard import DashboardGuard

    return DashboardGuard(tokens={DESK_TOKEN: DESK_USER}, **kwargs)


def authorized(headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {DESK_TOKEN}", **(headers or {})}
