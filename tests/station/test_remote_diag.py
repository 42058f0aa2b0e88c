"""`cmd/logs` and the richer `cmd/diagnostics` through a real mosquitto and a real
station (issue #22, point 4)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.station import logring
from agent.testing import Broker, Pty, payload, running_station, write_config

BASE = "madoguchi/v1/toda-city-hall-1f/station-03"


async def ask(dash: aiomqtt.Client, name: str, body: Any, request_id: str) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps({"request_id": request_id, **body})
    await dash.publish(f"{BASE}/cmd/{name}", raw, qos=1)
    async with asyncio.timeout(15):
        async for m in dash.messages:
            got = payload(m)
            if m.topic.value == f"{BASE}/cmd/{name}/result" and got["request_id"] == request_id:
                return got  # type: ignore[no-any-return]
    raise AssertionError("no answer")


@pytest.mark.broker
@pytest.mark.usefixtures("contract_spy")
async def test_logs_and_diagnostics_over_mqtt(
    broker: Broker, pty_port: Pty, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, broker.port, scanner=pty_port.link)
    async with running_station(cfg), aiomqtt.Client("127.0.0.1", broker.port) as dash:
        await dash.subscribe(f"{BASE}/cmd/+/result", qos=1)
        await asyncio.sleep(0.3)  # the station subscribes to cmd/# before its birth
        marker = logging.getLogger("agent.test")
        for i in range(logring.MAX_LINES + 50):  # more than the ring keeps
            marker.warning("filler line %d", i)

        got = await ask(dash, "logs", {"lines": 5}, "five")
        assert got["ok"] is True
        assert [line.rsplit(" ", 1)[1] for line in got["lines"]] == [
            str(i) for i in range(logring.MAX_LINES + 45, logring.MAX_LINES + 50)
        ]
        assert got["truncated"] is False

        most = await ask(dash, "logs", {"lines": logring.MAX_ANSWER_LINES}, "most")
        assert most["ok"] is True and len(most["lines"]) == logring.MAX_ANSWER_LINES
        assert sum(len(x.encode()) + 1 for x in most["lines"]) <= logring.MAX_ANSWER_BYTES

        default = await ask(dash, "logs", {}, "default")
        assert len(default["lines"]) == logring.DEFAULT_LINES

        for n, hostile in enumerate([0, -1, 10**18, "5", 2.5, True, None, [5], {"n": 1}]):
            bad = await ask(dash, "logs", {"lines": hostile}, f"bad{n}")
            assert bad["ok"] is False and "lines" in bad["error"], hostile

        # lines past the byte bound: the answer is cut, never larger
        for _ in range(logring.MAX_ANSWER_LINES):
            marker.warning("x" * 1500)
        big = await ask(dash, "logs", {"lines": logring.MAX_ANSWER_LINES}, "big")
        assert big["truncated"] is True
        assert sum(len(x.encode()) + 1 for x in big["lines"]) <= logring.MAX_ANSWER_BYTES

        diag = await ask(dash, "diagnostics", {}, "diag")
        assert diag["ok"] is True
        assert diag["versions"]["python"] and "aiomqtt" in diag["versions"]
        assert diag["disk"]["total_bytes"] >= diag["disk"]["free_bytes"] > 0
        assert {"source", "temperature_c", "throttled"} <= set(diag["thermal"])
        assert "synced" in diag["clock"] and "source" in diag["clock"]
        assert "madoguchi" in diag  # the old keys stay
    # the ring is gone with the station
    assert not [h for h in logging.getLogger().handlers if h.get_name() == logring.RING_NAME]
