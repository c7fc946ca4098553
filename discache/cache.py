"""DiscardableCache: a bytes cache whose idle entries the kernel may reclaim, with exact loss reports."""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, NamedTuple, Optional

import mmh3

from ._core import SWEEP_EVERY, CacheCore, CacheEntry, CacheShard
from .errors import PinnedError
from .manager import PAGE, DiscardableMemoryManager, ManagedMemory, default_manager

EVICTION_REASONS = ("size", "purged", "explicit")
PURGED_KEYS_KEPT = 4096  # per shard: purged keys remembered to count their regeneration


class CacheInfo(NamedTuple):
    """functools-style statistics of a cached function."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class DiscardableCache(CacheCore, MutableMapping):
    """A mapping of keys to byte buffers held in discardable memory.

    Recently used entries stay locked, so a hit costs no system call; entries idle for
    `idle_unlock` seconds are unlocked in batches (one madvise per run of adjacent spans) and may
    then be reclaimed by the kernel or purged by the manager.  A purged entry is never returned:
    `get` answers None, drops it and reports it through `on_evict(key, "purged")`.
    """

    def __init__(
        self,
        maxsize: int,
        backend: str = "auto",
        getsizeof: Optional[Callable[[Any], int]] = len,
        verify: bool = False,
        on_evict: Optional[Callable[[Hashable, str], None]] = None,
        *,
        manager: Optional[DiscardableMemoryManager] = None,
        shards: int = 16,
        idle_unlock: float = 1.0,
    ) -> None:
        if not isinstance(maxsize, int) or maxsize <= 0:
            raise ValueError(f"maxsize must be a positive number of bytes, got {maxsize!r}")
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, got {shards!r}")
        if idle_unlock < 0:
            raise ValueError(f"idle_unlock must be >= 0 seconds, got {idle_unlock!r}")
        if on_evict is not None and not callable(on_evict):
            raise TypeError("on_evict must be callable")
        if manager is None:
            manager = default_manager() if backend == "auto" else DiscardableMemoryManager(
                backend=backend)
        elif backend not in ("auto", manager.backend):
            raise ValueError(f"backend {backend!r} differs from the manager's {manager.backend!r}")
        self.manager = manager
        self.maxsize = maxsize
        self.getsizeof = getsizeof or len
        self.verify = verify
        self.on_evict = on_evict
        self.idle_unlock = idle_unlock
        self._init_shards(shards)
        for shard in self._shards:
            shard.lock = threading.RLock()
        self._size_lock = threading.Lock()  # currsize and the counters the shards share
        self._currsize = 0
        self._last_sweep = manager.clock()
        self.evictions = {reason: 0 for reason in EVICTION_REASONS}
        self.regenerations = 0
        self.purges_detected = 0
        self.purged_bytes = 0  # bytes of entries found purged
        self.relocks = 0  # idle entries locked again intact

    # ------------------------------------------------------------------ the mapping

    @property
    def currsize(self) -> int:
        """Sum of getsizeof(value) over the entries."""
        return self._currsize

    def _get_slow(self, key: Hashable, default: Any) -> Any:
        """get() for what the compiled hit path does not serve: misses, unlocked entries and
        entries read through their memory object."""
        shard = self._shard(key)
        with shard.lock:
            entry = shard.entries.get(key)
            if entry is None:
                shard.misses += 1
                return default
            if entry.locked or self._relock(shard, entry):
                entry.used = True
                shard.touch(entry)
                shard.hits += 1
                shard.ops += 1
                value = b"" if entry.mem is None else entry.mem.read(0, entry.size)
            else:
                shard.misses += 1
                value = _MISSING
        # Outside the shard's lock: sweeps take every shard's lock, callbacks may use the cache.
        if value is _MISSING:
            self._evicted(key, "purged")
            return default
        self._maybe_sweep(shard)
        return value

    def __getitem__(self, key: Hashable) -> bytes:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        """True if the key has an entry (it may still turn out purged when read)."""
        return key in self._shard(key).entries  # type: ignore[arg-type]

    def __setitem__(self, key: Hashable, value: Any) -> None:
        weight = self.getsizeof(value)
        if weight > self.maxsize:
            raise ValueError(f"value too large: {weight} bytes for a cache of {self.maxsize}")
        self._refuse_if_pinned(key)
        with memoryview(value) as view, view.cast("B") as data:
            size = data.nbytes
            mem = self.manager.allocate(size) if size else None
            try:
                if mem is not None:
                    mem.write(data)
            except BaseException:
                mem.close()
                raise
        entry = CacheEntry()
        entry.key = key
        entry.size = size
        entry.weight = weight
        entry.locked = entry.used = True
        if mem is not None:
            segment = mem._segment
            raw = getattr(segment, "address", None)
            entry.bind(mem, raw + mem.offset if raw is not None else 0)
        shard = self._shard(key)
        with shard.lock:
            old = shard.entries.get(key)
            if old is not None and old.pins:  # pinned since the check above
                if mem is not None:
                    mem.close()
                raise PinnedError(f"{key!r} is pinned: unpin it before replacing it")
            if old is not None:
                shard.remove(key)
                self._release(old, weight=True)
            shard.add(entry)
            shard.purged_keys.pop(key, None)
            with self._size_lock:
                self._currsize += weight
        self._evict_for_size(shard)

    def __delitem__(self, key: Hashable) -> None:
        shard = self._shard(key)
        with shard.lock:
            entry = shard.entries[key]
            if entry.pins:
                # Its memory may be viewed right now: freeing it would pull it from under the view.
                raise PinnedError(f"{key!r} is pinned: unpin it before deleting it")
            shard.remove(key)
            self._release(entry, weight=True)
        self._evicted(key, "explicit")

    def _refuse_if_pinned(self, key: Hashable) -> None:
        shard = self._shard(key)
        with shard.lock:
            entry = shard.entries.get(key)
            if entry is not None and entry.pins:
                raise PinnedError(f"{key!r} is pinned: unpin it before replacing it")

    def __len__(self) -> int:
        return sum(len(shard.entries) for shard in self._shards)

    def __iter__(self) -> Iterator[Hashable]:
        for shard in self._shards:
            with shard.lock:
                keys = list(shard.entries)
            yield from keys

    def __repr__(self) -> str:
        return (f"DiscardableCache(maxsize={self.maxsize}, currsize={self._currsize}, "
                f"entries={len(self)}, backend={self.manager.backend!r})")

    # ------------------------------------------------------------------ beyond a mapping

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> bytes:
        """The value, or factory()'s result stored and returned when missing or purged."""
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        created = factory()
        shard = self._shard(key)
        with shard.lock:
            regenerated = shard.purged_keys.pop(key, _MISSING) is not _MISSING
        if regenerated:
            with self._size_lock:
                self.regenerations += 1
        try:
            self[key] = created
        except PinnedError:
            pass  # another thread stored the key meanwhile and is reading it: keep its value
        with memoryview(created) as view:
            return view.tobytes()

    @contextmanager
    def view(self, key: Hashable) -> Iterator[memoryview]:
        """Zero-copy read-only access to the entry while it is held locked; KeyError if missing
        or purged."""
        self.pin(key)
        shard = self._shard(key)
        with shard.lock:
            entry = shard.entries[key]
            entry.used = True  # a read like get(): recently used, not idle
            shard.touch(entry)
        if entry.mem is None:
            mv = memoryview(b"")
        else:
            mv = entry.mem.data[:entry.size].toreadonly()
        try:
            yield mv
        finally:
            mv.release()
            self.unpin(key)

    def pin(self, key: Hashable) -> None:
        """Keep the entry locked (never unlocked, reclaimed or evicted) until unpin; KeyError
        if missing or purged."""
        shard = self._shard(key)
        with shard.lock:
            entry = shard.entries.get(key)
            if entry is None:
                raise KeyError(key)
            purged = not entry.locked and not self._relock(shard, entry)
            if not purged:
                entry.pins += 1
        if purged:
            self._evicted(key, "purged")
            raise KeyError(key)

    def unpin(self, key: Hashable) -> None:
        """Undo one pin."""
        shard = self._shard(key)
        with shard.lock:
            entry = shard.entries[key]
            if entry.pins == 0:
                raise ValueError(f"{key!r} is not pinned")
            entry.pins -= 1

    def sweep(self, idle: Optional[float] = None) -> int:
        """Unlock entries not used for `idle` seconds (default idle_unlock; 0: every unpinned
        entry) in batches; returns how many were unlocked."""
        idle = self.idle_unlock if idle is None else idle
        batch: list[tuple[CacheShard, Hashable, CacheEntry]] = []
        for shard in self._shards:
            shard.lock.acquire()
        try:
            for shard in self._shards:
                for key, entry in shard.entries.items():
                    if not entry.locked or entry.pins or entry.mem is None:
                        continue
                    if entry.used and idle > 0:
                        entry.used = False  # second chance: unlocked next time if still idle
                        continue
                    batch.append((shard, key, entry))
                shard.ops = 0
            if batch:
                if self.verify:
                    for _, _, entry in batch:
                        entry.checksum = mmh3.hash_bytes(entry.mem.read(0, entry.size))
                # Unlocked in the entries first: from here on a hit takes the locked path.
                for _, _, entry in batch:
                    entry.locked = False
                self.manager.unlock_many([entry.mem for _, _, entry in batch])
            self._last_sweep = self.manager.clock()
            return len(batch)
        finally:
            for shard in self._shards:
                shard.lock.release()

    def _maybe_sweep(self, shard: CacheShard) -> None:
        if shard.ops < SWEEP_EVERY:
            return
        shard.ops = 0
        if self.manager.clock() - self._last_sweep >= self.idle_unlock / 2:
            self.sweep()

    def _relock(self, shard: CacheShard, entry: CacheEntry) -> bool:
        """Lock an unlocked entry; on a purge drop it and return False (the caller reports it
        once the shard's lock is released)."""
        intact = entry.mem.lock()
        if intact and self.verify and entry.checksum is not None:
            intact = mmh3.hash_bytes(entry.mem.read(0, entry.size)) == entry.checksum
        if intact:
            entry.locked = True
            entry.used = True
            with self._size_lock:
                self.relocks += 1
            return True
        with self._size_lock:
            self.purged_bytes += entry.mem.npages * PAGE
            self.purges_detected += 1
        shard.remove(entry.key)
        self._release(entry, weight=True)
        shard.purged_keys[entry.key] = None
        if len(shard.purged_keys) > PURGED_KEYS_KEPT:  # only to count regenerations: bounded
            del shard.purged_keys[next(iter(shard.purged_keys))]
        return False

    def _release(self, entry: CacheEntry, weight: bool) -> None:
        if entry.mem is not None:
            entry.mem.close()
        if weight:
            with self._size_lock:
                self._currsize -= entry.weight

    def _evicted(self, key: Hashable, reason: str) -> None:
        with self._size_lock:
            self.evictions[reason] += 1
        if self.on_evict is not None:
            self.on_evict(key, reason)

    def _evict_for_size(self, shard: CacheShard) -> None:
        """Evict least recently used unpinned entries, this shard's first, until under maxsize."""
        order = [shard] + [s for s in self._shards if s is not shard]
        for victim_shard in order:
            while self._currsize > self.maxsize:
                with victim_shard.lock:
                    entry = victim_shard.oldest_unpinned()
                    if entry is None:
                        break
                    victim = entry.key
                    victim_shard.remove(victim)
                    self._release(entry, weight=True)
                self._evicted(victim, "size")
            if self._currsize <= self.maxsize:
                return

    def clear(self) -> None:
        """Drop every entry but the pinned ones (reported as explicit evictions)."""
        for key in list(self):
            try:
                del self[key]
            except (KeyError, PinnedError):
                pass

    def close(self) -> None:
        """Free every entry's memory without reporting evictions."""
        for shard in self._shards:
            with shard.lock:
                for key in list(shard.entries):
                    self._release(shard.remove(key), weight=False)
        self._currsize = 0

    def _force_reclaim(self) -> int:
        """Unlock every unpinned entry and make the kernel discard them now; pages discarded."""
        self.sweep(idle=0)
        gone = 0
        for shard in self._shards:
            with shard.lock:
                for entry in shard.entries.values():
                    if not entry.locked and entry.mem is not None:
                        gone += entry.mem._force_reclaim()
        return gone

    def metrics_snapshot(self) -> dict[str, Any]:
        """The numbers discache.metrics exports for this cache (its own entries only)."""
        allocated = locked = 0
        for shard in self._shards:
            with shard.lock:
                for e in shard.entries.values():
                    if e.mem is not None:
                        allocated += e.mem.npages * PAGE
                        locked += e.mem.npages * PAGE if e.locked else 0
        stats = self.stats()
        return {
            "allocated_bytes": allocated,
            "locked_bytes": locked,
            "unlocked_bytes": allocated - locked,
            "purged_bytes": self.purged_bytes,
            "locks": {"success": self.relocks, "purged": self.purges_detected, "failed": 0},
            "evictions": dict(self.evictions),
            "hits": stats["hits"],
            "misses": stats["misses"],
            "regenerations": self.regenerations,
        }

    def stats(self) -> dict[str, int]:
        """Hits, misses, purges, regenerations, evictions by reason, sizes and locked entries."""
        entries = locked = pinned = 0
        for shard in self._shards:
            with shard.lock:
                entries += len(shard.entries)
                locked += sum(e.locked for e in shard.entries.values())
                pinned += sum(bool(e.pins) for e in shard.entries.values())
        return {
            "hits": sum(s.hits for s in self._shards),
            "misses": sum(s.misses for s in self._shards),
            "purges_detected": self.purges_detected,
            "regenerations": self.regenerations,
            **{f"evictions_{reason}": n for reason, n in self.evictions.items()},
            "currsize": self._currsize,
            "maxsize": self.maxsize,
            "entries": entries,
            "locked_entries": locked,
            "pinned_entries": pinned,
        }


_MISSING: Any = object()


def cached(cache: DiscardableCache, key: Callable[..., Hashable] = None):  # type: ignore[assignment]
    """Memoize a function returning a bytes-like value in `cache`; adds cache_info()/cache_clear()."""
    make_key = key or (lambda *args, **kwargs: (args, tuple(sorted(kwargs.items()))))

    def decorator(function: Callable[..., Any]) -> Callable[..., bytes]:
        counts = {"hits": 0, "misses": 0}
        lock = threading.Lock()

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> bytes:
            k = make_key(*args, **kwargs)
            value = cache.get(k, _MISSING)
            with lock:
                counts["hits" if value is not _MISSING else "misses"] += 1
            if value is not _MISSING:
                return value
            return cache.get_or_create(k, lambda: function(*args, **kwargs))

        def cache_info() -> CacheInfo:
            return CacheInfo(counts["hits"], counts["misses"], cache.maxsize, cache.currsize)

        def cache_clear() -> None:
            cache.clear()
            counts["hits"] = counts["misses"] = 0

        wrapper.cache_info = cache_info  # type: ignore[attr-defined]
        wrapper.cache_clear = cache_clear  # type: ignore[attr-defined]
        wrapper.cache = cache  # type: ignore[attr-defined]
        return wrapper

    return decorator
