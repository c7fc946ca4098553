"""Run allocate/lock/unlock/close cycles of one kind and print, as JSON, the process's open fds,
mappings, RSS and threads before and after (run by tests/test_leaks.py in its own process)."""
from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import discache  # noqa: E402
from discache import DiscardableCache, DiscardableMemoryManager  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
WARMUP = 2000  # cycles before the first measurement: interpreter caches, free lists, probes
RECLAIM_EVERY = 256  # cycles between forced reclaims (MADV_PAGEOUT on every CPU is slow)


def measure() -> dict:
    gc.collect()
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * PAGE
    return {"fds": len(os.listdir("/proc/self/fd")), "maps": maps, "rss": rss,
            "threads": threading.active_count()}


def backend_cycle(backend: str):
    sigbus = backend == "madvfree-sigbus"
    name = "madvfree" if sigbus else backend

    def cycle(i: int) -> None:
        mem = discache.allocate(PAGE + i % 3 * 1000, name, sigbus=sigbus)
        mem.write(b"x" * 64)
        mem.unlock()
        if i % RECLAIM_EVERY == 0:
            discache.force_reclaim(mem)  # a purge now and then: the lost path must not leak
        mem.lock()
        mem.close()
    return cycle, None


def manager_cycle(backend: str):
    manager = DiscardableMemoryManager(64 * PAGE, backend, segment_bytes=16 * PAGE)

    def cycle(i: int) -> None:
        mem = manager.allocate(PAGE + i % 5 * 1000)
        mem.write(b"x" * 64)
        mem.unlock()
        if i % RECLAIM_EVERY == 0:
            manager.release_free_memory()
        mem.lock()
        mem.close()
    return cycle, manager


def cache_cycle(backend: str):
    manager = DiscardableMemoryManager(64 * PAGE, backend, segment_bytes=16 * PAGE)
    cache = DiscardableCache(32 * PAGE, backend, manager=manager, idle_unlock=0)
    value = b"v" * 3000

    def cycle(i: int) -> None:
        key = i % 64
        cache[key] = value
        cache.sweep(idle=0)  # unlock
        if i % RECLAIM_EVERY == 0:
            discache.force_reclaim(cache)
        cache.get(key)  # lock again (or find it purged)
        cache.pop(key, None)  # gone already if it was purged
    # An emptied slab stays for reuse until the next idle tick; a sweep gives it back now.
    cycle.settle = lambda: cache.sweep(0)  # type: ignore[attr-defined]
    return cycle, manager


KINDS = {"backend": backend_cycle, "manager": manager_cycle, "cache": cache_cycle}


def main() -> None:
    kind, backend, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cycle, manager = KINDS[kind](backend)
    for i in range(WARMUP):
        cycle(i)
    before = measure()
    start = time.monotonic()
    for i in range(cycles):
        cycle(i)
    seconds = time.monotonic() - start
    getattr(cycle, "settle", lambda: None)()
    after = measure()
    if manager is not None:
        assert manager.segment_count == 0 and manager.bytes_allocated == 0, manager.stats()
    print(json.dumps({"before": before, "after": after, "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
