"""Cache hits of the baselines a DiscardableCache is compared against, by value size.

Run: python -m pytest bench/bench_cache.py
extra_info: op="cache hit", cache=<implementation>, pages=<value size in pages>; `discache bench`
puts every `cache` in one table, with the ratio to cachetools.LRUCache at the same pages. A
DiscardableCache benchmark joins the table with the same keys
(cache="discache.DiscardableCache").
"""
from __future__ import annotations

import functools
import mmap

import cachetools
import pytest

PAGE = mmap.PAGESIZE
PAGES = [1, 16, 256]
KEYS = 64  # a few entries, so a hit is a lookup among several, not the only key


def values(pages):
    return {key: bytes([key]) * (pages * PAGE) for key in range(KEYS)}


@pytest.mark.parametrize("pages", PAGES)
def bench_cachetools_lru_hit(benchmark, pages):
    """cachetools.LRUCache.__getitem__ of a present key (moves it to the front)."""
    cache = cachetools.LRUCache(maxsize=KEYS)
    cache.update(values(pages))
    benchmark.extra_info.update(op="cache hit", cache="cachetools.LRUCache", pages=pages)
    assert len(benchmark(cache.__getitem__, KEYS // 2)) == pages * PAGE


@pytest.mark.parametrize("pages", PAGES)
def bench_functools_lru_cache_hit(benchmark, pages):
    """A call of an functools.lru_cache-wrapped function whose result is cached."""
    stored = values(pages)

    @functools.lru_cache(maxsize=KEYS)
    def load(key):
        return stored[key]

    for key in stored:
        load(key)
    benchmark.extra_info.update(op="cache hit", cache="functools.lru_cache", pages=pages)
    assert len(benchmark(load, KEYS // 2)) == pages * PAGE
    assert load.cache_info().misses == KEYS
