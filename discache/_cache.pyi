"""Types of discache._cache, DiscardableCache's compiled part."""
from typing import Any, Hashable

MISSING: object
MIN_SLOTS: int
CLASS_STEP: float
MAX_SLAB_PAGES: int
MIN_SLOT: int
SIZE_CLASSES: list[tuple[int, int, int]]

def size_classes(page: int) -> list[tuple[int, int, int]]: ...
def init_classes(page: int) -> None: ...
def class_for(size: int) -> int: ...

class Guard:
    """A cache's lock, with the garbage collector paused while any cache's lock is held."""

    def __init__(self, lock: Any) -> None: ...
    def __enter__(self) -> Guard: ...
    def __exit__(self, *exc_info: Any) -> bool: ...
    def acquire_now(self) -> bool: ...
    def release(self) -> None: ...

class ViewContext:
    """What DiscardableCache.view(key) returns: `with` it for a read-only memoryview."""

    def __init__(self, cache: CacheCore, key: Hashable) -> None: ...
    def __enter__(self) -> memoryview: ...
    def __exit__(self, *exc_info: Any) -> bool: ...

class Slab:
    """A span of discardable memory cut into equal slots; locked and unlocked as one."""

    mem: Any
    size_class: int
    slot_size: int
    nslots: int
    locked: bool
    used: bool
    listed: bool
    doomed: bool
    pins: int
    live: int
    last_used: float
    free_slots: list[int]
    entries: list[CacheEntry | None]
    def __init__(self, mem: Any, size_class: int, slot_size: int, nslots: int) -> None: ...
    def forget_memory(self) -> None: ...
    @property
    def nbytes(self) -> int: ...

class CacheEntry:
    """One cached value: where its bytes are, its sizes, pins and place in the LRU list."""

    key: Hashable
    slab: Slab | None
    slot: int
    size: int
    weight: int
    pins: int
    views: int
    linked: bool
    checksum: bytes | None
    def change_pins(self, delta: int, view: bool = False, cache: CacheCore | None = None) -> int: ...
    @property
    def offset(self) -> int: ...

class EntryView:
    """The read-only buffer of one entry handed out by DiscardableCache.view()."""

    def __init__(self, owner: Any, entry: CacheEntry) -> None: ...
    def __buffer__(self, flags: int) -> memoryview: ...

class CacheCore:
    """Base of DiscardableCache: the entries, their LRU list, the hit path and the set path."""

    currsize_: int
    maxsize_: int
    hits_: int
    misses_: int
    default_size: bool
    partial_: list[list[Slab]]
    lock_: Any
    guard_: Guard
    entries_: dict[Hashable, CacheEntry]
    purged_keys_: Any
    events_: list[tuple[Hashable, str]]
    evicted_for_size_: int
    pinned_weight_: int
    on_evict_: Any
    def get(self, key: Hashable, default: Any = None) -> Any: ...
    def __getitem__(self, key: Hashable) -> bytes: ...
    def _touch(self, entry: CacheEntry) -> None: ...
    def _lru(self) -> list[CacheEntry]: ...
    def _oldest_unpinned(self, skip: CacheEntry | None = None) -> CacheEntry | None: ...
    def _forget(self, entry: CacheEntry) -> None: ...
    def _detach(self, entry: CacheEntry) -> None: ...
    def _read(self, entry: CacheEntry) -> bytes: ...
    def _store(self, key: Hashable, value: Any) -> list[Hashable] | None: ...
