"""Markdown tables from `pytest bench --benchmark-json=FILE`: python bench/report.py FILE."""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(path: str) -> list[dict]:
    """The benchmarks of one pytest-benchmark JSON file."""
    with open(path) as f:
        return json.load(f)["benchmarks"]


def fmt_seconds(seconds: float) -> str:
    """Seconds in the unit that reads best."""
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e3:.2f} ms"


def pagetable_tables(benchmarks: list[dict]) -> str:
    """Median cost by pages per (op, purged, strategy), then the pair rate and the flatness ratios."""
    rows: dict[tuple, dict[int, float]] = defaultdict(dict)
    pairs = {}
    for b in benchmarks:
        info = b["extra_info"]
        if info.get("op") in ("unmark", "mark_volatile"):
            key = (info["op"], info["purged"], info["strategy"])
            rows[key][info["pages"]] = b["stats"]["median"]
        elif info.get("op") == "mark+unmark":
            pairs[info["strategy"]] = info["pairs"] / b["stats"]["median"]
    sizes = sorted({p for r in rows.values() for p in r})
    out = ["| op | purged | strategy | " + " | ".join(f"{s} pages" for s in sizes)
           + " | largest / 1 page |",
           "|---|---|---|" + "---|" * len(sizes) + "---|"]
    for (op, purged, strategy), by_size in sorted(rows.items()):
        cells = [fmt_seconds(by_size[s]) if s in by_size else "" for s in sizes]
        ratio = by_size[sizes[-1]] / by_size[sizes[0]]
        out.append(f"| {op} | {purged} | {strategy} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    if pairs:
        out.append("")
        out.append("| strategy | 1-page mark+unmark pairs per second |")
        out.append("|---|---|")
        for strategy, rate in sorted(pairs.items()):
            out.append(f"| {strategy} | {rate / 1e6:.2f} million |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    """Print the tables of the JSON file named on the command line."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(pagetable_tables(load(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
