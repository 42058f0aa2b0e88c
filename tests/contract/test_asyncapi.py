"""docs/asyncapi.yaml against what a real agent puts on a real broker.

The test reads the channels' addresses and message payload schemas out of the
AsyncAPI document itself, so a message on a topic the document does not know,
or a payload it does not describe, fails here.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.testing import AgentProcess, Broker, Pty, RegistryProbe, running_station, write_config
from tests.support.central import DOC, Contract, resolve

BASE = "madoguchi/v1/toda-city-hall-1f/station-03"
ACK = b"\x06"


def test_document_is_consistent() -> None:
    contract = Contract()
    assert {n for n, _, _ in contract.channels} == {
        "records",
        "ack",
        "registryStatus",
        "registryStations",
        "status",
        "telemetry",
        "command",
        "commandResult",
        "updateCommand",
        "updateResult",
        "releaseMissing",
        "releaseChunk",
        "blobManifest",
        "blobMissing",
        "blobChunk",
        "datasetManifest",
        "datasetChunk",
        "datasetSiteManifest",
        "datasetSiteChunk",
        "datasetStationManifest",
        "datasetStationChunk",
        "datasetDelta",
        "csr",
        "csrSigned",
    }
    for op in DOC["operations"].values():
        channel = resolve(op["channel"]["$ref"])
        for m in op["messages"]:
            assert resolve(m["$ref"]) in channel["messages"].values()


def test_contract_rejects_what_the_agent_must_not_send() -> None:
    contract = Contract()
    good = {
        "schema": "madoguchi.records/1",
        "site": "s",
        "agent": "a",
        "records": [
            {
                "id": "0190c8e4-1234-7abc-8def-0123456789ab",
                "seq": 1,
                "captured_at": "2026-11-22T06:34:50.123Z",
                "device": "d",
                "kind": "barcode",
                "source": "device",
                "data": {"text": "x"},
            }
        ],
    }
    assert contract.check(f"{BASE}/records", good) == "records/records"
    bad_seq = json.loads(json.dumps(good))
    bad_seq["records"][0]["seq"] = 0
    no_id = json.loads(json.dumps(good))
    del no_id["records"][0]["id"]
    local_time = json.loads(json.dumps(good))
    local_time["records"][0]["captured_at"] = "2026-11-22T15:34:50+09:00"
    for bad in (bad_seq, no_id, local_time, {**good, "records": []}):
        with pytest.raises(AssertionError):
            contract.check(f"{BASE}/records", bad)
    with pytest.raises(AssertionError):
        contract.check(f"{BASE}/cmd/ping/result", {"request_id": "x", "ok": False})
    with pytest.raises(AssertionError):
        contract.check(f"{BASE}/unknown", {})


@pytest.mark.broker
async def test_every_message_of_an_end_to_end_run_fits_the_contract(
    broker: Broker, registry: RegistryProbe, pty_port: Pty, tmp_path: Path
) -> None:
    contract = Contract()
    seen: list[tuple[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as spy:
        await spy.subscribe("madoguchi/#", qos=1)

        async def collect() -> None:
            async for m in spy.messages:
                seen.append((m.topic.value, json.loads(m.payload)))  # type: ignore[arg-type]

        collector = asyncio.create_task(collect())
        cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
        async with running_station(cfg) as run:
            for text in ("111122410000012345", "4901234567894", "01049123451234591725123110AB"):
                pty_port.scan(text)
                assert await pty_port.aread(1) == ACK
            await registry.wait_for(3)
            for name in ("ping", "rebirth", "resend", "diagnostics", "no-such-command"):
                await spy.publish(f"{BASE}/cmd/{name}", json.dumps({"request_id": name}), qos=1)
            while sum(t.endswith("/result") for t, _ in seen) < 5 or not any(
                t.endswith("/telemetry") for t, _ in seen
            ):
                await asyncio.sleep(0.05)
            outbox = run.station.outbox
            assert outbox is not None
            while (await outbox.stats()).unconfirmed:
                await asyncio.sleep(0.05)
        # the same station as a process killed -9: the broker publishes its will
        agent = AgentProcess(cfg, tmp_path / "agent.log")
        try:
            agent.start()
            await asyncio.to_thread(agent.wait_log, "connected to 127.0.0.1")
            agent.signal(signal.SIGKILL)
        finally:
            agent.close()
        while not any(t.endswith("/status") and set(b) == {"state", "session"} for t, b in seen):
            await asyncio.sleep(0.05)
        collector.cancel()
    kinds = {contract.check(topic, body) for topic, body in seen}
    assert kinds == {
        "records/records",
        "ack/ack",
        "registryStatus/online",
        "status/birth",
        "status/offline",
        "status/will",
        "telemetry/telemetry",
        "command/command",
        "commandResult/result",
    }
