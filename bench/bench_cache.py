"""DiscardableCache beside cachetools in one run: hits, misses, sets, eviction, cached, scale.

Run: python -m pytest bench/bench_cache.py --benchmark-only   (or: discache bench --only cache)

Every discache benchmark names in its extra_info the row it is measured against (`baseline`,
and `baseline_op` when that row measures another op) and its `target` ratio (issue 10), so that
discache.benchreport prints the ratios and whether each target is met. Benchmarks that time a
batch of operations per call say how many in `ops`; the report divides by it.

Targets, 4 KiB values in a cache of 1000 keys, backend madvfree:
  get hit <= 1.2x cachetools.LRUCache's hit (its bound __getitem__, the fastest way in);
  cache[key] hit <= 1.5x; miss (get of an absent key) <= 2x; set overwrite <= 3x;
  set of a new key evicting the least recently used <= 5x; discache.cached hit <= 1.5x
  cachetools.cached on an LRUCache; and a get hit among 1,000,000 entries of 100 B <= 1.5x
  the same among 1,000 entries, for a working set of 64 random keys in both (what the cache's
  own structures cost per hit as it grows).  The same with 1000 random keys is shown beside a
  plain dict's, without a target: there the processor's caches and TLB decide (a dict's get
  slows down about 2.5x from 1,000 to 1,000,000 entries by itself).
"""
from __future__ import annotations

import functools
import operator
import os
import random
import warnings
from collections import deque
from itertools import cycle, repeat

import cachetools
import pytest

import discache
from discache.cache import DiscardableCache
from discache.manager import DiscardableMemoryManager

VALUE = bytes(range(256)) * 16  # 4 KiB
OTHER_VALUE = VALUE[::-1]  # same size, other bytes: an overwrite really changes the entry
KEYS = [f"image-{i}" for i in range(1000)]
HOT = "image-500"
ABSENT = "image-absent"
MANAGER_LIMIT = 64 << 20
BASELINE = "cachetools.LRUCache"

SMALL_VALUE = bytes(range(100))  # 100 B: the scale benchmarks
WORKING_SET = 1000  # distinct keys a scale benchmark cycles through, whatever the cache's size
HOT_SET = 64  # the working set the scale target is measured with: it stays in the CPU's caches
LARGE_ENTRIES = 1_000_000
QUICK_LARGE_ENTRIES = 100_000  # quick mode (the test suite runs it) builds a smaller cache
# the large cache must not take more discardable memory than this (the cache of today spends a
# page per small value: 1M entries would be 4 GiB); past it, fewer entries and no target
SCALE_BUDGET = 1 << 30


def quick() -> bool:
    """Whether bench/conftest.py's quick mode is on."""
    return os.environ.get("DISCACHE_BENCH_QUICK", "") not in ("", "0")


# Without warmup, a slow first call (cold caches, a sweep) makes calibration settle on one
# iteration per round, and the timer's own cost then weighs on that row alone: warm up first.
# Half a second per benchmark (not pytest-benchmark's 1 s) keeps the file's run under a minute;
# quick mode keeps its own shorter time.
pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=1000,
                                   **({} if quick() else {"max_time": 0.5}))


def discache_full(backend: str = "madvfree", maxsize: int = MANAGER_LIMIT) -> DiscardableCache:
    """A DiscardableCache on its own manager holding the 1000 keys, 4 KiB each."""
    cache = DiscardableCache(maxsize, manager=DiscardableMemoryManager(MANAGER_LIMIT, backend))
    for key in KEYS:
        cache[key] = VALUE
    return cache


def cachetools_full() -> cachetools.LRUCache:
    """A cachetools.LRUCache of maxsize 1000 holding the 1000 keys."""
    cache = cachetools.LRUCache(maxsize=len(KEYS))
    for key in KEYS:
        cache[key] = VALUE
    return cache


def mark(benchmark, group: str, op: str, impl: str, baseline: str | None = None,
         target: float | None = None, nbytes: int = len(VALUE), **extra) -> None:
    """The benchmark's group and the extra_info the report pairs rows and checks targets with."""
    benchmark.group = group
    benchmark.extra_info.update(op=op, impl=impl, nbytes=nbytes, **extra)
    if baseline is not None:
        benchmark.extra_info["baseline"] = baseline
    if target is not None:
        benchmark.extra_info["target"] = target


# ---------------------------------------------------------------- get hit


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_discache_get(benchmark, backend):
    mark(benchmark, "get hit, 4 KiB value", "cache-hit", f"DiscardableCache[{backend}]",
         BASELINE, 1.2, backend=backend)
    cache = discache_full(backend)
    assert benchmark(cache.get, HOT) == VALUE
    cache.close()


def bench_cachetools_lru_get(benchmark):
    """The baseline: LRUCache.__getitem__ bound, the fastest hit cachetools offers."""
    mark(benchmark, "get hit, 4 KiB value", "cache-hit", BASELINE)
    cache = cachetools_full()
    assert benchmark(cache.__getitem__, HOT) == VALUE


def bench_cachetools_lru_get_method(benchmark):
    """LRUCache.get: a containment test, then __getitem__ (cachetools' Cache.get)."""
    mark(benchmark, "get hit, 4 KiB value", "cache-hit", "cachetools.LRUCache.get")
    cache = cachetools_full()
    assert benchmark(cache.get, HOT) == VALUE


def bench_functools_lru_cache(benchmark):
    mark(benchmark, "get hit, 4 KiB value", "cache-hit", "functools.lru_cache")

    @functools.lru_cache(maxsize=len(KEYS))
    def load(key):
        return VALUE

    load(HOT)
    assert benchmark(load, HOT) == VALUE


# ---------------------------------------------------------------- cache[key] hit and miss


def bench_discache_getitem(benchmark):
    mark(benchmark, "cache[key] hit, 4 KiB value", "cache-getitem-hit",
         "DiscardableCache[madvfree]", BASELINE, 1.5, backend="madvfree")
    cache = discache_full()
    # operator.getitem is what cache[key] compiles to, without a Python frame around it
    assert benchmark(operator.getitem, cache, HOT) == VALUE
    cache.close()


def bench_cachetools_getitem(benchmark):
    mark(benchmark, "cache[key] hit, 4 KiB value", "cache-getitem-hit", BASELINE)
    cache = cachetools_full()
    assert benchmark(operator.getitem, cache, HOT) == VALUE


def bench_discache_miss(benchmark):
    mark(benchmark, "get miss", "cache-miss", "DiscardableCache[madvfree]", BASELINE, 2.0,
         backend="madvfree")
    cache = discache_full()
    assert benchmark(cache.get, ABSENT) is None
    cache.close()


def bench_cachetools_miss(benchmark):
    mark(benchmark, "get miss", "cache-miss", BASELINE)
    cache = cachetools_full()
    assert benchmark(cache.get, ABSENT) is None


# ---------------------------------------------------------------- sets


def bench_discache_set_overwrite(benchmark):
    """The same key again, a value of the same size."""
    mark(benchmark, "set overwrite, 4 KiB value", "cache-set-overwrite",
         "DiscardableCache[madvfree]", BASELINE, 3.0, backend="madvfree")
    cache = discache_full()
    benchmark(operator.setitem, cache, HOT, OTHER_VALUE)
    assert cache[HOT] == OTHER_VALUE and len(cache) == len(KEYS)
    cache.close()


def bench_cachetools_set_overwrite(benchmark):
    mark(benchmark, "set overwrite, 4 KiB value", "cache-set-overwrite", BASELINE)
    cache = cachetools_full()
    benchmark(operator.setitem, cache, HOT, OTHER_VALUE)
    assert cache[HOT] == OTHER_VALUE and len(cache) == len(KEYS)


def evicting_sets(cache) -> tuple:
    """A call that sets 1000 new keys into a full cache of 1000, and the count of calls made.

    Keys come from two halves of 2000 that the calls alternate between: under LRU every key set
    was evicted 1000 sets earlier, so every set inserts and evicts the least recently used."""
    halves = cycle([[f"image-{i}" for i in range(1000, 2000)], KEYS])
    calls = [0]

    def set_batch() -> None:
        calls[0] += 1
        deque(map(operator.setitem, repeat(cache), next(halves), repeat(VALUE)), 0)

    return set_batch, calls


def bench_discache_set_evict(benchmark):
    """A new key into a cache holding exactly 1000 values of 4 KiB: one eviction per set."""
    mark(benchmark, "set of a new key with eviction, 4 KiB value", "cache-set-evict",
         "DiscardableCache[madvfree]", BASELINE, 5.0, backend="madvfree", ops=len(KEYS))
    cache = discache_full(maxsize=len(KEYS) * len(VALUE))
    before = cache.stats().get("evictions_size", 0)
    set_batch, calls = evicting_sets(cache)
    benchmark(set_batch)
    assert cache.currsize <= cache.maxsize and len(cache) <= len(KEYS)
    # recorded, not asserted: the cache of today does not evict in LRU order (issue 10)
    evictions = cache.stats().get("evictions_size", 0) - before
    benchmark.extra_info["evictions_per_set"] = evictions / (calls[0] * len(KEYS))
    cache.close()


def bench_cachetools_set_evict(benchmark):
    mark(benchmark, "set of a new key with eviction, 4 KiB value", "cache-set-evict", BASELINE,
         ops=len(KEYS))
    cache = cachetools_full()
    set_batch, calls = evicting_sets(cache)
    benchmark(set_batch)
    last = KEYS if calls[0] % 2 == 0 else [f"image-{i}" for i in range(1000, 2000)]
    assert sorted(cache) == sorted(last), "every set evicted the least recently used"


# ---------------------------------------------------------------- memoized function


def bench_discache_cached(benchmark):
    mark(benchmark, "cached function hit, 4 KiB value", "cache-cached-hit",
         "discache.cached[madvfree]", "cachetools.cached(LRUCache)", 1.5, backend="madvfree")
    cache = DiscardableCache(MANAGER_LIMIT,
                             manager=DiscardableMemoryManager(MANAGER_LIMIT, "madvfree"))

    @discache.cached(cache)
    def load(key):
        return VALUE

    for key in KEYS:
        load(key)
    assert benchmark(load, HOT) == VALUE
    cache.close()


def bench_cachetools_cached(benchmark):
    mark(benchmark, "cached function hit, 4 KiB value", "cache-cached-hit",
         "cachetools.cached(LRUCache)")

    @cachetools.cached(cachetools.LRUCache(maxsize=len(KEYS)))
    def load(key):
        return VALUE

    for key in KEYS:
        load(key)
    assert benchmark(load, HOT) == VALUE


# ---------------------------------------------------------------- scale: 1M entries against 1k


def working_set(entries: int) -> list[str]:
    """WORKING_SET keys of a cache of `entries`, drawn at random, in random order."""
    return [f"k{i}" for i in random.Random(entries).sample(range(entries), WORKING_SET)]


def filled_small(wanted: int) -> DiscardableCache:
    """A cache of `wanted` values of 100 B under keys k0, k1..., filled a decade at a time.

    Before each decade past 10,000 the cost so far predicts the next: when it would allocate
    more than SCALE_BUDGET of discardable memory, the cache stops where it is."""
    manager = DiscardableMemoryManager(2 * SCALE_BUDGET, "madvfree")
    cache = DiscardableCache(wanted * len(SMALL_VALUE), manager=manager)
    filled = 0
    while filled < wanted:
        target = min(wanted, max(10 * filled, 10_000))
        per_entry = manager.stats()["allocated_bytes"] / filled if filled else 0
        if per_entry * target > SCALE_BUDGET:
            warnings.warn(f"{target:,} entries of 100 B would allocate "
                          f"{per_entry * target / (1 << 30):.1f} GiB of discardable memory "
                          f"({per_entry:.0f} B each): the large cache has {filled:,}")
            break
        for i in range(filled, target):
            cache[f"k{i}"] = SMALL_VALUE
        filled = target
    return cache


@pytest.fixture(scope="module")
def scale_caches():
    """{entries: (cache, working set)} for 1,000 entries and for the large cache, built once.

    The large cache has 1,000,000 entries (100,000 in quick mode), fewer if that many would
    allocate more than SCALE_BUDGET of discardable memory (today's cache: a page per value)."""
    small = filled_small(WORKING_SET)
    large = filled_small(QUICK_LARGE_ENTRIES if quick() else LARGE_ENTRIES)
    # Every entry idle now, in both: the unlocking of a million entries then falls in no
    # measurement (the idle timer would do it during one), and the working set is locked again
    # by the warmup in both caches alike.
    small.sweep(idle=0)
    large.sweep(idle=0)
    yield {len(small): (small, working_set(len(small))),
           len(large): (large, working_set(len(large)))}
    large.close()
    small.close()


def get_batch(get, keys: list[str]):
    """One get(key) of each working-set key, the loop in C so that the gets dominate."""
    return lambda: deque(map(get, keys), 0)


def scale_impl(entries: int) -> str:
    return f"DiscardableCache[madvfree], {entries:,} entries"


def scale_op(keys_in_use: int) -> str:
    return "cache-hit-scale-hot" if keys_in_use == HOT_SET else "cache-hit-scale"


def scale_group(keys_in_use: int) -> str:
    return f"get hit among N entries, 100 B values, {keys_in_use} keys in use"


@pytest.mark.parametrize("keys_in_use", [HOT_SET, WORKING_SET])
def bench_discache_get_among_1k(benchmark, scale_caches, keys_in_use):
    """A get hit cycling through keys of a cache of 1000 values of 100 B."""
    mark(benchmark, scale_group(keys_in_use), scale_op(keys_in_use),
         scale_impl(WORKING_SET), BASELINE, backend="madvfree", ops=keys_in_use,
         entries=WORKING_SET, nbytes=len(SMALL_VALUE))
    cache, keys = scale_caches[WORKING_SET]
    keys = keys[:keys_in_use]
    benchmark(get_batch(cache.get, keys))
    assert all(cache.get(key) == SMALL_VALUE for key in keys)


@pytest.mark.parametrize("keys_in_use", [HOT_SET, WORKING_SET])
def bench_discache_get_among_1m(benchmark, scale_caches, keys_in_use):
    """The same number of random keys in use, in a cache of 1,000,000 values of 100 B; the
    target holds for the hot working set (see the module's docstring)."""
    entries = max(scale_caches)
    target = 1.5 if entries == LARGE_ENTRIES and keys_in_use == HOT_SET else None
    mark(benchmark, scale_group(keys_in_use), scale_op(keys_in_use),
         scale_impl(entries), scale_impl(WORKING_SET), target, backend="madvfree",
         ops=keys_in_use, entries=entries, nbytes=len(SMALL_VALUE))
    cache, keys = scale_caches[entries]
    keys = keys[:keys_in_use]
    benchmark(get_batch(cache.get, keys))
    assert all(cache.get(key) == SMALL_VALUE for key in keys)


@pytest.mark.parametrize("keys_in_use", [HOT_SET, WORKING_SET])
def bench_cachetools_get_among_1k(benchmark, keys_in_use):
    """The 1,000-entry row's baseline: LRUCache.__getitem__, as for the 4 KiB hit."""
    mark(benchmark, scale_group(keys_in_use), scale_op(keys_in_use), BASELINE,
         ops=keys_in_use, entries=WORKING_SET, nbytes=len(SMALL_VALUE))
    cache = cachetools.LRUCache(maxsize=WORKING_SET)
    for i in range(WORKING_SET):
        cache[f"k{i}"] = SMALL_VALUE
    keys = working_set(WORKING_SET)[:keys_in_use]
    benchmark(get_batch(cache.__getitem__, keys))
    assert all(cache.get(key) == SMALL_VALUE for key in keys)


@pytest.fixture(scope="module")
def scale_dicts(scale_caches):
    """{entries: (dict, working set)} of the scale caches' sizes: the memory hierarchy's share."""
    return {entries: ({f"k{i}": SMALL_VALUE for i in range(entries)}, keys)
            for entries, (_, keys) in scale_caches.items()}


@pytest.mark.parametrize("size", ["1k", "large"])
def bench_dict_get_among_n(benchmark, scale_dicts, size):
    """A control, no target: a plain dict's get slows down at 1M entries too (caches, TLB)."""
    small, large = sorted(scale_dicts)
    entries = small if size == "1k" else large
    mark(benchmark, scale_group(WORKING_SET), "cache-hit-scale",
         f"dict, {entries:,} entries", f"dict, {small:,} entries" if size == "large" else None,
         ops=WORKING_SET, entries=entries, nbytes=len(SMALL_VALUE))
    table, keys = scale_dicts[entries]
    benchmark(get_batch(table.get, keys))
    assert all(table.get(key) is SMALL_VALUE for key in keys)


# ---------------------------------------------------------------- the first hit on an idle entry


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_discache_get_after_idle_unlock(benchmark, backend):
    """The first hit on an entry that went idle: it is locked again (cookie check or flag)."""
    benchmark.group = "get hit on an idle (unlocked) entry"
    benchmark.extra_info.update(op="cache-relock", impl=f"DiscardableCache[{backend}]",
                                backend=backend, nbytes=len(VALUE), baseline=BASELINE,
                                baseline_op="cache-hit")
    cache = DiscardableCache(MANAGER_LIMIT,
                             manager=DiscardableMemoryManager(MANAGER_LIMIT, backend))
    cache["k"] = VALUE

    def setup():
        cache.sweep(idle=0)  # sweep(idle=0) unlocks every unpinned entry now: the idle state

    assert benchmark.pedantic(cache.get, args=("k",), setup=setup, rounds=2000) == VALUE
    cache.close()
