"""A tiny cache over a real PageTable that implements the metrics_snapshot() protocol, for tests."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from discache import PageTable
from discache.metrics import LatencyHistogram

PAGE = 4096


class PageTableCache:
    """One page per entry; entries are unlocked (volatile) between uses; pressure purges them."""

    def __init__(self, capacity: int):
        self.table = PageTable(capacity, "token")
        self.free = list(range(capacity - 1, -1, -1))
        self.pages: dict[Any, int] = {}  # key -> page, in insertion order (eviction order)
        self.values: dict[Any, Any] = {}
        self.locked: set[Any] = set()
        self.purged_pages = 0
        self.locks: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.pressure_events: Counter[str] = Counter()
        self.hits = self.misses = self.regenerations = 0
        self.durations = {"lock": LatencyHistogram(), "unlock": LatencyHistogram()}

    def get(self, key: Any, make: Callable[[Any], Any], keep_locked: bool = False) -> Any:
        """The value of key, made (again) when absent or purged; unlocked after, unless asked."""
        page = self.pages.get(key)
        if page is None:
            self.misses += 1
            page = self._new_page()
            self.pages[key] = page
            self.values[key] = make(key)
        elif key not in self.locked:
            start = time.perf_counter()
            purged = self.table.unmark(page, 1)
            self.durations["lock"].observe(time.perf_counter() - start)
            self.locks["purged" if purged else "success"] += 1
            if purged:
                self.misses += 1
                self.regenerations += 1
                self.table.populate(page, 1)
                self.values[key] = make(key)
            else:
                self.hits += 1
        else:
            self.hits += 1
        self.locked.add(key)
        if not keep_locked:
            self.unlock(key)
        return self.values[key]

    def unlock(self, key: Any) -> None:
        """Let the entry be purged until its next get."""
        start = time.perf_counter()
        self.table.mark_volatile(self.pages[key], 1)
        self.durations["unlock"].observe(time.perf_counter() - start)
        self.locked.discard(key)

    def on_pressure(self, level: str) -> None:
        """A PressureMonitor callback: purge every unlocked entry (the kernel's part, simulated)."""
        self.pressure_events[level] += 1
        for key, page in self.pages.items():
            if key not in self.locked and self.table.purge(page):
                self.purged_pages += 1

    def _new_page(self) -> int:
        if not self.free:
            victim = next((k for k in self.pages if k not in self.locked), None)
            if victim is None:
                raise MemoryError("every entry is locked")
            page = self.pages.pop(victim)
            del self.values[victim]
            self.table.unmark(page, 1)
            self.table.discard(page, 1)
            self.evictions["capacity"] += 1
            self.free.append(page)
        page = self.free.pop()
        self.table.populate(page, 1)
        return page

    def metrics_snapshot(self) -> dict[str, Any]:
        """The numbers discache.metrics exports, from this cache's state."""
        return {
            "allocated_bytes": len(self.pages) * PAGE,
            "locked_bytes": len(self.locked) * PAGE,
            "unlocked_bytes": (len(self.pages) - len(self.locked)) * PAGE,
            "purged_bytes": self.purged_pages * PAGE,
            "locks": dict(self.locks),
            "evictions": dict(self.evictions),
            "hits": self.hits,
            "misses": self.misses,
            "regenerations": self.regenerations,
            "pressure_events": dict(self.pressure_events),
            "durations": {op: h.snapshot() for op, h in self.durations.items()},
        }
