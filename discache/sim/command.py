"""`discache simulate`: replay a workload under each design and print what each one cost."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Iterator, Sequence

from ..argtypes import integer, natural, positive_int, power_of_two, some_of
from .kernel import MADV_NONVOLATILE, MADV_VOLATILE, SimulatedKernel
from .replay import DESIGNS, Replayer, TraceError, read_trace
from .workload import image_cache

PROGRESS_EVERY = 2000  # operations between two advances of a design's progress bar


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `simulate` subcommand."""
    from ..cli import add_subcommand

    p = add_subcommand(sub, "simulate", run.__doc__ or "")
    p.add_argument("--trace", metavar="FILE", help="replay this trace file (format: docs/sim.md) "
                   "instead of the built-in image cache, and print only its results; '-' reads "
                   "standard input")
    p.add_argument("--designs", type=some_of(tuple(DESIGNS)), default=list(DESIGNS),
                   metavar="DESIGNS", help="comma-separated designs to compare (default: all of "
                   f"{','.join(DESIGNS)})")
    p.add_argument("--ram-pages", type=positive_int, default=1 << 16, metavar="N",
                   help="simulated RAM in pages (default 65536)")
    p.add_argument("--swap-pages", type=natural, default=0, metavar="N",
                   help="simulated swap in pages (default 0: swapless)")
    p.add_argument("--page-size", type=power_of_two(64, 2 << 20), default=4096, metavar="BYTES",
                   help="page size in bytes, a power of two from 64 to 2097152 (default 4096)")
    p.add_argument("--steps", type=natural, default=6000, metavar="N",
                   help="built-in workload: steps (default 6000)")
    p.add_argument("--images", type=positive_int, default=384, metavar="N",
                   help="built-in workload: images (default 384)")
    p.add_argument("--image-pages", type=positive_int, default=256, metavar="N",
                   help="built-in workload: pages per image (default 256)")
    p.add_argument("--seed", type=integer, default=1, metavar="N",
                   help="built-in workload: random seed (default 1)")
    p.add_argument("--workload-only", action="store_true",
                   help="built-in workload: skip the unmark sweep, fork accounting and swapless "
                        "reclaim tables")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--wide", action="store_true",
                   help="print each table in one piece, however wide (default: tables fit 100 "
                        "columns, split when wider)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (drawn on standard error, only on a terminal anyway)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Replay a workload on the simulated kernel under each design and compare what each cost.

    The workload is the built-in image cache (--steps, --images, --image-pages, --seed), or a
    trace file (--trace, format in docs/sim.md).  For the built-in workload, three experiments
    follow (unless --workload-only): the unmark cost against range size, volatile pages under
    fork, and swapless reclaim.  Exit status: 0, 1 if a design failed on the workload, 2 for a
    bad option or an unreadable trace."""
    from ..demo import Progress

    names = args.designs
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
    drawing = args.progress and sys.stderr.isatty()
    errors: dict[str, list[str]] = {}
    for name in names:
        bar = Progress(name, len(ops), sys.stderr, drawing)
        try:
            replayer = Replayer(DESIGNS[name], args.ram_pages, args.swap_pages, args.page_size)
            result = replayer.run(_counted(ops, bar))
        except (TraceError, OSError, MemoryError, KeyError, ValueError) as e:
            # One design may not apply (MADV_FREE on shared memory): report it, run the others.
            errors.setdefault(str(e) or type(e).__name__, []).append(name)
            continue
        finally:
            bar.close()
        report["designs"].append(result.row())
        if result.recorded_locks:
            report["recorded"] = {"locks": result.recorded_locks,
                                  "locks purged": result.recorded_purged_locks}
    for message, failed in errors.items():
        print(f"discache simulate: {', '.join(failed)}: the workload failed: {message}",
              file=sys.stderr)
    if not report["designs"]:
        return 1
    if not args.workload_only and not args.trace:
        experiments = (("unmark_sweep", unmark_sweep), ("fork_accounting", fork_accounting),
                       ("swapless_reclaim", swapless_reclaim))
        bar = Progress("experiments", len(experiments), sys.stderr, drawing)
        for key, experiment in experiments:
            report[key] = experiment()
            bar.advance()
        bar.close()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report, args.wide)
    return 1 if errors else 0


def _counted(ops: list, bar: Any) -> Iterator:
    """ops, advancing bar every PROGRESS_EVERY operations."""
    for start in range(0, len(ops), PROGRESS_EVERY):
        yield from ops[start:start + PROGRESS_EVERY]
        bar.advance(min(PROGRESS_EVERY, len(ops) - start))


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


def print_report(report: dict, wide: bool = False) -> None:
    """The tables, for a terminal: each fits 100 columns unless wide."""
    from ..cli import format_table

    def table(rows: list[dict]) -> str:
        return format_table(rows, wide=wide)

    print(f"discache simulate: {report['workload']}")
    print(f"RAM {report['ram_pages']:,} pages, swap {report['swap_pages']:,} pages, "
          f"page size {report['page_size']} bytes\n")
    print(table(report["designs"]))
    if "recorded" in report:
        recorded = report["recorded"]
        print(f"\nrecorded on the real kernel: {recorded['locks']:,} locks, "
              f"{recorded['locks purged']:,} of them found a purge")
    if "unmark_sweep" in report:
        print("\nMADV_NONVOLATILE (unmark) and MADV_VOLATILE (mark) on one range, 10% purged:")
        print(table(report["unmark_sweep"]))
        print("\nVolatile pages under fork (1024 pages, 2 children):")
        print(table(report["fork_accounting"]))
        print("\nSwapless reclaim of 4096 pages from 262,144 resident pages, twice:")
        print(table(report["swapless_reclaim"]))
