"""The shipped broker acl confines reference datasets (issue #20): real mosquitto with
the shipped madoguchi.conf and acl (tests/system/test_broker_acl.py's fleet), plus the
per-station stanzas `madoguchi refdata acl` prints. A station reads the fleet's sets, its
own site's and its own station's; never another site's reservations nor another
station's set, however it subscribes; without a stanza it gets no site-scoped set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import publish, signed_messages
from tests.system.test_broker_acl import BROKER_DIR, Fleet, P, collect_until, connected

KEY = Ed25519PrivateKey.generate()
SLOT = {
    "id": "R-2026-000123",
    "slot_start": "2026-12-02T10:30:00+09:00",
    "slot_end": "2026-12-02T10:45:00+09:00",
    "purpose": "vaccination dose 1",
}
LOT = {"gtin": "04912345123459", "lot": "AB", "reason": "contamination"}


def stanzas(*cns: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "refdata", "acl", *cns],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


async def test_a_station_reads_only_its_own_sites_and_stations_datasets(tmp_path: Path) -> None:
    acl = (BROKER_DIR / "acl").read_text() + "\n" + stanzas("toda-1f/a", "goka-2f/c")
    fleet = Fleet(tmp_path, acl)
    fleet.broker.start()
    try:
        a = fleet.client(fleet.enroll_station("toda-1f", "a"), "station-a")
        b = fleet.client(fleet.enroll_station("toda-1f", "b"), "station-b")  # no stanza
        c = fleet.client(fleet.enroll_station("goka-2f", "c"), "station-c")
        registry = fleet.client(fleet.role("registry"), "registry")
        async with connected(a, b, c, registry):
            messages = [
                *signed_messages(KEY, P, "recalled_lots", 1, [LOT]),
                *signed_messages(KEY, P, "reservations", 2, [SLOT], site="toda-1f"),
                *signed_messages(KEY, P, "reservations", 3, [SLOT], site="goka-2f"),
                *signed_messages(
                    KEY, P, "staff", 4, [{"uid": "01", "operator": "x"}], site="toda-1f", agent="b"
                ),
            ]
            await publish(registry, messages)  # retained, as the registry does
            for client in (a, b, c):
                for topic in (f"{P}/_datasets/#", f"{P}/#", "#", f"{P}/_datasets/site/+/#",
                              f"{P}/_datasets/station/#"):  # fmt: skip
                    await client.subscribe(topic, qos=1)
            marker = signed_messages(KEY, P, "jpki_anchors", 5, [])  # fleet: everyone reads it
            await publish(registry, marker)
            manifest = marker[-1][1]
            seen = {
                name: {t for t, _ in await collect_until(cl, manifest)}
                for name, cl in (("a", a), ("b", b), ("c", c))
            }

        def kinds(name: str) -> set[str]:
            return {"/".join(t.split("/")[3:-1]) for t in seen[name] if t.endswith("manifest")}

        assert kinds("a") == {
            "fleet/recalled_lots",
            "fleet/jpki_anchors",
            "site/toda-1f/reservations",
        }
        assert kinds("c") == {
            "fleet/recalled_lots",
            "fleet/jpki_anchors",
            "site/goka-2f/reservations",
        }
        # b has no stanza: no site set; its own station-scoped set it reads
        assert kinds("b") == {
            "fleet/recalled_lots",
            "fleet/jpki_anchors",
            "station/toda-1f/b/staff",
        }
        # and the chunks follow the same lines: nothing of goka's at a, of a's site at c
        assert not any("/site/goka-2f/" in t for t in seen["a"])
        assert not any("/site/toda-1f/" in t or "/station/" in t for t in seen["c"])
        assert any(t.startswith(f"{P}/_datasets/site/toda-1f/reservations/2/") for t in seen["a"])
    finally:
        fleet.broker.stop()
