"""Leak checks: 100,000 allocate/write/unlock/lock/close cycles per backend, for the manager and
for the cache, each in its own process; open fds, mappings and threads return to their level
after a warm-up, RSS within RSS_TOLERANCE. The pressure monitor leaves no thread or fd behind."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from discache import DiscardableMemoryManager, backends
from discache.pressure import PressureMonitor

CYCLES = int(os.environ.get("DISCACHE_LEAK_CYCLES", "100000"))
RSS_TOLERANCE = 4 << 20  # bytes: allocator and interpreter noise, far below one page per cycle
MAPS_TOLERANCE = 2  # lines of /proc/self/maps: the allocator may split or merge an arena
HERE = os.path.dirname(os.path.abspath(__file__))
AVAILABLE = {info.name for info in backends.available() if info.available}
RUNS = [("backend", b) for b in ("madvfree", "madvfree-sigbus", "memfd", "simulated")] + \
    [(kind, b) for kind in ("manager", "cache") for b in ("madvfree", "memfd", "simulated")]


def run(kind: str, backend: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "leak_cycles.py"), kind, backend,
                           str(CYCLES)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def leak_results(request):
    runnable = [r for r in RUNS if r[1] in AVAILABLE]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {r: pool.submit(run, *r) for r in runnable}
        results = {f"{kind}/{backend}": f.result() for (kind, backend), f in futures.items()}
    if getattr(request.config, "cache", None) is not None:  # absent with -p no:cacheprovider
        request.config.cache.set("discache/leak_results", results)
    for name, r in results.items():
        delta = {k: r["after"][k] - r["before"][k] for k in r["before"]}
        print(f"\n{name}: {CYCLES} cycles in {r['seconds']} s, deltas {delta}", end="")
    return results


@pytest.mark.parametrize("kind,backend", [
    pytest.param(kind, b, id=f"{kind}-{b}", marks=() if b in AVAILABLE else pytest.mark.skip(
        reason=f"backend {b!r} does not run here")) for kind, b in RUNS])
def test_cycles_leak_nothing(leak_results, kind, backend):
    r = leak_results[f"{kind}/{backend}"]
    before, after = r["before"], r["after"]
    assert after["fds"] == before["fds"], r
    assert after["threads"] == before["threads"], r
    assert abs(after["maps"] - before["maps"]) <= MAPS_TOLERANCE, r
    assert after["rss"] - before["rss"] <= RSS_TOLERANCE, r


def _fds() -> set:
    gc.collect()  # fds of earlier tests' garbage must not close in the middle of a comparison
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("source", ["auto", "meminfo"])
def test_pressure_monitor_leaves_no_thread_or_fd(source):
    threads, fds = set(threading.enumerate()), _fds()
    for _ in range(20):
        monitor = PressureMonitor(lambda level: None, source=source,
                                  meminfo_interval=0.01).start()
        assert monitor.running
        monitor.stop()
        monitor.stop()  # twice is harmless
        assert not monitor.running
    assert set(threading.enumerate()) == threads
    assert _fds() == fds


def test_manager_stop_ends_its_threads_and_fds():
    threads, fds = set(threading.enumerate()), _fds()
    manager = DiscardableMemoryManager(1 << 20, "madvfree")
    manager.start_background_purge(interval=0.01)
    manager.watch_pressure()
    assert len(threading.enumerate()) == len(threads) + 2
    manager.stop()
    assert set(threading.enumerate()) == threads
    assert _fds() == fds
