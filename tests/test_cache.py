"""DiscardableCache on the real kernel: mapping behaviour, purges, verify, pins, threads."""
import functools
import threading

import mmh3
import pytest

from discache import PinnedError, _core, force_reclaim
from discache.cache import DiscardableCache, cached
from discache.manager import PAGE, DiscardableMemoryManager

BACKENDS = ["madvfree", "memfd", "simulated"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def make(backend, maxsize=1 << 20, **kwargs):
    kwargs.setdefault("manager", DiscardableMemoryManager(64 << 20, backend))
    return DiscardableCache(maxsize, backend, **kwargs)


def value(i, size=PAGE):
    return bytes([i % 251]) * size


def test_a_mapping_of_bytes(backend):
    cache = make(backend)
    cache["a"] = b"alpha"
    cache[b"b"] = bytearray(b"beta")
    cache[("t", 1)] = memoryview(b"tuple key")
    cache["empty"] = b""
    assert cache["a"] == b"alpha" and cache.get(b"b") == b"beta"
    assert cache[("t", 1)] == b"tuple key" and cache["empty"] == b""
    assert cache.get("missing") is None and cache.get("missing", 5) == 5
    with pytest.raises(KeyError):
        cache["missing"]
    assert len(cache) == 4 and set(cache) == {"a", b"b", ("t", 1), "empty"}
    assert cache.currsize == 5 + 4 + 9
    cache["a"] = b"ALPHA!"
    assert cache["a"] == b"ALPHA!" and cache.currsize == 6 + 4 + 9
    del cache["a"]
    assert "a" not in cache and cache.currsize == 13


def test_keys_are_sharded_by_mmh3():
    cache = make("madvfree", shards=8)
    for key in ("k1", "hello", "é", b"raw"):
        cache[key] = b"x"
        shard = cache._shards[(mmh3.hash(key) & 0xFFFFFFFF) & 7]
        assert key in shard.entries


def test_size_eviction_is_least_recently_used_first(backend):
    events = []
    cache = make(backend, maxsize=4 * 100, shards=1,
                 on_evict=lambda key, reason: events.append((key, reason)))
    for i in range(4):
        cache[i] = value(i, 100)
    cache.get(0)  # 0 becomes the most recently used: 1 is now the oldest
    cache[4] = value(4, 100)
    cache[5] = value(5, 150)
    assert events == [(1, "size"), (2, "size"), (3, "size")]
    assert set(cache) == {0, 4, 5} and cache.currsize == 350
    with pytest.raises(ValueError, match="too large"):
        cache["huge"] = b"x" * 401


def test_getsizeof_counts_what_the_user_says(backend):
    cache = make(backend, maxsize=10, getsizeof=lambda v: 1)
    for i in range(12):
        cache[i] = value(i, 1000)
    assert len(cache) == 10 and cache.currsize == 10


def test_idle_entries_are_unlocked_in_batches_and_relocked_on_use(backend):
    cache = make(backend, idle_unlock=0.5)
    for i in range(8):
        cache[i] = value(i)
    assert cache.sweep() == 0, "just used: a second chance first"
    assert cache.sweep() == 8
    assert cache.stats()["locked_entries"] == 0
    assert all(cache[i] == value(i) for i in range(8))
    assert cache.stats()["locked_entries"] == 8


def test_reclaimed_entries_are_reported_and_never_returned(backend):
    events = []
    cache = make(backend, on_evict=lambda key, reason: events.append((key, reason)))
    for i in range(6):
        cache[i] = value(i)
    cache.pin(5)
    pages = force_reclaim(cache)  # one page an entry; a page the kernel keeps is not counted
    assert 3 <= pages <= 5, "the unpinned entries were unlocked and (nearly all) reclaimed"
    got = [cache.get(i) for i in range(5)]
    lost = [i for i in range(5) if got[i] is None]
    assert len(lost) == pages, "exactly the reclaimed entries are reported"
    assert all(got[i] == value(i) for i in range(5) if i not in lost), "the rest are intact"
    assert cache[5] == value(5), "a pinned entry is never reclaimed"
    assert sorted(events) == [(i, "purged") for i in lost]
    stats = cache.stats()
    assert stats["purges_detected"] == stats["evictions_purged"] == pages
    assert stats["entries"] == 6 - pages and cache.currsize == (6 - pages) * PAGE


def test_get_or_create_regenerates_after_a_purge(backend):
    cache = make(backend)
    calls = []

    def factory():
        calls.append(1)
        return b"rendered"

    assert cache.get_or_create("page", factory) == b"rendered"
    assert cache.get_or_create("page", factory) == b"rendered" and len(calls) == 1
    cache.sweep(idle=0)
    cache.manager.release_free_memory()  # a policy purge: deterministic, unlike the kernel's
    assert cache.get_or_create("page", factory) == b"rendered" and len(calls) == 2
    assert cache.stats()["regenerations"] == 1


def test_verify_catches_a_partially_zeroed_entry(backend):
    cache = make(backend, verify=True)
    cache["img"] = bytes(range(256)) * 64  # 4 pages
    cache.sweep(idle=0)
    entry = cache._shards[0].entries.get("img") or next(
        s.entries["img"] for s in cache._shards if "img" in s.entries)
    # Zero half of one page behind the cache's back, cookie left intact: only a checksum sees it.
    mem = entry.mem
    segment = mem._segment
    start = mem.offset + PAGE + 2048
    if backend == "simulated":
        segment.process.write(segment.addr + start, bytes(1024))
    else:
        with memoryview(segment) as raw:
            raw[start:start + 1024] = bytes(1024)
    assert cache.get("img") is None
    assert cache.stats()["purges_detected"] == 1


def test_view_is_zero_copy_and_pins(backend):
    cache = make(backend)
    cache["k"] = b"0123456789"
    with cache.view("k") as mv:
        assert mv.readonly and bytes(mv) == b"0123456789"
        assert cache.sweep(idle=0) == 0, "a viewed entry stays locked"
        assert force_reclaim(cache) == 0
    assert cache.sweep(idle=0) == 1
    with pytest.raises(KeyError):
        with cache.view("nope"):
            pass


def test_get_or_create_keeps_a_value_stored_and_pinned_meanwhile(backend):
    cache = make(backend)

    def factory():  # another thread stores the key and views it while this one creates
        cache["k"] = b"theirs"
        cache.pin("k")
        return b"mine"

    assert cache.get_or_create("k", factory) == b"mine"
    assert cache["k"] == b"theirs"
    cache.unpin("k")


def test_a_view_is_a_use_for_the_lru_order(backend):
    events = []
    cache = make(backend, maxsize=300, shards=1,
                 on_evict=lambda key, reason: events.append((key, reason)))
    for key in "abc":
        cache[key] = value(1, 100)
    with cache.view("a"):
        pass
    cache["d"] = value(2, 100)
    assert events == [("b", "size")]


def test_pin_and_unpin(backend):
    cache = make(backend, maxsize=200, shards=1)
    cache["a"] = value(1, 100)
    cache.pin("a")
    cache["b"] = value(2, 100)
    cache["c"] = value(3, 100)  # over: "a" is pinned, so "b" goes
    assert set(cache) == {"a", "c"}
    cache.unpin("a")
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin("a")
    with pytest.raises(KeyError):
        cache.pin("b")


def test_a_pinned_entry_is_neither_deleted_nor_replaced(backend):
    """Deleting or replacing a viewed entry used to free memory a view still pointed to and
    leave currsize and the manager's accounting wrong."""
    events = []
    cache = make(backend, on_evict=lambda key, reason: events.append((key, reason)))
    cache["k"] = b"kept"
    allocated = cache.manager.stats()["allocated_bytes"]
    with cache.view("k") as mv:
        with pytest.raises(PinnedError, match="pinned"):
            del cache["k"]
        with pytest.raises(PinnedError, match="pinned"):
            cache["k"] = b"new value"
        cache.clear()  # keeps the pinned entry
        assert bytes(mv) == b"kept"
    assert cache["k"] == b"kept" and cache.currsize == 4 and events == []
    assert cache.manager.stats()["allocated_bytes"] == allocated
    cache["k"] = b"new value"
    del cache["k"]
    assert events == [("k", "explicit")] and cache.currsize == 0


def test_cached_decorator(backend):
    cache = make(backend)
    calls = []

    @cached(cache, key=lambda n: f"sq{n}")
    def square(n):
        calls.append(n)
        return str(n * n).encode()

    assert [square(3), square(3), square(4)] == [b"9", b"9", b"16"]
    assert calls == [3, 4]
    info = square.cache_info()
    assert (info.hits, info.misses, info.maxsize) == (1, 2, cache.maxsize)
    assert info.currsize == cache.currsize == 3
    cache.sweep(idle=0)
    cache.manager.release_free_memory()
    assert square(3) == b"9" and calls == [3, 4, 3]
    square.cache_clear()
    assert len(cache) == 0 and square.cache_info().hits == 0


def test_manager_is_shared_by_default_and_limits_apply(backend):
    manager = DiscardableMemoryManager(8 * PAGE, backend, segment_bytes=8 * PAGE)
    a = DiscardableCache(1 << 20, manager=manager)
    b = DiscardableCache(1 << 20, manager=manager)
    assert a.manager is b.manager is manager
    for i in range(6):
        a[i] = value(i)
    a.sweep(idle=0)
    for i in range(6):
        b[i] = value(i)  # over the manager's limit: a's unlocked entries are purged
    assert manager.bytes_resident <= manager.limit
    assert sum(a.get(i) is None for i in range(6)) >= 4
    assert all(b[i] == value(i) for i in range(6))
    with pytest.raises(ValueError, match="differs"):
        DiscardableCache(10, "memfd" if backend == "madvfree" else "madvfree", manager=manager)


def test_eight_threads_hammer_one_cache(backend):
    cache = make(backend, maxsize=64 * PAGE, idle_unlock=0)
    errors = []
    barrier = threading.Barrier(8)

    def work(seed):
        try:
            barrier.wait()
            for i in range(400):
                key = (seed * 7 + i) % 96
                if i % 3 == 0:
                    cache[key] = value(key)
                got = cache.get(key)
                assert got is None or got == value(key), key
                if i % 50 == 0:
                    cache.sweep(idle=0)
                if i % 97 == 0:
                    force_reclaim(cache)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.currsize <= cache.maxsize
    weights = sum(e.weight for shard in cache._shards for e in shard.entries.values())
    assert cache.currsize == weights
    for key in list(cache):
        got = cache.get(key)
        assert got is None or got == value(key)


def test_bad_arguments():
    for kwargs, error in (
        (dict(maxsize=0), ValueError),
        (dict(maxsize=10, shards=3), ValueError),
        (dict(maxsize=10, idle_unlock=-1), ValueError),
        (dict(maxsize=10, on_evict=5), TypeError),
    ):
        with pytest.raises(error):
            DiscardableCache(**kwargs)
    cache = make("madvfree")
    with pytest.raises(TypeError):
        cache["k"] = 12345  # not a buffer
    with pytest.raises(TypeError):
        cache[["unhashable"]] = b"x"
    assert len(cache) == 0 and cache.currsize == 0


def test_metrics_snapshot_follows_the_cache(backend):
    cache = make(backend)
    for i in range(4):
        cache[i] = value(i)
    cache.get(0)
    cache.get("missing")
    cache.sweep(idle=0)
    cache.manager.release_free_memory()
    cache.get(1)  # purged by the policy: reported
    cache.get_or_create(1, lambda: value(1))
    snap = cache.metrics_snapshot()
    assert snap["hits"] == 1 and snap["misses"] == 3  # "missing", the purged 1, the regeneration
    assert snap["locks"] == {"success": 0, "purged": 1, "failed": 0}
    assert snap["purged_bytes"] == PAGE and snap["regenerations"] == 1
    assert snap["evictions"]["purged"] == 1
    assert snap["allocated_bytes"] == 4 * PAGE
    assert snap["locked_bytes"] == PAGE and snap["unlocked_bytes"] == 3 * PAGE
    manager = cache.manager.metrics_snapshot()
    assert manager["purged_bytes"] == 4 * PAGE
    assert manager["locks"]["purged"] == 1
