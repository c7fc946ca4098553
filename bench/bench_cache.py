"""The cache hit path: DiscardableCache.get of a 4 KiB value beside cachetools and lru_cache."""
import functools

import cachetools
import pytest

from discache.cache import DiscardableCache
from discache.manager import DiscardableMemoryManager

VALUE = bytes(range(256)) * 16  # 4 KiB
KEYS = [f"image-{i}" for i in range(1000)]


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_discache_get(benchmark, backend):
    benchmark.group = "cache hit, 4 KiB value"
    benchmark.extra_info.update(op="cache-hit", impl=f"DiscardableCache[{backend}]",
                                backend=backend, nbytes=len(VALUE))
    cache = DiscardableCache(64 << 20, manager=DiscardableMemoryManager(64 << 20, backend))
    for key in KEYS:
        cache[key] = VALUE
    get = cache.get
    assert benchmark(get, "image-500") == VALUE


def bench_cachetools_lru_get(benchmark):
    benchmark.group = "cache hit, 4 KiB value"
    benchmark.extra_info.update(op="cache-hit", impl="cachetools.LRUCache", nbytes=len(VALUE))
    cache = cachetools.LRUCache(maxsize=len(KEYS))
    for key in KEYS:
        cache[key] = VALUE
    assert benchmark(cache.__getitem__, "image-500") == VALUE


def bench_functools_lru_cache(benchmark):
    benchmark.group = "cache hit, 4 KiB value"
    benchmark.extra_info.update(op="cache-hit", impl="functools.lru_cache", nbytes=len(VALUE))

    @functools.lru_cache(maxsize=len(KEYS))
    def load(key):
        return VALUE

    load("image-500")
    assert benchmark(load, "image-500") == VALUE


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_discache_get_after_idle_unlock(benchmark, backend):
    """The first hit on an entry that went idle: it is locked again (cookie check or flag)."""
    benchmark.group = "cache hit on an idle (unlocked) entry"
    benchmark.extra_info.update(op="cache-relock", impl=f"DiscardableCache[{backend}]",
                                backend=backend, nbytes=len(VALUE))
    cache = DiscardableCache(64 << 20, manager=DiscardableMemoryManager(64 << 20, backend))
    cache["k"] = VALUE

    def setup():
        cache.sweep(idle=0)

    assert benchmark.pedantic(cache.get, args=("k",), setup=setup, rounds=2000) == VALUE
