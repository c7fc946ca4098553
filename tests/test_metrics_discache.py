"""A real DiscardableCache and its manager, exported through DiscacheCollector, scraped by Prometheus.

The cache and the manager have no metrics_snapshot() yet: CacheMetrics builds it from their stats(),
which is all they need to plug in.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from discache import DiscardableCache, DiscardableMemoryManager
from discache.cache import EVICTION_REASONS
from discache.manager import PRESSURE_LEVELS
from discache.metrics import DiscacheCollector

VALUE = 4096


class CacheMetrics:
    """The metrics_snapshot() protocol over a DiscardableCache and its manager's stats()."""

    def __init__(self, cache: DiscardableCache):
        self.cache = cache

    def metrics_snapshot(self) -> dict:
        c, m = self.cache.stats(), self.cache.manager.stats()
        return {
            "allocated_bytes": m["allocated_bytes"],
            "locked_bytes": m["locked_bytes"],
            "unlocked_bytes": m["unlocked_bytes"],
            # the manager's purged_bytes is what stays purged now; the counters are the totals
            "purged_bytes": sum(v for k, v in m.items() if k.startswith("purged_bytes_")),
            "locks": {"success": m.get("locks_success", 0), "purged": m.get("locks_purged", 0)},
            "evictions": {r: c[f"evictions_{r}"] for r in EVICTION_REASONS},
            "hits": c["hits"],
            "misses": c["misses"],
            "regenerations": c["regenerations"],
            "pressure_events": {level: m.get(f"pressure_{level}", 0) for level in PRESSURE_LEVELS},
        }


def busy_cache() -> DiscardableCache:
    """8 entries; a hit and a miss; all unlocked; critical pressure; a purged get; a regeneration."""
    manager = DiscardableMemoryManager(limit=1 << 20, backend="memfd")
    cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=0)
    for i in range(8):
        cache[f"tile/{i}"] = bytes([i]) * VALUE
    assert cache.get("tile/1") == bytes([1]) * VALUE
    assert cache.get("tile/missing") is None
    assert cache.sweep(idle=0) == 8
    assert manager.on_memory_pressure("critical") == 8 * VALUE
    assert cache.get("tile/2") is None  # purged: reported, dropped
    assert cache.get_or_create("tile/3", lambda: b"x" * VALUE) == b"x" * VALUE
    return cache


def test_a_real_prometheus_sees_what_the_cache_and_manager_report(prometheus, metrics_endpoint):
    registry = CollectorRegistry()
    cache = busy_cache()
    source = CacheMetrics(cache)
    DiscacheCollector(registry).watch(source, "tiles")
    server = prometheus([metrics_endpoint(registry)])
    server.wait_for_scrape()

    def scraped(series, **labels):
        inner = ",".join(f'{k}="{v}"' for k, v in sorted({"name": "tiles", **labels}.items()))
        return server.wait_for_value(f"{series}{{{inner}}}")

    c, m = cache.stats(), cache.manager.stats()
    assert c["hits"] and c["misses"] and c["regenerations"] and c["evictions_purged"]
    assert scraped("discache_cache_hits_total") == c["hits"] == 1
    assert scraped("discache_cache_misses_total") == c["misses"] == 3
    assert scraped("discache_regenerations_total") == c["regenerations"] == 1
    for reason in EVICTION_REASONS:
        assert scraped("discache_evictions_total", reason=reason) == c[f"evictions_{reason}"]
    assert scraped("discache_allocated_bytes") == m["allocated_bytes"] == 7 * VALUE
    assert scraped("discache_locked_bytes") == m["locked_bytes"]
    assert scraped("discache_unlocked_bytes") == m["unlocked_bytes"]
    assert scraped("discache_purged_bytes_total") == m["purged_bytes_pressure"] == 8 * VALUE
    assert scraped("discache_locks_total", result="purged") == m["locks_purged"] == 2
    assert scraped("discache_locks_total", result="success") == m.get("locks_success", 0)
    assert scraped("discache_memory_pressure_events_total", level="critical") == 1
    assert scraped("discache_memory_pressure_events_total", level="moderate") == 0
    # the next scrape follows the cache
    assert cache.get("tile/3") == b"x" * VALUE
    assert server.wait_for_value('discache_cache_hits_total{name="tiles"}', expect=2.0) == 2
