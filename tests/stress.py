"""Durations of the stress tests, raised for soak runs with DISCACHE_STRESS_FACTOR (e.g. 20)."""
from __future__ import annotations

import json
import os
from pathlib import Path

FACTOR = float(os.environ.get("DISCACHE_STRESS_FACTOR", "1"))
FIGURES = os.environ.get("DISCACHE_STRESS_FIGURES")  # a file to append each test's figures to


def seconds(base: float) -> float:
    """A test's duration: base seconds times DISCACHE_STRESS_FACTOR."""
    return base * FACTOR


def report(name: str, figures: dict) -> None:
    """Print a test's figures (pytest -s shows them) and append them to DISCACHE_STRESS_FIGURES."""
    line = json.dumps({"test": name, "factor": FACTOR, **figures}, sort_keys=True)
    print(line)
    if FIGURES:
        with Path(FIGURES).open("a") as out:
            out.write(line + "\n")
