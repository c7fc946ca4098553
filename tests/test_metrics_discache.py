"""A real DiscardableCache and its manager, watched by DiscacheCollector, scraped by Prometheus."""
from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from discache import DiscardableCache, DiscardableMemoryManager
from discache.cache import EVICTION_REASONS
from discache.manager import PAGE
from discache.metrics import DiscacheCollector


def busy_cache() -> DiscardableCache:
    """8 entries; a hit, a miss; all unlocked; critical pressure; a purged get; a regeneration."""
    manager = DiscardableMemoryManager(limit=1 << 20, backend="memfd")
    cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=0)
    for i in range(8):
        cache[f"tile/{i}"] = bytes([i]) * PAGE
    assert cache.get("tile/1") == bytes([1]) * PAGE
    assert cache.get("tile/missing") is None
    assert cache.sweep(idle=0) == 8
    assert manager.on_memory_pressure("critical") == 8 * PAGE
    assert cache.get("tile/2") is None  # purged by the manager: reported, dropped
    assert cache.get_or_create("tile/3", lambda: b"x" * PAGE) == b"x" * PAGE
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
    assert snap["allocated_bytes"] == 7 * PAGE and snap["purged_bytes"] == 2 * PAGE
    assert scraped("discache_locks_total", result="purged") == stats["purges_detected"] == 2

    manager = cache.manager.stats()
    assert scraped("discache_allocated_bytes", "tiles-manager") == manager["allocated_bytes"]
    assert scraped("discache_purged_bytes_total", "tiles-manager") == 8 * PAGE
    assert scraped("discache_locks_total", "tiles-manager", result="purged") == \
        manager["locks_purged"] == 2
    assert scraped("discache_memory_pressure_events_total", "tiles-manager",
                   level="critical") == 1
    assert scraped("discache_memory_pressure_events_total", "tiles-manager",
                   level="moderate") == 0

    # the next scrape follows the cache
    assert cache.get("tile/3") == b"x" * PAGE
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
