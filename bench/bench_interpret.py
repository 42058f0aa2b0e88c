"""Interpretation throughput: 100,000 mixed reads on one core (target >= 50,000 reads/s).

The mix is a busy vaccination venue plus the other counters: mostly tickets, vial codes
(a few products and lots, every serial new), JAN codes, application forms, URLs and
free text. Prints reads/s for the mix (caches emptied first) and µs per read for each
format, plus GS1 at its worst (nothing shared, every biip parse runs) and at its best
(the same vial re-scanned).

    PYTHONPATH=. .venv/bin/python bench/bench_interpret.py [--reads N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import date

from agent.interpret import interpret
from agent.interpret.gs1 import clear_caches
from agent.interpret.gtin import gtin_check_digit
from agent.interpret.municipality import municipality_check_digit

TODAY = date(2026, 11, 22)
GS = "\x1d"
Read = tuple[str, str | None]  # (text, AIM identifier)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def ticket(rng: random.Random) -> Read:
    first5 = _digits(rng, 5)
    check = municipality_check_digit(first5)
    if rng.random() < 0.01:  # a misread
        check = (check + 1) % 10
    return f"{rng.choice('12')}{rng.randint(1, 7)}{first5}{check}{_digits(rng, 10)}", None


def ticket_number(rng: random.Random) -> Read:
    number = _digits(rng, 10)
    return (f"A{number}B", "]F0") if rng.random() < 0.5 else (number, None)


def _gtin(payload: str) -> str:
    return payload + str(gtin_check_digit(payload))


# A venue stocks a few products, a few lots each; every vial has its own serial.
LOTS = [
    (_gtin(f"149871234{p}67"), f"{27 + lot % 2}{3 + lot:02d}00", f"F{p}{lot}K{lot * 7:03d}")
    for p in range(4)
    for lot in range(3)
]


def vial(rng: random.Random) -> Read:
    """Realistic: one of 12 (GTIN, expiry, lot), a unique 12-digit serial."""
    gtin, expiry, lot = rng.choice(LOTS)
    return f"01{gtin}17{expiry}10{lot}{GS}21{_digits(rng, 12)}", "]d2"


def vial_cold(rng: random.Random) -> Read:
    """Worst case: GTIN, expiry, lot and serial all new, nothing cached helps."""
    gtin = _gtin("1498712" + _digits(rng, 6))
    expiry = f"{rng.randint(25, 28)}{rng.randint(1, 12):02d}00"
    lot = rng.choice(["FH", "GK", "EW"]) + _digits(rng, 4)
    return f"01{gtin}17{expiry}10{lot}{GS}21{_digits(rng, 12)}", "]d2"


def jan(rng: random.Random) -> Read:
    payload = "49" + _digits(rng, 10)
    return payload + str(gtin_check_digit(payload)), rng.choice(["]E0", None])


def application_id(rng: random.Random) -> Read:
    return _digits(rng, 23), "]Q1"


def url(rng: random.Random) -> Read:
    return f"https://www.city.example.lg.jp/form/{_digits(rng, 6)}", "]Q1"


def text(rng: random.Random) -> Read:
    return rng.choice(["受付番号 ", "REF-", "walk-in "]) + _digits(rng, rng.randint(2, 8)), None


MIX: list[tuple[str, Callable[[random.Random], Read], float]] = [
    ("vaccination_ticket", ticket, 0.35),
    ("vaccination_ticket_number", ticket_number, 0.10),
    ("gs1 (known lot, new serial)", vial, 0.20),
    ("gtin", jan, 0.10),
    ("mynumber_application_id", application_id, 0.05),
    ("url", url, 0.10),
    ("text", text, 0.10),
]


def run(reads: list[Read]) -> float:
    """Seconds to interpret every read once."""
    start = time.perf_counter()
    for body, aim in reads:
        interpret(body, symbology=aim, today=TODAY)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    names = [m[0] for m in MIX]
    makers = {m[0]: m[1] for m in MIX}
    picks = rng.choices(names, weights=[m[2] for m in MIX], k=args.reads)
    reads = [makers[name](rng) for name in picks]
    types = Counter(interpret(b, symbology=a, today=TODAY)["type"] for b, a in reads[:2000])

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} cpu(s), Python {platform.python_version()}"
    )
    print(f"result types (first 2,000 reads): {dict(types)}")

    clear_caches()
    seconds = run(reads)
    print(
        f"mixed, cold cache: {args.reads:,} reads in {seconds:.3f} s = "
        f"{args.reads / seconds:,.0f} reads/s"
    )
    seconds = run(reads)
    print(f"mixed, second pass (same reads again): {args.reads / seconds:,.0f} reads/s")

    worst = [
        vial_cold(rng) if name.startswith("gs1") else read
        for name, read in zip(picks, reads, strict=True)
    ]
    clear_caches()
    seconds = run(worst)
    print(
        f"mixed, every GS1 read a new product and lot (worst case): "
        f"{args.reads / seconds:,.0f} reads/s"
    )

    print("per format, µs per read:")
    for name, maker, _ in MIX:
        sample = [maker(rng) for _ in range(10_000)]
        clear_caches()
        cold = run(sample) / len(sample) * 1e6
        print(f"  {name:28} {cold:7.2f}")
    sample = [vial_cold(rng) for _ in range(10_000)]
    print(f"  {'gs1 (all new: worst case)':28} {run(sample) / len(sample) * 1e6:7.2f}")
    carton = [vial(rng)] * 10_000
    print(f"  {'gs1 (same carton, cached)':28} {run(carton) / len(carton) * 1e6:7.2f}")


if __name__ == "__main__":
    main()
