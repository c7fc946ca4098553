"""What a DiscardableCache entry really costs: discardable memory and RSS against currsize.

Run: python bench/cache_footprint.py [--mib 32]

For each value size (100 B, 1 KiB, 3 KiB, 64 KiB) a fresh child process fills a DiscardableCache
(its own madvfree manager; maxsize and limit large enough that nothing is evicted or purged) with
--mib MiB of values under keys "k0", "k1"..., then reports currsize, the discardable memory the
manager allocated, their ratio, and how much the process's resident set grew. Target (issue
10, deliverable 5): allocated <= 1.25x currsize. "outside/entry" is the RSS growth per entry
beyond the discardable memory: the key, the entry's bookkeeping and the Python objects around it.
A child stops filling early (and says so) if its RSS grows past --max-rss-mib.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's discache

SIZES = (100, 1024, 3 * 1024, 64 * 1024)
TARGET = 1.25
PAGE = os.sysconf("SC_PAGE_SIZE")
RSS_CHECK_EVERY = 4096  # entries between two reads of /proc/self/statm


def rss_bytes() -> int:
    """The process's resident set, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def fill(size: int, total: int, max_rss: int) -> dict:
    """Fill a fresh cache with total bytes of size-byte values; its footprint figures."""
    from discache.cache import DiscardableCache
    from discache.manager import DiscardableMemoryManager

    entries = max(1, total // size)
    # room for a page per value and more: the limit must never purge, maxsize never evict
    worst = entries * -(-size // PAGE) * PAGE
    manager = DiscardableMemoryManager(2 * worst + (64 << 20), "madvfree")
    cache = DiscardableCache(2 * entries * size, manager=manager)
    value = bytes(i % 251 for i in range(size))
    keys = [f"k{i}" for i in range(entries)]  # made before the first reading: not the cache's
    before = rss_bytes()
    stopped = False
    for i, key in enumerate(keys):
        cache[key] = value
        if i % RSS_CHECK_EVERY == RSS_CHECK_EVERY - 1 and rss_bytes() - before > max_rss:
            stopped = True
            break
    grown = rss_bytes() - before
    stats = manager.stats()
    figures = {"size": size, "entries": len(cache), "currsize": cache.currsize,
               "allocated": stats["allocated_bytes"], "rss_growth": grown, "stopped": stopped,
               "evicted": cache.stats().get("evictions_size", 0)}
    cache.close()
    return figures


def fmt_bytes(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def table(rows: list[dict]) -> str:
    """The figures as a Markdown table under 100 columns."""
    head = ("| value | entries | currsize | allocated | ratio | met | RSS growth | RSS/entry "
            "| outside/entry |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        ratio = r["allocated"] / r["currsize"] if r["currsize"] else float("inf")
        n = max(1, r["entries"])
        lines.append(
            f"| {fmt_bytes(r['size'])} | {r['entries']:,} | {fmt_bytes(r['currsize'])} "
            f"| {fmt_bytes(r['allocated'])} | {ratio:.2f}x | {'yes' if ratio <= TARGET else 'no'} "
            f"| {fmt_bytes(r['rss_growth'])} | {r['rss_growth'] / n:,.0f} B "
            f"| {(r['rss_growth'] - r['allocated']) / n:,.0f} B |")
        if r["stopped"]:
            notes.append(f"{fmt_bytes(r['size'])}: stopped at {r['entries']:,} entries, the RSS "
                         "limit reached")
        if r["evicted"]:
            notes.append(f"{fmt_bytes(r['size'])}: {r['evicted']:,} entries evicted")
    return "\n".join(lines + [""] + notes if notes else lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB of values per size (default 32)")
    parser.add_argument("--max-rss-mib", type=int, default=4096,
                        help="stop filling when the RSS grew by this much (default 4096)")
    parser.add_argument("--one", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mib <= 0 or args.max_rss_mib <= 0:
        parser.error("--mib and --max-rss-mib must be positive")
    if args.one is not None:  # a child: one size, its figures as JSON
        print(json.dumps(fill(args.one, args.mib << 20, args.max_rss_mib << 20)))
        return 0
    rows = []
    for size in SIZES:
        child = subprocess.run([sys.executable, __file__, "--one", str(size), "--mib",
                                str(args.mib), "--max-rss-mib", str(args.max_rss_mib)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(f"cache_footprint: the {size} B child failed:\n{child.stderr}", file=sys.stderr)
            return 1
        rows.append(json.loads(child.stdout.splitlines()[-1]))
    print(f"DiscardableCache footprint, madvfree, {args.mib} MiB of values per size")
    print(f"ratio: discardable memory allocated / currsize, target <= {TARGET}x")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
