"""Card authenticity figures (issue #21) against a private pcscd + vpcd with emulated cards.

    .venv/bin/python bench/bench_jpki.py [--rounds N]

Prints, per card: the chain check alone (parse, pinned fingerprint, signature,
validity; no card I/O), the chain check on the emulated reader (probe, read the
auth certificate and the CA certificate, check), and the possession proof on the
emulated reader (chain check, auth PIN counter, VERIFY, signature over a nonce,
verification), for an RSA-2048 and an ECDSA P-384 card. The emulated card signs
in Python (cryptography), so the proof includes the emulator's signing time; a
real card's RSA signature takes its own (longer) time on the chip.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support

from agent.drivers import jpki
from agent.drivers.scard import PcscSession
from tests.support.pcsc import (
    TEST_AUTH_PIN,
    MyNumberCard,
    PcscStack,
    anchor_fingerprint,
    ca_der,
    pcsc_stack,
)


def figures(name: str, samples: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    print(
        f"{name:48s} n={len(ms):4d}  median {statistics.median(ms):8.2f} ms"
        f"  p95 {p95:8.2f} ms  max {ms[-1]:8.2f} ms"
    )


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_card(st: PcscStack, key: str, n: int, anchors: frozenset[str]) -> None:
    card = MyNumberCard(key=key)
    ca = ca_der(card.ca)
    figures(
        f"{key}: chain check alone (no card I/O)",
        timed(lambda: jpki.check_chain(card.cert, ca, anchors, datetime.now(UTC), True), n),
    )
    st.slot.insert(card, wait=True)
    session = PcscSession("bench")

    def chain_on_reader() -> None:
        link = session.connect(st.reader)
        try:
            r, _ = jpki.read_and_check(link.transmit, "bench", anchors, datetime.now(UTC), True)
            assert r.verdict == jpki.GENUINE, r
        finally:
            link.close(reset=False)

    def proof_on_reader() -> None:
        link = session.connect(st.reader)
        try:
            r = jpki.prove_possession(
                link.transmit, TEST_AUTH_PIN, "bench", anchors, datetime.now(UTC), True
            )
            assert r["possession"] == "proven", r
        finally:
            link.close(reset=True)

    try:
        figures(f"{key}: chain check on the emulated reader", timed(chain_on_reader, n))
        figures(f"{key}: possession proof on the emulated reader", timed(proof_on_reader, n))
    finally:
        session.release()
    st.slot.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    n = ap.parse_args().rounds
    anchors = frozenset({anchor_fingerprint()})
    print(f"machine: {platform.machine()} {platform.node()} python {platform.python_version()}")
    with pcsc_stack(Path(tempfile.mkdtemp(prefix="bench-jpki-"))) as st:
        for key in ("rsa", "p384"):
            bench_card(st, key, n, anchors)


if __name__ == "__main__":
    main()
