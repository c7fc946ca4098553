"""A real DiscardableCache and its manager, watched by DiscacheCollector, scraped by Prometheus."""
from __future__ import annotations

import gc
import socket
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from discache import DiscardableCache, DiscardableMemoryManager
from discache.cache import EVICTION_REASONS
from discache.manager import PAGE
from discache.demo import run_demo
from discache.metrics import DiscacheCollector, Exporter


TILE_PAGES = 10  # 40,000 B: above the cache's largest size class, each tile has a slab of its own
TILE = 40_000


def busy_cache() -> DiscardableCache:
    """8 entries; a hit, a miss; all unlocked; critical pressure; a purged get; a regeneration."""
    manager = DiscardableMemoryManager(limit=1 << 20, backend="memfd")
    cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=0)
    for i in range(8):
        cache[f"tile/{i}"] = bytes([i]) * TILE
    assert cache.get("tile/1") == bytes([1]) * TILE
    assert cache.get("tile/missing") is None
    cache.sweep(idle=0)
    assert manager.on_memory_pressure("critical") == 8 * TILE_PAGES * PAGE
    assert cache.get("tile/2") is None  # purged by the manager: reported, dropped
    assert cache.get_or_create("tile/3", lambda: b"x" * TILE) == b"x" * TILE
    return cache


def test_a_real_prometheus_sees_what_the_cache_and_manager_report(prometheus, metrics_endpoint):
    registry = CollectorRegistry()
    cache = busy_cache()
    collector = DiscacheCollector(registry)
    collector.watch(cache, "tiles")
    collector.watch(cache.manager, "tiles-manager")
    server = prometheus([metrics_endpoint(registry)])
    server.wait_for_scrape()

    def scraped(series, name="tiles", **labels):
        inner = ",".join(f'{k}="{v}"' for k, v in sorted({"name": name, **labels}.items()))
        return server.wait_for_value(f"{series}{{{inner}}}")

    stats, snap = cache.stats(), cache.metrics_snapshot()
    assert scraped("discache_cache_hits_total") == stats["hits"] == 1
    assert scraped("discache_cache_misses_total") == stats["misses"] == 3
    assert scraped("discache_regenerations_total") == stats["regenerations"] == 1
    for reason in EVICTION_REASONS:
        assert scraped("discache_evictions_total", reason=reason) == stats[f"evictions_{reason}"]
    assert stats["evictions_purged"] == 2
    for series, key in (("discache_allocated_bytes", "allocated_bytes"),
                        ("discache_locked_bytes", "locked_bytes"),
                        ("discache_unlocked_bytes", "unlocked_bytes"),
                        ("discache_purged_bytes_total", "purged_bytes")):
        assert scraped(series) == snap[key], series
    assert snap["allocated_bytes"] == 7 * TILE_PAGES * PAGE
    assert snap["purged_bytes"] == 2 * TILE_PAGES * PAGE
    assert scraped("discache_locks_total", result="purged") == stats["purges_detected"] == 2

    manager = cache.manager.stats()
    assert scraped("discache_allocated_bytes", "tiles-manager") == manager["allocated_bytes"]
    assert scraped("discache_purged_bytes_total", "tiles-manager") == 8 * TILE_PAGES * PAGE
    assert scraped("discache_locks_total", "tiles-manager", result="purged") == \
        manager["locks_purged"] == 2
    assert scraped("discache_memory_pressure_events_total", "tiles-manager",
                   level="critical") == 1
    assert scraped("discache_memory_pressure_events_total", "tiles-manager",
                   level="moderate") == 0

    # the next scrape follows the cache
    assert cache.get("tile/3") == b"x" * TILE
    assert server.wait_for_value('discache_cache_hits_total{name="tiles"}', expect=2.0) == 2


def test_a_collected_cache_leaves_the_export():
    registry = CollectorRegistry()
    collector = DiscacheCollector(registry)
    cache = busy_cache()
    collector.watch(cache, "tiles")
    assert registry.get_sample_value("discache_cache_hits_total", {"name": "tiles"}) == 1
    del cache
    gc.collect()
    assert registry.get_sample_value("discache_cache_hits_total", {"name": "tiles"}) is None


def test_exporter_serves_on_loopback_and_frees_its_port():
    cache = busy_cache()
    with Exporter(0) as exporter:
        exporter.watch(cache, "tiles")
        assert exporter.addr == "127.0.0.1" and exporter.port > 0
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert 'discache_cache_hits_total{name="tiles"} 1.0' in text
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", exporter.port), timeout=5).close()


def test_a_real_prometheus_scrapes_the_demo_while_it_runs(prometheus):
    """discache demo's own cache and manager, checked against their snapshots at two phases."""
    checked = []
    with Exporter(0) as exporter:
        server = prometheus([f"127.0.0.1:{exporter.port}"])
        server.wait_for_scrape()

        def on_phase(name, cache):
            if not exporter.collector.watched():
                exporter.watch(cache, "demo")
                exporter.watch(cache.manager, "demo-manager")
            if name not in ("go idle", "verify"):
                return
            # the demo pauses here: what Prometheus scrapes must be the cache's numbers now;
            # the idle timer unlocks the bitmaps by itself within 2 x idle_unlock: wait for it,
            # so that the locked bytes stay what the snapshot says while Prometheus scrapes
            deadline = time.monotonic() + 10
            while cache.manager.stats()["locked_bytes"] and time.monotonic() < deadline:
                time.sleep(0.01)
            snap, manager = cache.metrics_snapshot(), cache.manager.metrics_snapshot()
            for series, key in (("discache_allocated_bytes", "allocated_bytes"),
                                ("discache_cache_hits_total", "hits"),
                                ("discache_cache_misses_total", "misses"),
                                ("discache_regenerations_total", "regenerations"),
                                ("discache_purged_bytes_total", "purged_bytes")):
                assert server.wait_for_value(f'{series}{{name="demo"}}',
                                             expect=float(snap[key])) == snap[key], series
            assert server.wait_for_value(
                'discache_locked_bytes{name="demo-manager"}',
                expect=float(manager["locked_bytes"])) == manager["locked_bytes"]
            checked.append((name, snap["misses"], snap["regenerations"]))

        result = run_demo(12, 192, "madvfree", reclaim=0.5, seed=3, on_phase=on_phase)
    assert result.consistent and result.corrupt == 0
    assert [c[0] for c in checked] == ["go idle", "verify"]
    (_, misses_idle, regen_idle), (_, misses_end, regen_end) = checked
    assert misses_idle == 12 and regen_idle == 0, "every image decoded once"
    assert result.chosen == 6
    assert regen_end == result.regenerations == result.chosen + result.taken_early, \
        "the reclaimed half (and any bitmap the kernel took on its own) was regenerated"
