"""Prometheus metrics of discache objects: a custom collector reading each object's snapshot.

Anything handed to `DiscacheCollector.watch(obj, name)` (an allocator, a manager, a cache) is held
weakly and must have a method `metrics_snapshot() -> dict`, called at every scrape, whose keys are
all optional (a missing key exports no series for that object; unknown keys are ignored):

| key | value | series (every one labelled name="<name>", layer="<layer>") |
|---|---|---|
| `allocated_bytes` | int, now | `discache_allocated_bytes` (gauge) |
| `locked_bytes` | int, now | `discache_locked_bytes` (gauge) |
| `unlocked_bytes` | int, now | `discache_unlocked_bytes` (gauge) |
| `purged_bytes` | int, since creation | `discache_purged_bytes_total` (counter) |
| `locks` | {"success"/"purged"/"failed": int} | `discache_locks_total{result}` (counter) |
| `evictions` | {reason: int} | `discache_evictions_total{reason}` (counter) |
| `hits` | int | `discache_cache_hits_total` (counter) |
| `misses` | int | `discache_cache_misses_total` (counter) |
| `regenerations` | int | `discache_regenerations_total` (counter) |
| `pressure_events` | {level: int} | `discache_memory_pressure_events_total{level}` (counter) |
| `durations` | {"lock"/"unlock": histogram snapshot} | `discache_operation_duration_seconds{op}` |

Counters are totals since the object was created and never go down. `locks` always exports the
three results (0 when absent) so that ratios in alerting rules exist from the first scrape; likewise
`pressure_events` exports both levels of discache.pressure. A histogram snapshot is
`LatencyHistogram.snapshot()`; the series is a histogram. An object records durations with a
`LatencyHistogram`; `DiscacheCollector(latency=False)` leaves the histogram out of the export.
An exception from metrics_snapshot() fails the scrape (a broken source is not hidden).

The `layer` label says where an object's memory is counted, so that no sum counts it twice:
`manager` (a DiscardableMemoryManager: all the memory of the caches allocating from it, and its
own allocations), `cache` (a cache or anything else with a `manager` attribute: its share of that
manager's memory, and its hits, misses, regenerations, evictions) and `allocator` (anything else,
which owns its memory: DiscardableMemoryAllocator, a custom source) and `shared` (a
discache.SharedCache: host-wide numbers, memory and cache series alike, the same whichever attached
process exports them; so a pre-fork server's workers never count them twice, and several
exporters on one host are combined with max, not sum).  Sum memory, purges, locks,
latency and pressure over `layer!="cache"`; cache series over `layer="cache"` (the rules and the
dashboard in integrations/prometheus do).  An object may declare its layer with a
`metrics_layer` attribute, and watch() may be told it.
"""
from __future__ import annotations

import bisect
import contextlib
import math
import threading
import weakref
from typing import Any, Callable, ContextManager, Iterator, Protocol

from prometheus_client.core import (REGISTRY, CollectorRegistry, CounterMetricFamily,
                                    GaugeMetricFamily, HistogramMetricFamily, Metric)

from .pressure import LEVELS

LOCK_RESULTS = ("success", "purged", "failed")
LAYERS = ("cache", "manager", "allocator", "shared")
OPERATIONS = ("lock", "unlock")
# 250 ns (a PageTable call from Python) to 100 ms (a lock that faults in megabytes)
DEFAULT_BUCKETS = (2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3,
                   1e-2, 1e-1)

GAUGES = (
    ("allocated_bytes", "discache_allocated_bytes", "Bytes of discardable memory allocated."),
    ("locked_bytes", "discache_locked_bytes", "Bytes allocated and locked (never purged)."),
    ("unlocked_bytes", "discache_unlocked_bytes",
     "Bytes allocated and unlocked: the kernel or a policy may purge them."),
)
COUNTERS = (
    ("purged_bytes", "discache_purged_bytes", "Bytes purged while unlocked."),
    ("hits", "discache_cache_hits", "Cache lookups that found an intact entry."),
    ("misses", "discache_cache_misses", "Cache lookups that found no entry or a purged one."),
    ("regenerations", "discache_regenerations",
     "Entries regenerated after their memory was purged."),
)
LABELLED_COUNTERS = (
    ("locks", "discache_locks", "Lock attempts by result.", "result", LOCK_RESULTS),
    ("evictions", "discache_evictions", "Entries evicted, by reason.", "reason", ()),
    ("pressure_events", "discache_memory_pressure_events", "Memory-pressure events by level.",
     "level", LEVELS),
)
HISTOGRAM = ("discache_operation_duration_seconds", "Time spent in lock and unlock, in seconds.")


class MetricsSource(Protocol):
    """What `watch` accepts: an object that reports its numbers as a dict (keys above)."""

    def metrics_snapshot(self) -> dict[str, Any]: ...


class LatencyHistogram:
    """Cumulative-bucket histogram of durations in seconds: cheap to observe, thread-safe."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
            raise ValueError("buckets must be increasing positive upper bounds")
        self.bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Record one duration (ValueError if negative or NaN)."""
        if not seconds >= 0:
            raise ValueError(f"a duration must be >= 0 seconds, got {seconds!r}")
        index = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """{"buckets": [(upper bound, cumulative count), ..., (inf, count)], "sum": seconds}."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), counts):
            running += count
            cumulative.append((bound, running))
        return {"buckets": cumulative, "sum": total}


def layer_of(obj: Any) -> str:
    """The layer label of a watched object (see the module's docstring)."""
    declared = getattr(obj, "metrics_layer", None)
    if declared is not None:
        return declared
    from .manager import DiscardableMemoryManager

    if isinstance(obj, DiscardableMemoryManager):
        return "manager"
    if getattr(obj, "manager", None) is not None:
        return "cache"
    return "allocator"


def _bound_text(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class DiscacheCollector:
    """Exports the snapshots of watched discache objects; registers itself like GCCollector."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, latency: bool = True,
                 hold: Callable[[], ContextManager[Any]] | None = None):
        """hold(), if given, is entered around the snapshots of each scrape: an application whose
        threads change the watched objects can make a scrape see them between operations."""
        self.latency = latency
        self.hold = hold
        self._watched: dict[str, weakref.ref] = {}
        self._layers: dict[str, str] = {}
        # reentrant: a weakref callback may run (garbage collection) while the lock is held
        self._lock = threading.RLock()
        self._registry = registry
        if registry is not None:
            registry.register(self)

    def watch(self, obj: MetricsSource, name: str, layer: str | None = None) -> None:
        """Export obj's numbers with labels name=name and layer=layer (by default what obj is:
        cache, manager or allocator) while obj lives (held weakly)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if not callable(getattr(obj, "metrics_snapshot", None)):
            raise TypeError(f"{type(obj).__name__} has no metrics_snapshot() method")
        layer = layer_of(obj) if layer is None else layer
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
        with self._lock:
            current = self._watched.get(name)
            if current is not None and current() is not None:
                raise ValueError(f"a live object is already watched as {name!r}")

            def forget(ref: weakref.ref, name: str = name) -> None:
                with self._lock:
                    if self._watched.get(name) is ref:
                        del self._watched[name]
                        self._layers.pop(name, None)

            try:
                self._watched[name] = weakref.ref(obj, forget)
                self._layers[name] = layer
            except TypeError:
                raise TypeError(f"{type(obj).__name__} cannot be held weakly "
                                "(add __weakref__ to its __slots__)") from None

    def unwatch(self, name: str) -> None:
        """Stop exporting the object watched as name (KeyError if none is)."""
        with self._lock:
            del self._watched[name]
            self._layers.pop(name, None)

    def watched(self) -> dict[str, Any]:
        """The live watched objects by name."""
        with self._lock:
            refs = list(self._watched.items())
        return {name: obj for name, ref in refs if (obj := ref()) is not None}

    def unregister(self) -> None:
        """Remove this collector from the registry it registered with."""
        if self._registry is not None:
            self._registry.unregister(self)
            self._registry = None

    def describe(self) -> Iterator[Metric]:
        """The families without samples: the registry checks names without taking snapshots."""
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        """One family per series, with a sample per watched object that reports it."""
        with self._lock:
            layers = dict(self._layers)
        watched = sorted(self.watched().items())
        with self.hold() if self.hold is not None else contextlib.nullcontext():
            snapshots = [((name, layers.get(name, "allocator")), obj.metrics_snapshot())
                         for name, obj in watched]
        return self._families(snapshots)

    def _families(self, snapshots: list[tuple[tuple[str, str], dict[str, Any]]]
                  ) -> Iterator[Metric]:
        for key, metric, doc in GAUGES:
            family = GaugeMetricFamily(metric, doc, labels=["name", "layer"])
            for labels, snap in snapshots:
                if key in snap:
                    family.add_metric(list(labels), snap[key])
            yield family
        for key, metric, doc in COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["name", "layer"])
            for labels, snap in snapshots:
                if key in snap:
                    family.add_metric(list(labels), snap[key])
            yield family
        for key, metric, doc, label, always in LABELLED_COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["name", "layer", label])
            for labels, snap in snapshots:
                if key not in snap:
                    continue
                values = dict.fromkeys(always, 0)
                values.update(snap[key])
                for value_label, count in sorted(values.items()):
                    family.add_metric([*labels, value_label], count)
            yield family
        if self.latency:
            family = HistogramMetricFamily(*HISTOGRAM, labels=["name", "layer", "op"])
            for labels, snap in snapshots:
                for op, hist in sorted(snap.get("durations", {}).items()):
                    family.add_metric([*labels, op],
                                      [(_bound_text(b), c) for b, c in hist["buckets"]],
                                      sum_value=hist["sum"])
            yield family


class Exporter:
    """A /metrics HTTP server (prometheus_client's) of its own registry and DiscacheCollector."""

    def __init__(self, port: int, addr: str = "127.0.0.1", latency: bool = True,
                 hold: Callable[[], ContextManager[Any]] | None = None):
        from prometheus_client import start_http_server

        self.registry = CollectorRegistry()
        self.collector = DiscacheCollector(self.registry, latency, hold)
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        self.addr = addr
        self.port: int = self._server.server_port  # the port chosen when 0 was asked

    def watch(self, obj: MetricsSource, name: str, layer: str | None = None) -> None:
        """Export obj's numbers with labels name=name and layer while obj lives."""
        self.collector.watch(obj, name, layer)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "Exporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_default: DiscacheCollector | None = None
_default_lock = threading.Lock()


def default_collector() -> DiscacheCollector:
    """The collector registered with prometheus_client's default registry, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = DiscacheCollector(REGISTRY)
        return _default


def watch(obj: MetricsSource, name: str, layer: str | None = None) -> None:
    """Export obj's numbers through prometheus_client's default registry."""
    default_collector().watch(obj, name, layer)


def unwatch(name: str) -> None:
    """Stop exporting the object watched as name on the default collector."""
    default_collector().unwatch(name)
