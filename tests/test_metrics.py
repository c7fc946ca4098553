"""discache.metrics: the collector, the snapshot protocol, the exposition and a real Prometheus."""
from __future__ import annotations

import gc
import math
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from discache import metrics
from discache.metrics import DiscacheCollector, LatencyHistogram
from pagetable_cache import PAGE, PageTableCache
from prometheus_server import check_metrics, require
from test_rules import dashboard_queries

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "integrations" / "prometheus" / "discache-rules.yml"


def scripted_cache() -> PageTableCache:
    """Room for 3; a, b, c made; a hit; pressure purges all; b made again; d evicts a."""
    cache = PageTableCache(3)
    for key in "abc":
        cache.get(key, str.upper)
    assert cache.get("a", str.upper) == "A"
    cache.on_pressure("moderate")
    assert cache.get("b", str.upper) == "B"
    cache.get("d", str.upper, keep_locked=True)
    return cache


@pytest.fixture
def registry():
    return CollectorRegistry()


def value(registry, metric, **labels):
    return registry.get_sample_value(metric, {"name": "images", "layer": "allocator", **labels})


def test_every_series_reports_the_scripted_run(registry):
    collector = DiscacheCollector(registry)
    cache = scripted_cache()
    collector.watch(cache, "images")
    # pressure purged a, b and c (all unlocked); b was made again; a (the oldest unlocked
    # entry) was evicted for d, which is held locked
    assert value(registry, "discache_allocated_bytes") == 3 * PAGE
    assert value(registry, "discache_locked_bytes") == 1 * PAGE
    assert value(registry, "discache_unlocked_bytes") == 2 * PAGE
    assert value(registry, "discache_purged_bytes_total") == 3 * PAGE
    assert value(registry, "discache_locks_total", result="success") == 1
    assert value(registry, "discache_locks_total", result="purged") == 1
    assert value(registry, "discache_locks_total", result="failed") == 0
    assert value(registry, "discache_evictions_total", reason="capacity") == 1
    assert value(registry, "discache_cache_hits_total") == 1
    assert value(registry, "discache_cache_misses_total") == 4 + 1
    assert value(registry, "discache_regenerations_total") == 1
    assert value(registry, "discache_memory_pressure_events_total", level="moderate") == 1
    assert value(registry, "discache_memory_pressure_events_total", level="critical") == 0


def test_duration_histogram_counts_every_lock_and_unlock(registry):
    cache = scripted_cache()
    collector = DiscacheCollector(registry)
    collector.watch(cache, "images")
    families = {f.name: f for f in collector.collect()}
    samples = families["discache_operation_duration_seconds"].samples
    for op, expected in (("lock", 2), ("unlock", 5)):
        buckets = [s for s in samples if s.name.endswith("_bucket") and s.labels["op"] == op]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        assert buckets[-1].labels["le"] == "+Inf" and counts[-1] == expected
        count = next(s.value for s in samples
                     if s.name.endswith("_count") and s.labels["op"] == op)
        assert count == expected
    without = DiscacheCollector(None, latency=False)
    without.watch(cache, "images")
    assert "discache_operation_duration_seconds" not in {f.name for f in without.collect()}


def test_latency_histogram_buckets_include_their_upper_bound():
    h = LatencyHistogram((1e-6, 1e-3))
    for seconds in (1e-6, 2e-6, 1e-3, 5.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap["buckets"] == [(1e-6, 1), (1e-3, 3), (math.inf, 4)]
    assert snap["sum"] == pytest.approx(5.001003)
    for bad in ((), (1e-3, 1e-6), (0.0, 1.0), (1e-3, 1e-3)):
        with pytest.raises(ValueError):
            LatencyHistogram(bad)
    for bad in (-1e-6, math.nan):
        with pytest.raises(ValueError, match="duration"):
            h.observe(bad)
    assert h.snapshot() == snap, "a refused observation changes nothing"


def test_latency_histogram_loses_no_observation_across_threads():
    h = LatencyHistogram()
    per_thread = 20_000

    def observe():
        for _ in range(per_thread):
            h.observe(1e-6)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = h.snapshot()
    assert snap["buckets"][-1] == (math.inf, 4 * per_thread)
    assert dict(snap["buckets"])[1e-6] == 4 * per_thread
    assert snap["sum"] == pytest.approx(4 * per_thread * 1e-6)


def test_objects_are_held_weakly(registry):
    collector = DiscacheCollector(registry)
    cache = scripted_cache()
    collector.watch(cache, "images")
    assert value(registry, "discache_cache_hits_total") == 1
    del cache
    gc.collect()
    assert collector.watched() == {}
    assert value(registry, "discache_cache_hits_total") is None
    collector.watch(PageTableCache(1), "images")  # the name is free again (and this one dies)


def test_bad_watch_arguments_raise_and_change_nothing(registry):
    collector = DiscacheCollector(registry)
    cache = PageTableCache(1)
    collector.watch(cache, "images")
    with pytest.raises(TypeError, match="metrics_snapshot"):
        collector.watch(object(), "other")
    with pytest.raises(ValueError, match="non-empty"):
        collector.watch(cache, "")
    with pytest.raises(ValueError, match="already watched"):
        collector.watch(PageTableCache(1), "images")
    with pytest.raises(KeyError):
        collector.unwatch("other")

    class Slotted:
        __slots__ = ()

        def metrics_snapshot(self):
            return {}

    with pytest.raises(TypeError, match="weakly"):
        collector.watch(Slotted(), "slotted")
    assert collector.watched() == {"images": cache}


def test_unregister_removes_every_series(registry):
    collector = DiscacheCollector(registry)
    cache = scripted_cache()
    collector.watch(cache, "images")
    with pytest.raises(ValueError, match="Duplicated"):
        DiscacheCollector(registry)  # one collector per registry: the series names are taken
    collector.unregister()
    assert value(registry, "discache_allocated_bytes") is None
    DiscacheCollector(registry).watch(cache, "images")
    assert value(registry, "discache_allocated_bytes") == 3 * PAGE


def test_module_watch_uses_the_default_registry():
    cache = scripted_cache()
    metrics.watch(cache, "test-default")
    try:
        assert REGISTRY.get_sample_value("discache_cache_hits_total",
                                         {"name": "test-default", "layer": "allocator"}) == 1
    finally:
        metrics.unwatch("test-default")
    assert REGISTRY.get_sample_value("discache_cache_hits_total", {"name": "test-default", "layer": "allocator"}) is None


def test_exposition_passes_promtool_lint(registry):
    require()
    DiscacheCollector(registry).watch(scripted_cache(), "images")
    check_metrics(generate_latest(registry))


def test_a_real_prometheus_scrapes_the_collector(registry, prometheus, metrics_endpoint):
    collector = DiscacheCollector(registry)
    cache = scripted_cache()
    collector.watch(cache, "images")
    server = prometheus([metrics_endpoint(registry)], rule_files=[RULES])
    server.wait_for_scrape()
    # the shipped rules evaluate without error against the real series
    assert [g["name"] for g in server.wait_for_rules()] == ["discache"]
    exposed = [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples]
    assert len(exposed) > 30
    for name, labels, expected in exposed:
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        assert server.wait_for_value(f"{name}{{{inner}}}") == expected, (name, labels)
    # every dashboard query is valid PromQL here; the first one shows the cache's bytes
    for expr in dashboard_queries():
        server.api("query", query=expr)
    assert server.query(dashboard_queries()[0]) == 3 * PAGE
    cache.on_pressure("critical")
    assert server.wait_for_value(
        'discache_memory_pressure_events_total{name="images",level="critical"}', expect=1.0) == 1
    # the histogram is one Prometheus understands (any value lies within the bucket bounds)
    median = server.query('histogram_quantile(0.5, '
                          'discache_operation_duration_seconds_bucket{name="images",op="unlock"})')
    assert 0 < median <= metrics.DEFAULT_BUCKETS[-1]
    # b (made again) is purged; c was purged already; d is locked
    assert server.query('discache_purged_bytes_total{name="images"}') == 4 * PAGE


class BrokenSource:
    def metrics_snapshot(self):
        raise RuntimeError("snapshot failed")


def test_a_failing_snapshot_fails_the_scrape(registry):
    source = BrokenSource()
    DiscacheCollector(registry).watch(source, "broken")
    with pytest.raises(RuntimeError, match="snapshot failed"):
        generate_latest(registry)


def test_each_object_is_labelled_with_its_layer(registry):
    from discache import DiscardableCache, DiscardableMemoryAllocator, DiscardableMemoryManager

    collector = DiscacheCollector(registry)
    manager = DiscardableMemoryManager(1 << 20, "madvfree")
    cache = DiscardableCache(1 << 16, manager=manager)
    cache["k"] = b"v" * 100
    allocator = DiscardableMemoryAllocator("madvfree")
    owner = PageTableCache(1)
    collector.watch(cache, "web")
    collector.watch(manager, "web-manager")
    collector.watch(allocator, "raw")
    collector.watch(owner, "tables")
    layers = {s.labels["name"]: s.labels["layer"]
              for family in registry.collect() for s in family.samples}
    assert layers == {"web": "cache", "web-manager": "manager", "raw": "allocator",
                      "tables": "allocator"}
    get = registry.get_sample_value
    assert get("discache_allocated_bytes", {"name": "web-manager", "layer": "manager"}) \
        == get("discache_allocated_bytes", {"name": "web", "layer": "cache"}) > 0
    cache.close()


def test_a_layer_may_be_declared_or_given_and_a_bad_one_is_refused(registry):
    collector = DiscacheCollector(registry)
    declared = PageTableCache(1)
    declared.metrics_layer = "cache"
    collector.watch(declared, "declared")
    given = PageTableCache(1)
    collector.watch(given, "given", layer="manager")
    assert registry.get_sample_value("discache_allocated_bytes",
                                     {"name": "declared", "layer": "cache"}) is not None
    assert registry.get_sample_value("discache_allocated_bytes",
                                     {"name": "given", "layer": "manager"}) is not None
    with pytest.raises(ValueError, match="layer must be one of cache, manager, allocator"):
        collector.watch(PageTableCache(1), "bad", layer="kernel")
    assert set(collector.watched()) == {"declared", "given"}


def test_hold_is_entered_around_all_the_snapshots_of_a_scrape(registry):
    import contextlib

    events = []

    @contextlib.contextmanager
    def hold():
        events.append("enter")
        yield
        events.append("exit")

    class Source(PageTableCache):
        def metrics_snapshot(self):
            events.append("snapshot")
            return super().metrics_snapshot()

    collector = DiscacheCollector(registry, hold=hold)
    first, second = Source(1), Source(1)
    collector.watch(first, "a")
    collector.watch(second, "b")
    generate_latest(registry)
    assert events == ["enter", "snapshot", "snapshot", "exit"]
