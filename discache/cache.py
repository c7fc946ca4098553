"""DiscardableCache: a bytes cache whose idle entries the kernel may reclaim, with exact loss reports."""
from __future__ import annotations

import copy as _copy
import functools
import operator
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any, Callable, Hashable, Iterator, NamedTuple, Optional

import mmh3

from . import idle, validate
from ._cache import MISSING, CacheCore, Guard, ViewContext, CacheEntry, EntryView, Slab, init_classes
from .errors import PinnedError
from .manager import PAGE, DiscardableMemoryManager, default_manager

init_classes(PAGE)
from ._cache import SIZE_CLASSES  # noqa: E402,F811  (filled by init_classes)

EVICTION_REASONS = ("size", "purged", "explicit")
PURGED_KEYS_KEPT = 65536  # purged keys remembered, only to count their regeneration
IDLE_TICKS = 2  # ticks per idle_unlock: an entry is unlocked within 1.5 x idle_unlock of its use
MIN_TICK = 0.001  # seconds between ticks at least (idle_unlock=0: about a millisecond after use)


class CacheInfo(NamedTuple):
    """functools-style statistics of a cached function."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


def _size(value: Any, what: str) -> int:
    """A number of bytes, 0..sys.maxsize (a size no memory can have is refused)."""
    return validate.size(value, what, sys.maxsize, zero=True)


def _idle_seconds(value: Any) -> Optional[float]:
    """idle_unlock: None (no idle timer) or a finite number of seconds >= 0."""
    return None if value is None else validate.duration(value, "idle_unlock", zero=True)


class DiscardableCache(CacheCore, MutableMapping):
    """A mapping of keys to byte buffers held in discardable memory.

    Values share slabs of equal slots (one size class per slab; a value above the largest class
    gets a slab of its own); a slab locks and unlocks as one.  Slabs not read for `idle_unlock`
    seconds are unlocked by the process's idle timer, and may then be reclaimed by the kernel or
    purged by the manager.  A purged entry is never returned: reads answer missing, drop every
    entry of the slab and report them through `on_evict(key, "purged")`.
    """

    def __init__(
        self,
        maxsize: int,
        backend: str = "auto",
        getsizeof: Optional[Callable[[Any], int]] = None,
        verify: bool = False,
        on_evict: Optional[Callable[[Hashable, str], None]] = None,
        *,
        manager: Optional[DiscardableMemoryManager] = None,
        idle_unlock: Optional[float] = 1.0,
    ) -> None:
        maxsize = _size(maxsize, "maxsize")
        idle_unlock = _idle_seconds(idle_unlock)
        if getsizeof is not None and not callable(getsizeof):
            raise TypeError("getsizeof must be callable")
        if on_evict is not None and not callable(on_evict):
            raise TypeError("on_evict must be callable")
        if manager is None:
            manager = default_manager() if backend == "auto" else DiscardableMemoryManager(
                backend=backend)
        elif not isinstance(manager, DiscardableMemoryManager):
            raise TypeError(f"manager must be a DiscardableMemoryManager, got "
                            f"{type(manager).__name__}")
        elif backend not in ("auto", manager.backend):
            raise ValueError(f"backend {backend!r} differs from the manager's {manager.backend!r}")
        self.manager = manager
        self.maxsize_ = maxsize
        if getsizeof is not None:
            self.getsizeof = getsizeof  # type: ignore[method-assign]
        self.default_size = getsizeof is None and type(self).getsizeof is DiscardableCache.getsizeof
        self.verify = bool(verify)
        self.on_evict_ = on_evict
        self.idle_unlock = idle_unlock
        self.lock_ = threading.RLock()
        self.guard_ = Guard(self.lock_)
        self.partial_ = [[] for _ in SIZE_CLASSES]
        self._slabs: set[Slab] = set()  # every open slab
        self._locked_slabs: set[Slab] = set()
        self._scheduled = False  # an idle tick is pending
        self._orphans: list[Slab] = []  # slabs whose last pin went while the lock was busy
        self.purged_keys_ = OrderedDict()
        self._evictions = {reason: 0 for reason in EVICTION_REASONS if reason != "size"}
        self.regenerations = 0
        self.purges_detected = 0
        self.purged_bytes = 0  # bytes of slabs found purged
        self.relocks = 0  # slabs locked again intact
        self.too_large = 0  # values get_or_create and cached returned without storing
        # A cache dropped without close() gives its memory back (not at exit: the system does,
        # and a view may still be read by an exit handler).
        self._finalizer = weakref.finalize(self, _release_slabs, self._slabs)
        self._finalizer.atexit = False
        manager.register_cache(self)
        with _CACHES_MUTEX:
            _CACHES[id(self)] = self

    # ------------------------------------------------------------------ sizes

    @staticmethod
    def getsizeof(value: Any) -> int:
        """The size of a value: its bytes (a subclass or the getsizeof argument may say else)."""
        with memoryview(value) as view:
            return view.nbytes

    @property
    def on_evict(self) -> Optional[Callable[[Hashable, str], None]]:
        """Called as on_evict(key, reason) for every entry leaving other than by close()."""
        return self.on_evict_

    @property
    def evictions(self) -> dict[str, int]:
        """Entries evicted, by reason ("size", "purged", "explicit")."""
        return {"size": self.evicted_for_size_, **self._evictions}

    @property
    def maxsize(self) -> int:
        """The most currsize may be."""
        return self.maxsize_

    @property
    def currsize(self) -> int:
        """Sum of getsizeof(value) over the entries."""
        return self.currsize_

    def _weigh(self, value: Any) -> int:
        """getsizeof(value), checked: an int >= 0 (a weight no memory can have is too large)."""
        weight = self.getsizeof(value)
        try:
            return _size(weight, "getsizeof(value)")
        except ValueError:
            if operator.index(weight) > 0:
                raise ValueError(f"value too large: getsizeof says {weight}, for a cache of "
                                 f"maxsize {self.maxsize_}") from None
            raise

    # ------------------------------------------------------------------ the mapping

    def __delitem__(self, key: Hashable) -> None:
        with self.guard_:
            entry = self.entries_[key]
            if entry.pins:
                raise PinnedError(f"{key!r} is pinned: unpin it (or end its view) before "
                                  "deleting it")
            self._detach(entry)
        self._report([entry.key], "explicit")

    def __missing__(self, key: Hashable) -> bytes:
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        """True if the key has an entry (it may still turn out purged when read)."""
        return key in self.entries_

    def __len__(self) -> int:
        return len(self.entries_)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys of intact entries (unlocked slabs are checked first)."""
        with self.guard_:
            self._check_unlocked()
            keys = list(self.entries_)
        self._flush()
        return iter(keys)

    def items(self) -> list[tuple[Hashable, bytes]]:  # type: ignore[override]
        """(key, bytes) of every intact entry, a snapshot."""
        with self.guard_:
            self._check_unlocked()
            pairs = [(key, self._read(entry)) for key, entry in self.entries_.items()]
        self._flush()
        return pairs

    def values(self) -> list[bytes]:  # type: ignore[override]
        """The bytes of every intact entry, a snapshot."""
        return [value for _, value in self.items()]

    def pop(self, key: Hashable, default: Any = MISSING) -> Any:
        """Remove the entry and return its bytes; default (or KeyError) if missing or purged."""
        try:
            with self.guard_:
                entry = self.entries_.get(key)
                value = MISSING
                if entry is not None and self._ensure_locked(entry):
                    if entry.pins:
                        raise PinnedError(f"{key!r} is pinned: unpin it (or end its view) "
                                          "before removing it")
                    value = self._read(entry)
                    self._detach(entry)
        finally:
            self._flush()
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            return default
        self._report([key], "explicit")
        return value

    def popitem(self) -> tuple[Hashable, bytes]:
        """Remove and return the least recently used unpinned entry that is intact."""
        while True:
            try:
                with self.guard_:
                    entry = self._oldest_unpinned()
                    if entry is None:
                        break
                    value = MISSING
                    if self._ensure_locked(entry):  # else found purged: dropped, try the next
                        value = self._read(entry)
                        self._detach(entry, True)  # even under a key changed since stored
            finally:
                self._flush()
            if value is not MISSING:
                self._report([entry.key], "explicit")
                return entry.key, value
        raise KeyError(f"{type(self).__name__} is empty") from None

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        """The value if present, else store default and return it."""
        value = self.get(key, MISSING)
        if value is MISSING:
            self[key] = value = default
        return value

    def clear(self) -> None:
        """Drop every entry but the pinned ones (reported as explicit evictions)."""
        with self.guard_:
            dropped = [entry.key for entry in self._lru() if not entry.pins]
            for key in dropped:
                self._detach(self.entries_[key])
        self._report(dropped, "explicit")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(maxsize={self.maxsize_}, currsize={self.currsize_}, "
                f"entries={len(self)}, backend={self.manager.backend!r})")

    # ------------------------------------------------------------------ copies and pickles

    def _settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"maxsize": self.maxsize_, "verify": self.verify,
                                    "idle_unlock": self.idle_unlock}
        if "getsizeof" in self.__dict__:
            settings["getsizeof"] = self.__dict__["getsizeof"]
        if self.on_evict is not None:
            settings["on_evict"] = self.on_evict
        return settings

    def _entries_lru(self) -> list[tuple[Hashable, bytes]]:
        with self.guard_:
            self._check_unlocked()
            pairs = [(entry.key, self._read(entry)) for entry in self._lru()]
        self._flush()
        return pairs

    def __copy__(self) -> "DiscardableCache":
        clone = type(self).__new__(type(self))
        DiscardableCache.__init__(clone, manager=self.manager, **self._settings())
        clone.__setstate__(self._entries_lru())
        return clone

    def __deepcopy__(self, memo: dict) -> "DiscardableCache":
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        settings = _copy.deepcopy(self._settings(), memo)
        DiscardableCache.__init__(clone, manager=self.manager, **settings)
        clone.__setstate__([(_copy.deepcopy(k, memo), v) for k, v in self._entries_lru()])
        return clone

    def __reduce__(self) -> Any:
        manager = self.manager
        where = None if manager is _default_manager_if_any() else (manager.limit, manager.backend)
        return (_unpickle, (type(self), self._settings(), where), self._entries_lru())

    def __setstate__(self, state: list[tuple[Hashable, bytes]]) -> None:
        for key, value in state:
            try:
                self[key] = value
            except ValueError as exc:  # larger than this cache's maxsize: not kept, as on a set
                if not _too_large(exc):
                    raise

    # ------------------------------------------------------------------ beyond a mapping

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> bytes:
        """The value, or factory()'s result stored and returned when missing or purged (a
        result too large for the cache is returned without being stored)."""
        value = self.get(key, MISSING)
        if value is not MISSING:
            return value
        created = factory()
        with memoryview(created) as view:
            result = view.tobytes()
        with self.guard_:
            if self.purged_keys_.pop(key, MISSING) is not MISSING:
                self.regenerations += 1
        try:
            self[key] = result
        except PinnedError:
            pass  # another thread stored the key meanwhile and is reading it: keep its value
        except ValueError as exc:
            if not _too_large(exc):
                raise
            with self.guard_:
                self.too_large += 1
        return result

    def view(self, key: Hashable) -> ViewContext:
        """Zero-copy read-only access to the entry: `with cache.view(key) as mv:`; KeyError if
        missing or purged.  The entry stays pinned while mv, or any slice of it or object made
        on its buffer, lives."""
        return ViewContext(self, key)

    def _view_slow(self, key: Hashable) -> memoryview:
        """view()'s way in when the entry's slab must be locked again or reports are pending."""
        try:
            with self.guard_:
                entry = self._pin(key, view=True)
                self._touch(entry)
                if entry.slab is not None:
                    entry.slab.used = True
                mv = memoryview(EntryView(self, entry))  # holds the pin while it lives
        except BaseException:
            self._flush_beside()  # purges found on the way, the KeyError going up
            raise
        try:
            self._flush()
        except BaseException:
            mv.release()
            raise
        return mv

    def pin(self, key: Hashable) -> None:
        """Keep the entry locked (never unlocked, reclaimed or evicted) until unpin; KeyError
        if missing or purged."""
        try:
            with self.guard_:
                self._pin(key)
        except BaseException:
            self._flush_beside()
            raise
        self._flush()

    def unpin(self, key: Hashable) -> None:
        """Undo one pin."""
        with self.guard_:
            entry = self.entries_[key]
            if entry.pins - entry.views == 0:
                raise ValueError(f"{key!r} is not pinned")
            if entry.change_pins(-1, False, self) == 0:
                self._last_pin_gone(entry.slab)

    def _pin(self, key: Hashable, view: bool = False) -> CacheEntry:
        entry = self.entries_.get(key)
        if entry is None or not self._ensure_locked(entry):
            raise KeyError(key)
        entry.change_pins(1, view, self)
        return entry

    def _last_pin_gone(self, slab: Slab) -> None:
        """A slab's last pin (or view) went: close it if the cache dropped it, else let the idle
        timer see it.  A view's buffer may be released in any thread, even one holding another
        lock (the manager's, in a garbage collection): never wait for the cache's lock here."""
        if not self.guard_.acquire_now():
            self._orphans.append(slab)  # the next idle tick finishes the work
            idle.TIMER.schedule(self, 0)
            return
        try:
            self._settle(slab)
        finally:
            self.guard_.release()

    def _settle(self, slab: Slab) -> None:
        """Close an unpinned slab the cache dropped; make sure an unpinned locked one is timed."""
        if slab.pins:
            return
        if slab.doomed:
            self._release_slab(slab)
        elif slab.locked:
            self._schedule()

    def sweep(self, idle: Optional[float] = None) -> int:
        """Unlock the slabs not read for `idle` seconds (default idle_unlock; 0: every unpinned
        one) now; returns how many entries they hold."""
        idle = self.idle_unlock if idle is None else idle
        if idle is None:
            idle = 0.0
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not (idle >= 0):
            raise ValueError(f"idle must be a number of seconds >= 0, got {idle!r}")
        with self.guard_:
            return self._sweep(float(idle))[0]

    def _sweep(self, idle: float) -> tuple[int, bool]:
        """Unlock idle slabs, close empty ones; (entries unlocked, whether locked slabs wait)."""
        now = idle_clock()
        batch: list[Slab] = []
        waiting = False
        for slab in list(self._locked_slabs):
            if slab.pins:
                continue
            if slab.live == 0:
                self._release_slab(slab)
                continue
            if slab.used:
                slab.used = False
                slab.last_used = now
            if idle > 0 and now - slab.last_used < idle:
                waiting = True
                continue
            batch.append(slab)
        if not batch:
            return 0, waiting
        if self.verify:
            for slab in batch:
                for entry in slab.entries:
                    if entry is not None:
                        entry.checksum = mmh3.hash_bytes(self._read(entry))
        for slab in batch:  # flagged first: from here on a hit takes the locked path
            slab.locked = False
            self._locked_slabs.discard(slab)
        self.manager.unlock_many([slab.mem for slab in batch])
        return sum(slab.live for slab in batch), waiting

    def _idle_tick(self) -> None:
        """The idle timer's call: unlock what has been idle long enough, then sleep again."""
        with self.guard_:
            while self._orphans:
                self._settle(self._orphans.pop())
            self._scheduled = False
            if self.idle_unlock is None:
                return
            _, waiting = self._sweep(self.idle_unlock)
            if waiting:
                self._schedule()

    def _schedule(self) -> None:
        """Make sure an idle tick is pending (the lock is held; a slab is locked)."""
        if not self._scheduled and self.idle_unlock is not None:
            self._scheduled = True
            idle.TIMER.schedule(self, max(self.idle_unlock / IDLE_TICKS, MIN_TICK))

    def on_memory_pressure(self, level: str) -> int:
        """The manager's call under pressure: moderate unlocks the idle entries, critical every
        unpinned one (the manager then purges); returns the entries unlocked."""
        if level == "critical":
            return self.sweep(0)
        return self.sweep()

    # ------------------------------------------------------------------ slabs

    def _new_slab(self, size_class: int, size: int) -> Slab:
        if size_class >= 0:
            slot_size, pages, slots = SIZE_CLASSES[size_class]
            if pages * PAGE > self.manager.limit:  # a tiny manager: one value a slab then
                size_class = -1
        if size_class < 0:
            slot_size, pages, slots = -(-size // PAGE) * PAGE, -(-size // PAGE), 1
            if pages * PAGE > self.manager.limit:
                raise ValueError(f"value too large: {size} bytes exceed the manager's limit of "
                                 f"{self.manager.limit} bytes")
        mem = self.manager.allocate(pages * PAGE)
        slab = Slab(mem, size_class, slot_size, slots)
        slab.last_used = idle_clock()
        self._slabs.add(slab)
        self._locked_slabs.add(slab)
        self._schedule()
        return slab

    def _lock_slab(self, slab: Slab) -> bool:
        """Lock an unlocked slab; on a purge drop its entries (reported later); True if intact."""
        intact = slab.mem.lock()
        slab.locked = True
        self._locked_slabs.add(slab)
        self._schedule()
        lost = [] if intact else [e for e in slab.entries if e is not None]
        if intact:
            self.relocks += 1
            if self.verify:
                lost = [e for e in slab.entries if e is not None and e.checksum is not None
                        and mmh3.hash_bytes(self._read(e)) != e.checksum]
        if lost:
            self.purges_detected += len(lost)
            self.purged_bytes += slab.nbytes if not intact else sum(e.size for e in lost)
            for entry in lost:
                self._detach(entry, True)  # a purged entry goes, whatever its key does
                self.events_.append((entry.key, "purged"))
                try:
                    self.purged_keys_[entry.key] = None
                except Exception:  # a key that cannot be hashed any more: not counted
                    pass
            while len(self.purged_keys_) > PURGED_KEYS_KEPT:
                self.purged_keys_.popitem(last=False)
        return not lost

    def _slab_emptied(self, slab: Slab) -> None:
        """A slab's last entry left: a slab of its own, or an unlocked one, goes now; a locked
        slab of a class stays for reuse until the next idle tick."""
        if slab.pins:
            return
        if slab.size_class < 0 or not slab.locked or slab.doomed:
            self._release_slab(slab)

    def _forget_slab(self, slab: Slab) -> None:
        """Take a slab out of the cache's books (its memory stays until released)."""
        if slab.listed:
            self.partial_[slab.size_class].remove(slab)
            slab.listed = False
        self._locked_slabs.discard(slab)
        self._slabs.discard(slab)

    def _release_slab(self, slab: Slab) -> None:
        self._forget_slab(slab)
        slab.locked = False
        slab.forget_memory()
        slab.mem.close()

    def _check_unlocked(self) -> None:
        """Lock every unlocked slab holding entries, dropping the purged ones (lock held); they
        unlock again at the next idle tick."""
        for slab in [s for s in self._slabs if not s.locked and s.live]:
            self._lock_slab(slab)
            slab.used = False

    def _ensure_locked(self, entry: CacheEntry) -> bool:
        """Lock the entry's slab if needed; False if the entry turned out purged (dropped)."""
        slab = entry.slab
        if slab is None or slab.locked:
            return True
        self._lock_slab(slab)
        return bool(entry.linked)

    def _get_locked(self, key: Hashable, touch: bool = True) -> Any:
        """The bytes of key's entry, locking its slab if needed; MISSING if absent or purged."""
        entry = self.entries_.get(key)
        if entry is None or not self._ensure_locked(entry):
            return MISSING
        slab = entry.slab
        if touch:
            self._touch(entry)
            if slab is not None:
                slab.used = True
        return self._read(entry)

    def _get_slow(self, key: Hashable) -> Any:
        """A read the compiled hit path leaves here: unlocked slabs, simulated memory, entries
        being replaced."""
        with self.guard_:
            value = self._get_locked(key)
            if value is MISSING:
                self.misses_ += 1
            else:
                self.hits_ += 1
        self._flush()
        return value

    # ------------------------------------------------------------------ evictions

    def _report(self, keys: list, reason: str) -> None:
        """Count evictions (size evictions are counted where they happen) and tell on_evict
        of each; an exception it raises goes up once every eviction was told."""
        if not keys:
            return
        if reason != "size":
            with self.guard_:
                self._evictions[reason] += len(keys)
        if self.on_evict_ is None:
            return
        failure = None
        for key in keys:
            try:
                self.on_evict_(key, reason)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _flush_beside(self) -> None:
        """_flush() while another exception goes up: on_evict's own failure goes to
        sys.unraisablehook instead of replacing it."""
        try:
            self._flush()
        except Exception:
            sys.unraisablehook(idle._Unraisable(sys.exc_info(), self,
                                                "Exception in on_evict, beside another"))

    def _flush(self) -> None:
        """Report the evictions and purges found under the lock, now that it is released."""
        if not self.events_:
            return
        with self.guard_:
            events, self.events_ = self.events_, []
        failure = None
        for key, reason in events:
            try:
                self._report([key], reason)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Free every entry's memory without reporting evictions (an entry being viewed is
        freed when its view ends); the cache stays usable, empty."""
        with self.guard_:
            for entry in self._lru():
                self._forget(entry)
                # pin() calls end with the cache's entries (no key can be unpinned any more);
                # live views keep their slab until they end.
                entry.change_pins(entry.views - entry.pins)
            self.pinned_weight_ = 0
            self.currsize_ = 0
            for slab in list(self._slabs):
                if slab.pins:
                    slab.doomed = True  # released when its last view goes
                    self._forget_slab(slab)
                else:
                    self._release_slab(slab)
            self.events_.clear()

    def _force_reclaim(self) -> int:
        """Unlock every unpinned entry and make the kernel discard them now; pages discarded."""
        from .memory import force_reclaim

        with self.guard_:
            self._sweep(0.0)
            return sum(force_reclaim(slab.mem) for slab in list(self._slabs)
                       if not slab.locked)

    # ------------------------------------------------------------------ reporting

    def metrics_snapshot(self) -> dict[str, Any]:
        """The numbers discache.metrics exports for this cache (its own slabs only)."""
        with self.guard_:
            allocated = sum(slab.nbytes for slab in self._slabs)
            locked = sum(slab.nbytes for slab in self._locked_slabs)
            return {
                "allocated_bytes": allocated,
                "locked_bytes": locked,
                "unlocked_bytes": allocated - locked,
                "purged_bytes": self.purged_bytes,
                "locks": {"success": self.relocks, "purged": self.purges_detected, "failed": 0},
                "evictions": dict(self.evictions),
                "hits": self.hits_,
                "misses": self.misses_,
                "regenerations": self.regenerations,
            }

    def stats(self) -> dict[str, int]:
        """Hits, misses, purges, regenerations, evictions by reason, sizes, slabs and bytes."""
        with self.guard_:
            entries = list(self.entries_.values())
            return {
                "hits": self.hits_,
                "misses": self.misses_,
                "purges_detected": self.purges_detected,
                "regenerations": self.regenerations,
                **{f"evictions_{reason}": n for reason, n in self.evictions.items()},
                "too_large": self.too_large,
                "currsize": self.currsize_,
                "maxsize": self.maxsize_,
                "entries": len(entries),
                "locked_entries": sum(e.slab is None or e.slab.locked for e in entries),
                "pinned_entries": sum(bool(e.pins) for e in entries),
                "slabs": len(self._slabs),
                "allocated_bytes": sum(slab.nbytes for slab in self._slabs),
                "locked_bytes": sum(slab.nbytes for slab in self._locked_slabs),
            }


idle_clock = idle.clock


def _too_large(exc: ValueError) -> bool:
    """Whether a set refused the value for its size (every such refusal says so first)."""
    return str(exc).startswith("value too large")


def _release_slabs(slabs: set) -> None:
    """The finalizer of a cache dropped without close(): free its slabs' memory."""
    for slab in list(slabs):
        if slab.pins:  # a live view holds it (and so the cache): not reached, but never freed
            continue
        slab.forget_memory()
        try:
            slab.mem.close()
        except (BufferError, ValueError):
            pass
        slabs.discard(slab)


def _default_manager_if_any() -> Optional[DiscardableMemoryManager]:
    from . import manager as manager_module

    return manager_module._default


def _unpickle(cls: type, settings: dict, where: Optional[tuple]) -> DiscardableCache:
    manager = None if where is None else DiscardableMemoryManager(where[0], where[1])
    cache = cls.__new__(cls)
    DiscardableCache.__init__(cache, manager=manager, **settings)
    return cache


# ---------------------------------------------------------------------- fork

_CACHES: "weakref.WeakValueDictionary[int, DiscardableCache]" = weakref.WeakValueDictionary()
_CACHES_MUTEX = threading.Lock()  # a cache registering while a fork lists them
_FORK_HELD: list = []  # the caches' locks (not the caches: see _before_fork)


def _before_fork() -> None:
    # Every cache's lock, so that no thread is half-way through changing one in the child.  Only
    # the locks are kept: holding the caches would make the child drop the last reference to
    # caches another thread let go, and run their finalizers inside the fork hook.
    with _CACHES_MUTEX:
        caches = list(_CACHES.values())
    for cache in caches:
        cache.lock_.acquire()
        _FORK_HELD.append(cache.lock_)
    del caches


def _after_fork() -> None:
    while _FORK_HELD:
        _FORK_HELD.pop().release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                        after_in_child=_after_fork)


# ---------------------------------------------------------------------- cached


class _KeywordsMark:
    """Separates positional from keyword arguments in a key (unique, and kept by pickle)."""


_KWARGS_MARK = (_KeywordsMark,)


def hashkey(*args: Any, **kwargs: Any) -> tuple:
    """The key of a call: its arguments, then its keyword arguments sorted (a plain tuple, as
    cachetools' hashkey)."""
    if kwargs:
        return args + _KWARGS_MARK + tuple(sorted(kwargs.items()))
    return args


def cached(cache: DiscardableCache, key: Callable[..., Hashable] = hashkey,
           lock: Any = None, condition: Any = None, info: bool = False) -> Callable:
    """Memoize a function returning bytes-like values in cache (cachetools.cached's signature).

    A value too large for the cache is returned without being stored; with a lock, the cache is
    read and written under it, never the function; with a condition (a threading.Condition,
    used as the lock), concurrent calls of the same key wait for the first instead of computing
    it again."""
    if cache is None:
        raise TypeError("cache must not be None (as in cachetools 8): call the function itself")
    if condition is not None and lock is None:
        lock = condition

    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        hits = misses = 0
        pending: set = set()
        get = cache.get

        def store(k: Hashable, value: Any) -> None:
            try:
                cache[k] = value  # type: ignore[index]
            except ValueError as exc:  # too large: returned uncached, as cachetools does
                if not _too_large(exc):
                    raise
                cache.too_large += 1  # type: ignore[union-attr]

        if lock is None:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                nonlocal hits, misses
                k = key(*args, **kwargs)
                value = get(k, MISSING)  # type: ignore[misc]
                if value is not MISSING:
                    hits += 1
                    return value
                misses += 1
                value = function(*args, **kwargs)
                store(k, value)
                return value
        else:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                nonlocal hits, misses
                k = key(*args, **kwargs)
                with lock:
                    if condition is not None:
                        condition.wait_for(lambda: k not in pending)
                    value = get(k, MISSING)  # type: ignore[misc]
                    if value is not MISSING:
                        hits += 1
                        return value
                    misses += 1
                    if condition is not None:
                        pending.add(k)
                try:
                    value = function(*args, **kwargs)
                    with lock:
                        store(k, value)
                finally:
                    if condition is not None:
                        with lock:
                            pending.discard(k)
                            condition.notify_all()
                return value

        def cache_info() -> CacheInfo:
            if lock is None:
                return CacheInfo(hits, misses, cache.maxsize, cache.currsize)
            with lock:
                return CacheInfo(hits, misses, cache.maxsize, cache.currsize)

        def cache_clear() -> None:
            nonlocal hits, misses
            if lock is None:
                cache.clear()
                hits = misses = 0
            else:
                with lock:
                    cache.clear()
                    hits = misses = 0

        wrapper = functools.update_wrapper(wrapper, function)
        wrapper.cache = cache  # type: ignore[attr-defined]
        wrapper.cache_key = key  # type: ignore[attr-defined]
        wrapper.cache_lock = lock  # type: ignore[attr-defined]
        wrapper.cache_condition = condition  # type: ignore[attr-defined]
        wrapper.cache_clear = cache_clear  # type: ignore[attr-defined]
        if info:  # as cachetools: cache_info() only when asked for
            wrapper.cache_info = cache_info  # type: ignore[attr-defined]
        return wrapper

    return decorator
