"""DiscardableMemoryManager: a byte limit, segments of page spans, LRU purge, memory pressure."""
from __future__ import annotations

import threading
import time
import weakref
from collections import Counter, OrderedDict
from typing import Any, Callable, Optional

from . import _core, backends, forking, tracing, validate
from .errors import PurgedError
from .heap import Span, SpanHeap
from .memory import DiscardableMemory

PAGE = _core.page_size()
SEGMENT_BYTES = 4 << 20  # Chromium's client segment size
DEFAULT_LIMIT_CAP = 512 << 20  # Chromium's desktop limit
MAX_RAM_FRACTION = 4  # the default limit never exceeds a quarter of physical RAM
PURGE_AGE = 300.0  # seconds unlocked before the background purge takes it (Chromium: 5 min)
PRESSURE_LEVELS = ("moderate", "critical")


physical_ram = _core.physical_memory  # bytes of physical memory


def default_limit() -> int:
    """512 MiB, or a quarter of physical RAM when that is less."""
    return min(DEFAULT_LIMIT_CAP, physical_ram() // MAX_RAM_FRACTION)


class _Allocation:
    """The manager's record of one live allocation: its span and its state.

    Held by the manager and (as its ticket) by the DiscardableMemory; it never refers back to the
    memory, so a memory dropped without close() is collected and its span freed
    (see _drain_dropped)."""

    __slots__ = ("span", "segment", "locked", "purged", "closed", "last_unlocked", "buffer",
                 "memory", "__weakref__")

    def __init__(self, span: Span, segment: Any) -> None:
        self.span = span
        self.segment = segment
        self.locked = True
        self.purged = False  # discarded by the manager's policy while unlocked
        self.closed = False
        self.last_unlocked = 0.0
        self.buffer: Any = None  # the span's buffer handed out: counts live views
        self.memory: Any = None  # weakref to the DiscardableMemory, whose callback releases the span


ManagedMemory = DiscardableMemory  # the name the manager's allocations had before issue 11


_MANAGERS: "weakref.WeakSet[DiscardableMemoryManager]" = weakref.WeakSet()
_forked_managers: list["DiscardableMemoryManager"] = []


def _manager_locks() -> list[Any]:
    _forked_managers[:] = sorted(_MANAGERS, key=id)
    return [manager._lock_ for manager in _forked_managers]


def _managers_after_fork_in_child() -> None:
    for manager in _forked_managers:
        manager._after_fork_in_child()
    _forked_managers.clear()


forking.hold_across_fork(forking.MANAGERS, _manager_locks, _managers_after_fork_in_child)


def _on_collected(manager_ref: "weakref.ref[DiscardableMemoryManager]",
                  record: _Allocation) -> Callable[[Any], None]:
    """The callback of record's memory weakref: queue the span for release."""
    def dropped(_: Any) -> None:
        manager = manager_ref()
        if manager is not None:
            # A garbage collection may run in the middle of a manager operation of this very
            # thread: queue the span (list.append is atomic), release it at the next operation.
            manager._dropped.append(record)

    return dropped


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
        limit = default_limit() if limit is None else validate.size(limit, "limit")
        segment_bytes = validate.size(segment_bytes, "segment_bytes")
        if segment_bytes < PAGE:
            raise ValueError(f"segment_bytes must be at least one page ({PAGE}), "
                             f"got {segment_bytes!r}")
        purge_age = validate.duration(purge_age, "purge_age")
        kind = backends.segment_kind(backend)
        self.backend, self._new_segment = kind.name, kind.segment
        self.limit = limit
        self.segment_pages = -(-segment_bytes // PAGE)
        self.purge_age = purge_age
        self.clock = clock
        self._lock_ = threading.RLock()
        self._heap = SpanHeap()
        self._segments: dict[int, Any] = {}
        self._next_segment = 0
        self._unlocked: OrderedDict[_Allocation, None] = OrderedDict()  # by unlock time
        self._live: set[_Allocation] = set()
        self._dropped: list[_Allocation] = []  # memory collected without close()
        self._self_ref = weakref.ref(self)
        self.bytes_allocated = 0  # live allocations, page-rounded
        self.bytes_locked = 0
        self.bytes_purged = 0  # live allocations whose pages are gone
        self.counters: Counter = Counter()
        self._background: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._monitor: Any = None
        # Caches told of memory pressure, by id (a Mapping is unhashable), held weakly.
        self._caches: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._caches_mutex = threading.Lock()  # registering while pressure lists the caches
        # lock/unlock durations for discache.metrics; None: not recorded (saves two clock reads)
        self.latency: Optional[dict[str, Any]] = None
        if record_latency:
            from .metrics import OPERATIONS, LatencyHistogram

            self.latency = {op: LatencyHistogram() for op in OPERATIONS}
        _MANAGERS.add(self)

    def _after_fork_in_child(self) -> None:
        """The forked child's manager: a fresh lock, no threads, segments of its own."""
        self._lock_ = threading.RLock()
        self._background = None
        self._stop = threading.Event()
        self._monitor = None
        # Each segment re-owns its pages in the child itself (Segment registers its own fork
        # hook); nothing here to hand out twice.

    # ------------------------------------------------------------------ allocation

    def allocate(self, nbytes: int) -> ManagedMemory:
        """New discardable memory of nbytes, returned locked; purges to stay under the limit."""
        nbytes = validate.size(nbytes)
        npages = -(-nbytes // PAGE)
        if npages * PAGE > self.limit:
            raise MemoryError(f"{nbytes} bytes exceed the manager's limit of {self.limit} bytes")
        with self._lock_:
            self._drain_dropped()
            span = self._heap.allocate(npages)
            if span is None:
                pages = max(npages, self.segment_pages)
                try:
                    segment = self._new_segment(pages)
                except (OSError, MemoryError) as error:
                    raise MemoryError(f"cannot map a segment of {pages * PAGE} bytes for "
                                      f"{nbytes} bytes: {error}") from error
                segment_id = self._next_segment
                self._next_segment += 1
                self._segments[segment_id] = segment
                self._heap.add_segment(segment_id, pages)
                span = self._heap.allocate(npages)
            segment = self._segments[span.segment]
            try:
                segment.claim_span(span.first, span.npages)
            except BaseException:
                self._give_back(span)
                raise
            record = _Allocation(span, segment)
            mem = DiscardableMemory(self, segment, span.first, span.npages, nbytes, record)
            record.memory = weakref.ref(mem, _on_collected(self._self_ref, record))
            self._live.add(record)
            self.bytes_allocated += npages * PAGE
            self.bytes_locked += npages * PAGE
            self.counters["allocations_made"] += 1
            # Only once the allocation succeeded: a failed one purges nothing.
            self._purge_to(self.limit)
            return mem

    def _record(self, mem: Any) -> _Allocation:
        """mem's record, if mem is an open allocation of this manager."""
        if not isinstance(mem, DiscardableMemory) or mem.owner is not self or mem.ticket not in self._live:
            if isinstance(mem, DiscardableMemory) and mem.closed:
                raise ValueError("discardable memory is closed")
            raise ValueError(f"{mem!r} is not memory of this manager")
        return mem.ticket

    # ------------------------------------------------------------------ SpanOwner: what a
    # DiscardableMemory asks of the manager, always under the manager's lock (mutex)

    @property
    def mutex(self) -> Any:
        """The manager's lock: every span's state changes under it."""
        return self._lock_

    def lock_span(self, mem: DiscardableMemory) -> int:
        """Lock mem's span (mem checked it is unlocked); returns how many pages were lost."""
        started = time.perf_counter() if self.latency is not None else 0.0
        with self._lock_:
            self._drain_dropped()
            record = self._record(mem)
            span = record.span
            size = span.npages * PAGE
            self._unlocked.pop(record, None)
            lost = record.segment.lock_span(span.first, span.npages)
            if record.purged:
                lost, record.purged = span.npages, False
                self.bytes_purged -= size
            elif lost:
                self.counters["purged_bytes_kernel"] += lost * PAGE
            record.locked = True
            self.bytes_locked += size
            self.counters["locks_purged" if lost else "locks_success"] += 1
            if lost:
                # Memory the manager had purged is resident again: keep the limit.
                self._purge_to(self.limit)
        if self.latency is not None:
            self.latency["lock"].observe(time.perf_counter() - started)
        return lost

    def unlock_span(self, mem: DiscardableMemory) -> None:
        """Unlock mem's span (mem checked it is locked and released its views)."""
        started = time.perf_counter() if self.latency is not None else 0.0
        with self._lock_:
            self._drain_dropped()
            record = self._record(mem)
            span = record.span
            record.segment.unlock_span(span.first, span.npages)
            self._unlocked_now(record, self.clock())
            self.counters["unlocks"] += 1
            self._purge_to(self.limit)
        if self.latency is not None:
            self.latency["unlock"].observe(time.perf_counter() - started)

    def _unlocked_now(self, record: _Allocation, now: float) -> None:
        record.locked = False
        record.last_unlocked = now
        self._unlocked[record] = None
        self.bytes_locked -= record.span.npages * PAGE

    def unlock_many(self, mems: list[DiscardableMemory]) -> int:
        """Unlock several locked allocations, one madvise per run of adjacent spans; returns the
        number of system calls made.  Memory of another manager, closed or unlocked memory, or
        the same memory twice is refused (ValueError / RuntimeError) with nothing changed."""
        started = time.perf_counter() if self.latency is not None else 0.0
        with self._lock_:
            self._drain_dropped()
            mems = list(mems)
            if len({id(mem) for mem in mems}) != len(mems):
                raise ValueError("unlock_many() got the same memory more than once")
            by_segment: dict[int, list[tuple[DiscardableMemory, _Allocation]]] = {}
            for mem in mems:
                record = self._record(mem)
                if not mem.is_locked:
                    raise RuntimeError(f"{mem!r} is not locked")
                by_segment.setdefault(record.span.segment, []).append((mem, record))
            for group in by_segment.values():
                for mem, _ in group:
                    mem.prepare_unlock()
            calls = 0
            now = self.clock()
            for segment_id, group in by_segment.items():
                calls += self._segments[segment_id].unlock_spans(
                    [(r.span.first, r.span.npages) for _, r in group])
                for mem, record in group:
                    mem.mark_unlocked()
                    self._unlocked_now(record, now)
            self.counters["unlocks"] += len(mems)
            self._purge_to(self.limit)
        if self.latency is not None and mems:
            # One observation per call: the batch is one operation for the application.
            self.latency["unlock"].observe(time.perf_counter() - started)
        return calls

    def close_span(self, mem: DiscardableMemory) -> None:
        """Take mem's span back (mem released its views)."""
        with self._lock_:
            self._free(self._record(mem))
            self._drain_dropped()

    def purge_span(self, mem: DiscardableMemory) -> int:
        """Discard mem's unlocked span now (as a purge by the manager); returns its pages."""
        with self._lock_:
            record = self._record(mem)
            if record.locked or record.purged:
                return 0
            self._unlocked.pop(record, None)
            self._purge_one(record, "release")
            return record.span.npages

    def reclaim_span(self, mem: DiscardableMemory) -> int:
        """Make the kernel reclaim mem's unlocked span now; returns the pages gone."""
        with self._lock_:
            record = self._record(mem)
            return record.segment.reclaim_span(record.span.first, record.span.npages)

    def span_buffer(self, mem: DiscardableMemory) -> Any:
        """A buffer of mem's locked span (counted, so that a dropped mem's views keep the span)."""
        with self._lock_:
            record = self._record(mem)
            record.buffer = record.segment.span_buffer(record.span.first * PAGE, mem.nbytes)
            return record.buffer

    def _drain_dropped(self) -> None:
        """Release the spans of memory collected without close() (under the manager's lock)."""
        if not self._dropped:
            return
        waiting = []
        while self._dropped:  # pop(): a collection in another thread may append meanwhile
            record = self._dropped.pop()
            if record.closed:
                continue
            if record.buffer is not None and record.buffer.exports:
                # A view of the span outlives its memory: the span is not free until it goes.
                waiting.append(record)
                continue
            self._free(record)
        self._dropped.extend(waiting)

    def _free(self, record: _Allocation) -> None:
        span = record.span
        size = span.npages * PAGE
        self._unlocked.pop(record, None)
        self._live.discard(record)
        record.buffer = None
        # Pages the application no longer wants: give them back now.
        record.segment.release_span(span.first, span.npages)
        if record.locked:
            self.bytes_locked -= size
        if record.purged:
            self.bytes_purged -= size
        record.closed = True
        record.locked = False
        self.bytes_allocated -= size
        self._give_back(span)

    def _give_back(self, span: Span) -> None:
        """Return a span to the heap, and its segment to the kernel once wholly free."""
        self._heap.free(span)
        if self._heap.used_pages(span.segment) == 0:
            self._heap.remove_segment(span.segment)
            self._segments.pop(span.segment).close()

    # ------------------------------------------------------------------ purging

    @property
    def bytes_resident(self) -> int:
        """Bytes of live allocations not purged by the manager (the kernel may have taken some)."""
        return self.bytes_allocated - self.bytes_purged

    @property
    def bytes_unlocked(self) -> int:
        """Bytes of unlocked allocations not purged by the manager."""
        return self.bytes_resident - self.bytes_locked

    def _purge_one(self, record: _Allocation, reason: str) -> int:
        record.segment.discard_span(record.span.first, record.span.npages)
        if tracing.active is not None: tracing.active.purge(record.memory and record.memory())
        record.purged = True
        size = record.span.npages * PAGE
        self.bytes_purged += size
        self.counters[f"purged_bytes_{reason}"] += size
        return size

    def _purge_to(self, target: int, reason: str = "limit") -> int:
        """Purge least recently unlocked memory until resident bytes are at most target."""
        freed = 0
        while self.bytes_resident > target and self._unlocked:
            record, _ = self._unlocked.popitem(last=False)
            freed += self._purge_one(record, reason)
        return freed

    def purge_older_than(self, age: Optional[float] = None) -> int:
        """Purge memory unlocked for longer than age seconds (default: purge_age); bytes freed."""
        age = self.purge_age if age is None else validate.duration(age, "age", zero=True)
        with self._lock_:
            self._drain_dropped()
            cutoff = self.clock() - age
            freed = 0
            while self._unlocked:
                record = next(iter(self._unlocked))
                if record.last_unlocked > cutoff:
                    break
                self._unlocked.popitem(last=False)
                freed += self._purge_one(record, "age")
            return freed

    def register_cache(self, cache: Any) -> None:
        """Tell cache (weakly held) of memory pressure: its on_memory_pressure(level) runs before
        the manager purges, so that the entries it unlocks can be purged."""
        with self._caches_mutex:
            self._caches[id(cache)] = cache

    def on_memory_pressure(self, level: str) -> int:
        """Moderate: caches unlock their idle entries, then purge down to half the limit;
        critical: caches unlock every unpinned entry, then purge every unlocked byte."""
        if level not in PRESSURE_LEVELS:
            raise ValueError(f"level must be one of {PRESSURE_LEVELS}, got {level!r}")
        # Outside the manager's lock: a cache takes its own lock first, then the manager's.
        with self._caches_mutex:
            caches = list(self._caches.values())
        for cache in caches:
            cache.on_memory_pressure(level)
        with self._lock_:
            self._drain_dropped()
            self.counters[f"pressure_{level}"] += 1
            return self._purge_to(self.limit // 2 if level == "moderate" else -1, "pressure")

    def release_free_memory(self) -> int:
        """Purge every unlocked allocation now (critical pressure); bytes freed."""
        with self._lock_:
            self._drain_dropped()
            return self._purge_to(-1, "release")

    # ------------------------------------------------------------------ background work

    def start_background_purge(self, interval: float = 60.0) -> None:
        """Every interval seconds, purge memory unlocked for longer than purge_age (a daemon)."""
        interval = validate.duration(interval, "interval")
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
        with self._lock_:
            self._drain_dropped()
            return len(self._segments)

    def stats(self) -> dict[str, int]:
        """Bytes by state, segments, and event counters."""
        with self._lock_:
            self._drain_dropped()
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
            self._drain_dropped()
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
