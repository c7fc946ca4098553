"""DiscardableMemoryManager: a byte limit, segments of page spans, LRU purge, memory pressure."""
from __future__ import annotations

import os
import threading
import time
import weakref
from collections import Counter, OrderedDict
from typing import Any, Callable, Optional

from . import _core
from .errors import BackendUnavailableError, PurgedError
from .heap import Span, SpanHeap
from .memory import CopyingAccessors

PAGE = _core.page_size()
SEGMENT_BYTES = 4 << 20  # Chromium's client segment size
DEFAULT_LIMIT_CAP = 512 << 20  # Chromium's desktop limit
MAX_RAM_FRACTION = 4  # the default limit never exceeds a quarter of physical RAM
PURGE_AGE = 300.0  # seconds unlocked before the background purge takes it (Chromium: 5 min)
PRESSURE_LEVELS = ("moderate", "critical")
SEGMENT_BACKENDS = ("madvfree", "memfd", "simulated")


def physical_ram() -> int:
    """Bytes of physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_limit() -> int:
    """512 MiB, or a quarter of physical RAM when that is less."""
    return min(DEFAULT_LIMIT_CAP, physical_ram() // MAX_RAM_FRACTION)


def _segment_factory(backend: str) -> tuple[str, Callable[[int], Any]]:
    from . import backends

    if backend in ("madvfree-sigbus",):
        raise ValueError("the manager packs allocations into shared segments, which SIGBUS mode "
                         "does not support; use discache.allocate(n, sigbus=True) per allocation")
    if backend == "simulated":
        from .simbackend import SimSegment

        return "simulated", SimSegment
    chosen = backends.get(backend).name
    if chosen not in SEGMENT_BACKENDS:
        raise BackendUnavailableError(f"backend {chosen!r} cannot hold manager segments")
    return chosen, lambda npages: _core.Segment(npages, chosen)


class ManagedMemory(CopyingAccessors):
    """A page span of a manager's segment, with DiscardableMemory's lock/unlock/data."""

    def __init__(self, manager: "DiscardableMemoryManager", span: Span, segment: Any,
                 nbytes: int) -> None:
        self._manager = manager
        self._span = span
        self._segment = segment
        self.nbytes = nbytes
        self.npages = span.npages
        self.purged_pages = 0
        self._locked = True
        self._closed = False
        self._purged = False  # discarded by the manager's policy while unlocked
        self._buffer: Any = None  # SpanBuffer of a mapped segment: counts live views
        self.last_unlocked = 0.0

    @property
    def backend(self) -> str:
        """The manager's backend."""
        return self._manager.backend

    @property
    def is_locked(self) -> bool:
        """True while locked."""
        return self._locked and not self._closed

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._closed

    @property
    def offset(self) -> int:
        """Byte offset of the memory in its segment."""
        return self._span.first * PAGE

    @property
    def address(self) -> Optional[int]:
        """Address of the first byte (valid while open; read or write it only while locked), or
        None for a backend without a mapping of its own (simulated)."""
        if self._closed:
            raise ValueError("discardable memory is closed")
        base = getattr(self._segment, "address", None)
        return None if base is None else base + self.offset

    def _check_locked(self) -> None:
        if self._closed:
            raise ValueError("discardable memory is closed")
        if not self._locked:
            raise RuntimeError("discardable memory is unlocked: lock() it first")

    def _new_view(self) -> memoryview:
        if self._buffer is None:
            self._buffer = self._segment.span_buffer(self.offset, self.nbytes)
        with memoryview(self._buffer) as whole:
            return whole[:self.nbytes]

    def _release_views(self) -> None:
        super()._release_views()
        if self._buffer is not None:
            if self._buffer.exports:
                raise BufferError(f"{self._buffer.exports} view(s) of mem.data (slices, "
                                  "arrays...) are still alive; release them first")
            self._buffer = None  # a span's buffer is valid for one lock (simulated: a copy)

    def lock(self) -> bool:
        """Lock; True if intact, False if anything was purged (contents undefined: refill)."""
        if self._closed:
            raise ValueError("discardable memory is closed")
        if self._locked:
            raise RuntimeError("discardable memory is already locked (locks do not nest)")
        return self._manager._lock(self)

    def unlock(self) -> None:
        """Unlock: the kernel or the manager may now discard the memory."""
        if self._closed:
            raise ValueError("discardable memory is closed")
        if not self._locked:
            raise RuntimeError("discardable memory is not locked")
        self._release_views()
        self._manager._unlock(self)

    def close(self) -> None:
        """Give the span back to the manager; calling it again does nothing."""
        if self._closed:
            return
        self._release_views()
        self._manager._free(self)

    def _force_reclaim(self) -> int:
        """Make the kernel discard the pages now if unlocked; returns how many are gone."""
        # Under the manager's lock: a lock() from another thread in the middle of the reclaim
        # would have its pages freed again and paged out (the reclaim retries) while locked.
        with self._manager._lock_:
            if self._closed:
                raise ValueError("discardable memory is closed")
            if self._locked:
                return 0
            return self._segment.reclaim_span(self._span.first, self._span.npages)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("locked" if self._locked else "unlocked")
        return f"<ManagedMemory nbytes={self.nbytes} {self.backend} {state}>"


class DiscardableMemoryManager:
    """Keeps a process's discardable memory under a byte limit; purges least recently unlocked."""

    def __init__(
        self,
        limit: Optional[int] = None,
        backend: str = "auto",
        *,
        segment_bytes: int = SEGMENT_BYTES,
        purge_age: float = PURGE_AGE,
        clock: Callable[[], float] = time.monotonic,
        record_latency: bool = True,
    ) -> None:
        limit = default_limit() if limit is None else limit
        if not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit must be a positive number of bytes, got {limit!r}")
        if not isinstance(segment_bytes, int) or segment_bytes < PAGE:
            raise ValueError(f"segment_bytes must be at least one page ({PAGE}), "
                             f"got {segment_bytes!r}")
        if purge_age <= 0:
            raise ValueError(f"purge_age must be positive, got {purge_age!r}")
        self.backend, self._new_segment = _segment_factory(backend)
        self.limit = limit
        self.segment_pages = -(-segment_bytes // PAGE)
        self.purge_age = purge_age
        self.clock = clock
        self._lock_ = threading.RLock()
        self._heap = SpanHeap()
        self._segments: dict[int, Any] = {}
        self._next_segment = 0
        self._unlocked: OrderedDict[int, ManagedMemory] = OrderedDict()  # by unlock time
        self._live: dict[int, ManagedMemory] = {}
        self.bytes_allocated = 0  # live allocations, page-rounded
        self.bytes_locked = 0
        self.bytes_purged = 0  # live allocations whose pages are gone
        self.counters: Counter = Counter()
        self._background: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._monitor: Any = None
        # Caches told of memory pressure, by id (a Mapping is unhashable), held weakly.
        self._caches: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        # lock/unlock durations for discache.metrics; None: not recorded (saves two clock reads)
        self.latency: Optional[dict[str, Any]] = None
        if record_latency:
            from .metrics import OPERATIONS, LatencyHistogram

            self.latency = {op: LatencyHistogram() for op in OPERATIONS}

    # ------------------------------------------------------------------ allocation

    def allocate(self, nbytes: int) -> ManagedMemory:
        """New discardable memory of nbytes, returned locked; purges to stay under the limit."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool):
            raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        npages = -(-nbytes // PAGE)
        if npages * PAGE > self.limit:
            raise MemoryError(f"{nbytes} bytes exceed the manager's limit of {self.limit} bytes")
        with self._lock_:
            self._purge_to(self.limit - npages * PAGE)
            span = self._heap.allocate(npages)
            if span is None:
                segment_id = self._next_segment
                pages = max(npages, self.segment_pages)
                self._segments[segment_id] = self._new_segment(pages)
                self._next_segment += 1
                self._heap.add_segment(segment_id, pages)
                span = self._heap.allocate(npages)
            segment = self._segments[span.segment]
            segment.claim_span(span.first, span.npages)
            mem = ManagedMemory(self, span, segment, nbytes)
            self._live[id(mem)] = mem
            self.bytes_allocated += npages * PAGE
            self.bytes_locked += npages * PAGE
            self.counters["allocations"] += 1
            return mem

    def _lock(self, mem: ManagedMemory) -> bool:
        started = time.perf_counter() if self.latency is not None else 0.0
        with self._lock_:
            size = mem.npages * PAGE
            self._unlocked.pop(id(mem), None)
            lost = mem._segment.lock_span(mem._span.first, mem._span.npages)
            if mem._purged:
                lost, mem._purged = mem.npages, False
                self.bytes_purged -= size
            elif lost:
                self.counters["purged_bytes_kernel"] += lost * PAGE
            mem._locked = True
            mem.purged_pages = lost
            self.bytes_locked += size
            self.counters["locks_purged" if lost else "locks_success"] += 1
            if lost:
                # Memory the manager had purged is resident again: keep the limit.
                self._purge_to(self.limit)
        if self.latency is not None:
            self.latency["lock"].observe(time.perf_counter() - started)
        return lost == 0

    def _unlock(self, mem: ManagedMemory) -> None:
        started = time.perf_counter() if self.latency is not None else 0.0
        with self._lock_:
            mem._segment.unlock_span(mem._span.first, mem._span.npages)
            mem._locked = False
            mem.last_unlocked = self.clock()
            self._unlocked[id(mem)] = mem
            self.bytes_locked -= mem.npages * PAGE
            self.counters["unlocks"] += 1
            self._purge_to(self.limit)
        if self.latency is not None:
            self.latency["unlock"].observe(time.perf_counter() - started)

    def unlock_many(self, mems: list[ManagedMemory]) -> int:
        """Unlock several locked allocations, one madvise per run of adjacent spans; returns the
        number of system calls made."""
        with self._lock_:
            by_segment: dict[int, list[ManagedMemory]] = {}
            for mem in mems:
                if mem._closed or not mem._locked:
                    raise RuntimeError(f"{mem!r} is not locked")
                by_segment.setdefault(mem._span.segment, []).append(mem)
            for group in by_segment.values():
                for mem in group:
                    mem._release_views()
            calls = 0
            now = self.clock()
            for segment_id, group in by_segment.items():
                calls += self._segments[segment_id].unlock_spans(
                    [(m._span.first, m._span.npages) for m in group])
                for mem in group:
                    mem._locked = False
                    mem.last_unlocked = now
                    self._unlocked[id(mem)] = mem
                    self.bytes_locked -= mem.npages * PAGE
            self.counters["unlocks"] += len(mems)
            self._purge_to(self.limit)
            return calls

    def _free(self, mem: ManagedMemory) -> None:
        with self._lock_:
            size = mem.npages * PAGE
            self._unlocked.pop(id(mem), None)
            del self._live[id(mem)]
            # Pages the application no longer wants: give them back now.
            mem._segment.release_span(mem._span.first, mem._span.npages)
            if mem._locked:
                self.bytes_locked -= size
            if mem._purged:
                self.bytes_purged -= size
            mem._closed = True
            mem._locked = False
            self.bytes_allocated -= size
            self._heap.free(mem._span)
            segment_id = mem._span.segment
            if self._heap.used_pages(segment_id) == 0:
                self._heap.remove_segment(segment_id)
                self._segments.pop(segment_id).close()
            mem._segment = None

    # ------------------------------------------------------------------ purging

    @property
    def bytes_resident(self) -> int:
        """Bytes of live allocations not purged by the manager (the kernel may have taken some)."""
        return self.bytes_allocated - self.bytes_purged

    @property
    def bytes_unlocked(self) -> int:
        """Bytes of unlocked allocations not purged by the manager."""
        return self.bytes_resident - self.bytes_locked

    def _purge_one(self, mem: ManagedMemory, reason: str) -> int:
        mem._segment.discard_span(mem._span.first, mem._span.npages)
        mem._purged = True
        size = mem.npages * PAGE
        self.bytes_purged += size
        self.counters[f"purged_bytes_{reason}"] += size
        return size

    def _purge_to(self, target: int, reason: str = "limit") -> int:
        """Purge least recently unlocked memory until resident bytes are at most target."""
        freed = 0
        while self.bytes_resident > target and self._unlocked:
            _, mem = self._unlocked.popitem(last=False)
            freed += self._purge_one(mem, reason)
        return freed

    def purge_older_than(self, age: Optional[float] = None) -> int:
        """Purge memory unlocked for longer than age seconds (default: purge_age); bytes freed."""
        age = self.purge_age if age is None else age
        with self._lock_:
            cutoff = self.clock() - age
            freed = 0
            while self._unlocked:
                mem = next(iter(self._unlocked.values()))
                if mem.last_unlocked > cutoff:
                    break
                self._unlocked.popitem(last=False)
                freed += self._purge_one(mem, "age")
            return freed

    def register_cache(self, cache: Any) -> None:
        """Tell cache (weakly held) of memory pressure: its on_memory_pressure(level) runs before
        the manager purges, so that the entries it unlocks can be purged."""
        self._caches[id(cache)] = cache

    def on_memory_pressure(self, level: str) -> int:
        """Moderate: caches unlock their idle entries, then purge down to half the limit;
        critical: caches unlock every unpinned entry, then purge every unlocked byte."""
        if level not in PRESSURE_LEVELS:
            raise ValueError(f"level must be one of {PRESSURE_LEVELS}, got {level!r}")
        # Outside the manager's lock: a cache takes its own lock first, then the manager's.
        for cache in list(self._caches.values()):
            cache.on_memory_pressure(level)
        with self._lock_:
            self.counters[f"pressure_{level}"] += 1
            return self._purge_to(self.limit // 2 if level == "moderate" else -1, "pressure")

    def release_free_memory(self) -> int:
        """Purge every unlocked allocation now (critical pressure); bytes freed."""
        with self._lock_:
            return self._purge_to(-1, "release")

    # ------------------------------------------------------------------ background work

    def start_background_purge(self, interval: float = 60.0) -> None:
        """Every interval seconds, purge memory unlocked for longer than purge_age (a daemon)."""
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        if self._background is not None:
            raise RuntimeError("the background purge already runs")
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(interval):
                self.purge_older_than()

        self._background = threading.Thread(target=run, name="discache-purge", daemon=True)
        self._background.start()

    def watch_pressure(self, **monitor_options: Any) -> Any:
        """Start a PressureMonitor (PSI, or its fallback) that feeds on_memory_pressure."""
        from .pressure import PressureMonitor

        if self._monitor is not None:
            raise RuntimeError("the manager already watches memory pressure")
        self._monitor = PressureMonitor(self.on_memory_pressure, **monitor_options).start()
        return self._monitor

    def stop(self) -> None:
        """Stop the background purge and the pressure monitor; safe to call twice."""
        if self._background is not None:
            self._stop.set()
            self._background.join()
            self._background = None
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None

    # ------------------------------------------------------------------ reporting

    @property
    def segment_count(self) -> int:
        """Segments mapped now."""
        return len(self._segments)

    def stats(self) -> dict[str, int]:
        """Bytes by state, segments, and event counters."""
        with self._lock_:
            return {
                "limit_bytes": self.limit,
                "allocated_bytes": self.bytes_allocated,
                "locked_bytes": self.bytes_locked,
                "unlocked_bytes": self.bytes_unlocked,
                "purged_bytes": self.bytes_purged,
                "segments": len(self._segments),
                "free_pages": self._heap.free_pages,
                "allocations": len(self._live),
                **self.counters,
            }

    def metrics_snapshot(self) -> dict[str, Any]:
        """The numbers discache.metrics exports (see its module docstring for the keys)."""
        with self._lock_:
            c = self.counters
            return {
                "allocated_bytes": self.bytes_allocated,
                "locked_bytes": self.bytes_locked,
                "unlocked_bytes": self.bytes_unlocked,
                "purged_bytes": sum(n for k, n in c.items() if k.startswith("purged_bytes_")),
                "locks": {"success": c["locks_success"], "purged": c["locks_purged"],
                          "failed": 0},
                "pressure_events": {level: c[f"pressure_{level}"] for level in PRESSURE_LEVELS},
                **({"durations": {op: h.snapshot() for op, h in self.latency.items()}}
                   if self.latency is not None else {}),
            }

    def __repr__(self) -> str:
        return (f"DiscardableMemoryManager(limit={self.limit}, backend={self.backend!r}, "
                f"allocated={self.bytes_allocated}, locked={self.bytes_locked})")


_default: Optional[DiscardableMemoryManager] = None
_default_lock = threading.Lock()


def default_manager() -> DiscardableMemoryManager:
    """The process-wide manager that caches share unless given their own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = DiscardableMemoryManager()
        return _default


__all__ = ["DiscardableMemoryManager", "ManagedMemory", "PurgedError", "default_manager"]
