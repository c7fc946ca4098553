"""Quick mode for every benchmark file: DISCACHE_BENCH_QUICK=1 caps the rounds of pedantic runs."""
from __future__ import annotations

import os

import pytest

QUICK_ENV = "DISCACHE_BENCH_QUICK"
QUICK_ROUNDS = 20  # enough for a median that ranks designs, not for three significant digits


def quick_rounds(rounds: int) -> int:
    """Rounds a pedantic benchmark runs: as written, or at most QUICK_ROUNDS in quick mode."""
    if os.environ.get(QUICK_ENV, "") not in ("", "0"):
        return min(rounds, QUICK_ROUNDS)
    return rounds


@pytest.fixture
def benchmark(benchmark):
    """pytest-benchmark's fixture with a pedantic() that honours quick mode, for every file."""
    pedantic = benchmark.pedantic

    def capped(target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0,
               iterations=1):
        return pedantic(target, args=args, kwargs=kwargs, setup=setup,
                        rounds=quick_rounds(rounds), warmup_rounds=min(warmup_rounds, 2)
                        if rounds != quick_rounds(rounds) else warmup_rounds,
                        iterations=iterations)

    benchmark.pedantic = capped
    return benchmark
