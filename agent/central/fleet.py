"""The central half of a rollout (docs/fleet.md): sign a release, offer it to stations.

`sign_release` writes `BUNDLE.release.json`, the manifest of agent/contract/releases.py
signed with the release key (an Ed25519 key in the same PEM form as the dataset key,
agent/central/datasets.py). `offer` publishes `cmd/update` to each chosen station with
the dashboard's identity and collects the `cmd/update/result` answers; which stations:
one agent, or the stations of a site that have a retained status, optionally a canary
share of them (the first N by name, so a re-run picks the same ones).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.contract.blobs import CHUNK_BYTES, chunk_count
from agent.contract.releases import (
    build_manifest,
    chunk_topic,
    manifest_bytes,
    missing_topic,
    signed_bytes,
)
from agent.contract.topics import Topics


def sign_release(
    key: Ed25519PrivateKey,
    bundle: Path,
    version: str,
    *,
    min_config_schema: int,
    outbox_schema: int,
) -> dict[str, Any]:
    manifest = build_manifest(
        version, bundle, min_config_schema=min_config_schema, outbox_schema=outbox_schema
    )
    manifest["signature"] = base64.b64encode(key.sign(signed_bytes(manifest))).decode()
    return manifest


def write_manifest(manifest: dict[str, Any], out: Path) -> None:
    out.write_bytes(manifest_bytes(manifest))


def canary(names: list[str], share: float) -> list[str]:
    """The first ceil(share * n) stations by name (at least one when there are any)."""
    ordered = sorted(names)
    if not ordered:
        return []
    return ordered[: max(1, math.ceil(share * len(ordered) - 1e-9))]


def parse_share(text: str) -> float:
    """`10%` or `0.1` -> 0.1; ValueError outside (0, 1]."""
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 < value <= 1:
        raise ValueError(f"--canary: {text!r} is not a share in (0%, 100%]")
    return value


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    prefix: str
    tls_context: Any = None
    username: str | None = None
    password: str | None = None

    def client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            tls_context=self.tls_context,
            username=self.username,
            password=self.password,
            identifier=f"madoguchi-fleet-{uuid.uuid4().hex[:8]}",
        )


async def site_stations(broker: Broker, site: str, listen_s: float = 1.0) -> list[str]:
    """The agents of `site` with a retained status (each station keeps one)."""
    topics = Topics(broker.prefix)
    names: set[str] = set()
    async with broker.client() as client:
        await client.subscribe(f"{topics.prefix}/{site}/+/status", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(listen_s):
                async for m in client.messages:
                    if m.payload:
                        names.add(m.topic.value.split("/")[-2])
    return sorted(names)


async def offer(
    broker: Broker,
    site: str,
    agents: list[str],
    manifest: dict[str, Any],
    bundle_on_station: str | None,
    *,
    bundle: Path | None = None,
    deadline_s: float | None = None,
    answer_s: float = 120.0,
) -> dict[str, dict[str, Any]]:
    """cmd/update to each agent; their results by agent (missing: no answer in time).

    With `bundle_on_station` the stations install a file already staged there. Without
    it, `bundle` (the tarball here) is served over MQTT in chunks (agent/contract/
    releases.py): each station asks with `release/{version}/missing`, gets the chunks,
    and says `missing: []` when it holds them all; its result then has `downloaded`."""
    topics = Topics(broker.prefix)
    version = str(manifest["version"])
    request = uuid.uuid4().hex
    body: dict[str, Any] = {"request_id": request, "manifest": manifest}
    if bundle_on_station is not None:
        body["bundle"] = bundle_on_station
    elif bundle is None:
        raise ValueError("offer: a bundle path on the stations, or the bundle to serve")
    if deadline_s is not None:
        body["deadline_s"] = deadline_s
    serving = bundle_on_station is None
    results: dict[str, dict[str, Any]] = {}
    done: set[str] = set()
    async with broker.client() as client:
        for agent in agents:
            station = topics.station(site, agent)
            await client.subscribe(station.command_result("update"), qos=1)
            if serving:
                await client.subscribe(missing_topic(station.base, version), qos=1)
        payload = json.dumps(body).encode()
        for agent in agents:
            await client.publish(topics.station(site, agent).command("update"), payload, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(answer_s):
                async for m in client.messages:
                    topic = m.topic.value
                    agent = topic.split("/")[-4]
                    try:
                        answer = json.loads(m.payload if isinstance(m.payload, bytes) else b"")
                    except ValueError:
                        continue
                    if not isinstance(answer, dict) or agent not in agents:
                        continue
                    if topic.endswith("/result"):
                        if answer.get("request_id") != request:
                            continue
                        results[agent] = answer
                        if not serving or not answer.get("ok"):
                            done.add(agent)
                    elif answer.get("sha256") == manifest["bundle_sha256"]:
                        wanted = answer.get("missing")
                        if wanted == []:
                            results.setdefault(agent, {})["downloaded"] = True
                            done.add(agent)
                        elif isinstance(wanted, list) and bundle is not None:
                            base = topics.station(site, agent).base
                            await _serve(client, bundle, base, version, wanted, manifest)
                    if done >= set(agents):
                        break
    return results


async def _serve(
    client: aiomqtt.Client,
    bundle: Path,
    base: str,
    version: str,
    wanted: list[Any],
    manifest: dict[str, Any],
) -> None:
    total = chunk_count(int(manifest["bundle_bytes"]))
    with bundle.open("rb") as f:
        for i in wanted:
            if not isinstance(i, int) or not 0 <= i < total:
                continue
            f.seek(i * CHUNK_BYTES)
            await client.publish(chunk_topic(base, version, i), f.read(CHUNK_BYTES), qos=1)
