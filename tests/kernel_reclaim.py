"""Helpers for tests that need the real kernel to discard pages (imported by the test files)."""
from __future__ import annotations

import time

import discache

# Now and then the kernel keeps a page off the LRU (isolated, active, swap-backed) for more than
# 10 s, by an agent not identified here, and force_reclaim cannot discard it.  Tests ask for
# what they need (at_least) and wait up to this long; what was discarded is read from mincore.
PATIENCE_S = 10.0


def reclaim(mem, first: int = 0, count: int = -1, *, at_least: int = 1) -> set[int]:
    """force_reclaim pages of unlocked mem until at_least are gone; returns the pages gone."""
    count = mem.npages - first if count < 0 else count
    deadline = time.monotonic() + PATIENCE_S
    while True:
        if mem.backend.startswith("madvfree"):
            mem._force_reclaim(first, count)
            gone = {p for p in range(mem.npages) if not mem._resident_pages(p, 1)}
        else:  # policy-purged backends (memfd): all or nothing, never held back
            gone = set(range(mem.npages)) if discache.force_reclaim(mem) else set()
        if len(gone & set(range(first, first + count))) >= at_least:
            return gone
        if time.monotonic() > deadline:
            raise AssertionError(f"the kernel kept {mem!r}'s pages for {PATIENCE_S} s")
        time.sleep(0.2)
