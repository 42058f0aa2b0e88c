"""PC/SC figures against a private pcscd + vpcd with the emulated My Number card.

    PYTHONPATH=. python bench/bench_pcsc.py [--rounds N]

Prints: APDU round trip, card identification (ATR, UID, JPKI token, the whole
user-auth certificate in <=256-byte chunks), the PIN flow, and insertion ->
record through the driver thread (dominated by pcscd's card presence polling).
The card is emulated in Python over TCP, so these figures are the software path
(pcscd, libpcsclite, pyscard, the driver): a real contactless card adds its own
time per APDU.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support

from agent.config import PcscDevice
from agent.drivers.card import card_info, identify_card
from agent.drivers.pcsc import PcscDriver
from agent.drivers.scard import PcscSession
from tests.support.pcsc import TEST_PIN, MyNumberCard, pcsc_stack


def figures(name: str, samples: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    print(
        f"{name:44s} n={len(ms):4d}  median {statistics.median(ms):8.2f} ms"
        f"  p95 {p95:8.2f} ms  max {ms[-1]:8.2f} ms"
    )


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def insert_to_read(stack_reader: str, slot: object, rounds: int) -> list[float]:
    dev = PcscDevice(name="bench", profile="bench", driver="pcsc", reader=stack_reader)
    out = []
    async with PcscDriver(dev) as driver:
        reads = driver.reads()
        for i in range(rounds):
            card = MyNumberCard(serial=1000 + i)
            t = time.perf_counter()
            slot.insert(card)  # type: ignore[attr-defined]
            await asyncio.wait_for(anext(reads), 15)
            out.append(time.perf_counter() - t)
            slot.remove()  # type: ignore[attr-defined]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    n = args.rounds
    print(f"machine: {platform.machine()} {platform.node()} python {platform.python_version()}")
    with pcsc_stack(Path(tempfile.mkdtemp(prefix="bench-pcsc-"))) as st:
        card = MyNumberCard()
        st.slot.insert(card, wait=True)
        print(f"certificate: {len(card.cert)} bytes DER")
        session = PcscSession("bench")
        try:
            link = session.connect(st.reader)
            select = bytes.fromhex("00A4040C0AD392F000260100000001")
            figures("APDU round trip (SELECT)", timed(lambda: link.transmit(select), n * 10))
            figures(
                "identify My Number card + read auth cert",
                timed(
                    lambda: identify_card(link.transmit, link.atr, "bench", datetime.now(UTC)),
                    n,
                ),
            )
            link.close(reset=False)

            def pin_flow() -> None:
                lk = session.connect(st.reader)
                try:
                    card_info(lk.transmit, TEST_PIN, read_my_number=True, device="bench")
                finally:
                    lk.close(reset=True)

            figures("PIN flow (counter, VERIFY, 4 attrs, My Number)", timed(pin_flow, n))
        finally:
            session.release()
        st.slot.remove()
        figures(
            "card inserted -> Read from the driver",
            asyncio.run(insert_to_read(st.reader, st.slot, max(5, n // 2))),
        )


if __name__ == "__main__":
    main()
