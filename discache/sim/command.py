"""`discache simulate`: replay a workload under each design and print what each one cost."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from ..argtypes import positive_int
from .kernel import MADV_NONVOLATILE, MADV_VOLATILE, SimulatedKernel
from .replay import DESIGNS, Replayer, TraceError, read_trace
from .workload import image_cache


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `simulate` subcommand."""
    p = sub.add_parser("simulate", help=run.__doc__, description=__doc__)
    p.add_argument("--trace", metavar="FILE", help="replay this trace file (format: docs/sim.md) "
                   "instead of the built-in image cache; '-' reads standard input")
    p.add_argument("--designs", default=",".join(DESIGNS),
                   help="comma-separated designs to compare (default: all of "
                        f"{', '.join(DESIGNS)})")
    p.add_argument("--ram-pages", type=positive_int, default=1 << 16,
                   help="simulated RAM (default 65536)")
    p.add_argument("--swap-pages", type=_natural, default=0,
                   help="simulated swap (default 0: swapless)")
    p.add_argument("--page-size", type=positive_int, default=4096,
                   help="page size in bytes (default 4096)")
    p.add_argument("--steps", type=_natural, default=6000,
                   help="built-in workload: steps (default 6000)")
    p.add_argument("--images", type=positive_int, default=384,
                   help="built-in workload: images (default 384)")
    p.add_argument("--image-pages", type=positive_int, default=256,
                   help="built-in workload: pages per image (default 256)")
    p.add_argument("--seed", type=int, default=1, help="built-in workload: random seed (default 1)")
    p.add_argument("--workload-only", action="store_true",
                   help="skip the unmark sweep, fork accounting and swapless reclaim tables")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Replay a workload on the simulated kernel under each design and compare them."""
    names = [n.strip() for n in args.designs.split(",") if n.strip()]
    unknown = [n for n in names if n not in DESIGNS]
    if unknown or not names:
        print(f"discache simulate: unknown design(s) {', '.join(unknown) or '(none)'}; "
              f"choose from {', '.join(DESIGNS)}", file=sys.stderr)
        return 2
    try:
        if args.trace:
            stream = sys.stdin if args.trace == "-" else open(args.trace, encoding="utf-8")
            with stream:
                ops = read_trace(stream, args.trace)
            title = f"trace {args.trace}"
        else:
            ops = list(image_cache(args.images, args.image_pages, args.steps, seed=args.seed))
            title = (f"built-in image cache: {args.images} images x {args.image_pages} pages, "
                     f"{args.steps} steps, seed {args.seed}")
    except (OSError, TraceError) as e:
        print(f"discache simulate: {e}", file=sys.stderr)
        return 2
    report: dict = {"workload": title, "ram_pages": args.ram_pages, "swap_pages": args.swap_pages,
                    "page_size": args.page_size, "designs": []}
    failed = 0
    for name in names:
        try:
            replayer = Replayer(DESIGNS[name], args.ram_pages, args.swap_pages, args.page_size)
            result = replayer.run(ops)
        except (TraceError, OSError, MemoryError, KeyError, ValueError) as e:
            # One design may not apply (MADV_FREE on shared memory): report it, run the others.
            print(f"discache simulate: {name}: the workload failed: {e!r}", file=sys.stderr)
            failed += 1
            continue
        report["designs"].append(result.row())
    if not report["designs"]:
        return 1
    if not args.workload_only:
        report["unmark_sweep"] = unmark_sweep()
        report["fork_accounting"] = fork_accounting()
        report["swapless_reclaim"] = swapless_reclaim()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    return 1 if failed else 0


def unmark_sweep(sizes: Sequence[int] = (1, 64, 4096, 262144, 1 << 20),
                 repeats: int = 3) -> list[dict]:
    """Cost of MADV_NONVOLATILE (and MADV_VOLATILE) on one range of growing size, token vs walk,
    with 10% of the range purged; times are medians of `repeats` fresh kernels."""
    rows = []
    for n in sizes:
        row: dict = {"pages": n}
        for strategy in ("token", "walk"):
            samples = [_unmark_once(strategy, n) for _ in range(repeats)]
            unmark_us, visits, mark_us, mark_visits = (sorted(col)[len(col) // 2]
                                                       for col in zip(*samples))
            row.update({f"{strategy} us": unmark_us, f"{strategy} visits": visits,
                        f"{strategy} mark us": mark_us, f"{strategy} mark visits": mark_visits})
        rows.append(row)
    return rows


def _unmark_once(strategy: str, n: int) -> tuple[float, int, float, int]:
    purged = n // 10
    k = SimulatedKernel(ram_pages=max(purged, 1), page_size=4096, strategy=strategy,
                        va_pages=max(n, 1 << 16))
    p = k.spawn()
    a = p.mmap(n * 4096)
    p.touch(a, purged * 4096, write=True)
    p.madvise(a, n * 4096, MADV_VOLATILE)
    k.reclaim(purged)
    before = k.stats()["pte_visits"]
    t0 = time.perf_counter_ns()
    p.madvise(a, n * 4096, MADV_NONVOLATILE)
    unmark_us = (time.perf_counter_ns() - t0) / 1000
    visits = k.stats()["pte_visits"] - before
    before = k.stats()["pte_visits"]
    t0 = time.perf_counter_ns()
    p.madvise(a, n * 4096, MADV_VOLATILE)
    mark_us = (time.perf_counter_ns() - t0) / 1000
    return unmark_us, visits, mark_us, k.stats()["pte_visits"] - before


def fork_accounting(pages: int = 1024, children: int = 2) -> list[dict]:
    """Per-process volatile counts vs discardable physical pages when pages are shared by fork."""
    rows = []
    for who in ("all", "parent only"):
        k = SimulatedKernel(ram_pages=4 * pages, page_size=4096)
        parent = k.spawn()
        a = parent.mmap(pages * 4096)
        parent.touch(a, pages * 4096, write=True)
        if who == "all":
            parent.madvise(a, pages * 4096, MADV_VOLATILE)
        kids = [parent.fork() for _ in range(children)]
        if who != "all":
            parent.madvise(a, pages * 4096, MADV_VOLATILE)
        per_process = [proc.volatile_pages() for proc in (parent, *kids)]
        rows.append({"marked by": who, "per-process": per_process, "sum": sum(per_process),
                     "physical discardable": k.volatile_pages(),
                     "reclaimable now": k.reclaim(pages)})
    return rows


def swapless_reclaim(ram_pages: int = 1 << 18, ask: int = 4096) -> list[dict]:
    """Scanning cost of swapless reclaim, by how much is volatile and whether it was written first
    or last."""
    rows = []
    cases = ((0.0, "-", True), (0.0, "-", False), (0.10, "first", False),
             (0.10, "last", False), (0.02, "last", False))
    for fraction, where, always in cases:
        k = SimulatedKernel(ram_pages=ram_pages, page_size=4096, always_age=always)
        p = k.spawn()
        nvol = int(ram_pages * fraction)
        a = p.mmap(ram_pages * 4096)
        vol = a if where == "first" else a + (ram_pages - nvol) * 4096
        p.touch(a, ram_pages * 4096, write=True)
        if nvol:
            p.madvise(vol, nvol * 4096, MADV_VOLATILE)
        t0 = time.perf_counter_ns()
        freed = k.reclaim(ask)
        elapsed = (time.perf_counter_ns() - t0) / 1e6
        scanned = k.stats()["reclaim_scanned"]
        # The same again: the clock has cleared the referenced bits it passed (steady state).
        t0 = time.perf_counter_ns()
        again = k.reclaim(ask)
        again_ms = (time.perf_counter_ns() - t0) / 1e6
        again_scanned = k.stats()["reclaim_scanned"] - scanned
        rows.append({"policy": "always age" if always else "age while volatile",
                     "volatile": f"{fraction:.0%}", "written": where, "asked": ask, "freed": freed,
                     "scanned": scanned, "scanned/freed": scanned / freed if freed else None,
                     "ms": elapsed, "next freed": again, "next scanned": again_scanned,
                     "next ms": again_ms})
    return rows


def _table(rows: list[dict]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if v >= 10 or v == 0 else f"{v:.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "-" if v is None else str(v)
    cols = list(rows[0])
    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_report(report: dict) -> None:
    """The tables, for a terminal."""
    print(f"discache simulate: {report['workload']}")
    print(f"RAM {report['ram_pages']:,} pages, swap {report['swap_pages']:,} pages, "
          f"page size {report['page_size']} bytes\n")
    print(_table(report["designs"]))
    if "unmark_sweep" in report:
        print("\nMADV_NONVOLATILE (unmark) and MADV_VOLATILE (mark) on one range, 10% purged:")
        print(_table(report["unmark_sweep"]))
        print("\nVolatile pages under fork (1024 pages, 2 children):")
        print(_table(report["fork_accounting"]))
        print("\nSwapless reclaim of 4096 pages from 262,144 resident pages, twice:")
        print(_table(report["swapless_reclaim"]))
