"""discache.SharedCache: one cache in /dev/shm for every process, with real processes (no mocks)."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import discache
from discache import PinnedError, SharedCache
from discache.sharedcache import shm_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def name():
    """A fresh cache name, its file removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        SharedCache.unlink(name)
    except FileNotFoundError:
        pass


def run_peer(code: str, *args: str, timeout: float = 30) -> str:
    """Run code in an unrelated interpreter (this tree's discache); its stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def file_bytes(name: str) -> int:
    """Bytes of memory the cache's file holds in /dev/shm (its blocks, holes excluded)."""
    return os.stat(shm_path(name)).st_blocks * 512


# ---------------------------------------------------------------- the mapping


def test_mapping_operations(name):
    with SharedCache(name, 1 << 20) as cache:
        cache["a"] = b"str key"
        cache[b"a"] = bytearray(b"bytes key")  # another key: str and bytes never collide
        cache["long-" * 40] = memoryview(b"x" * 5000)  # a key too long to inline
        cache["empty"] = b""
        assert cache["a"] == b"str key" and cache[b"a"] == b"bytes key"
        assert cache.get("long-" * 40) == b"x" * 5000 and cache["empty"] == b""
        assert type(cache["a"]) is bytes
        assert len(cache) == 4 and "a" in cache and "b" not in cache and 3 not in cache
        assert sorted(cache, key=repr) == sorted(["a", b"a", "long-" * 40, "empty"], key=repr)
        cache["a"] = b"replaced"
        assert cache["a"] == b"replaced" and len(cache) == 4
        assert cache.pop("a") == b"replaced" and cache.pop("a", None) is None
        with pytest.raises(KeyError):
            cache.pop("a")
        del cache[b"a"]
        with pytest.raises(KeyError):
            del cache[b"a"]
        with pytest.raises(KeyError):
            cache["missing"]
        assert cache.get("missing", b"default") == b"default"
        calls = []
        assert cache.get_or_create("made", lambda: calls.append(1) or b"made") == b"made"
        assert cache.get_or_create("made", lambda: calls.append(1) or b"again") == b"made"
        assert calls == [1]
        cache.clear()
        assert len(cache) == 0 and list(cache) == [] and cache.get("made") is None
        assert cache.stats()["allocated_bytes"] == 0


def test_values_of_every_size_round_trip(name):
    with SharedCache(name, 4 << 20) as cache:
        sizes = [0, 1, 63, 64, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, 1 << 20]
        for n in sizes:
            cache[f"v{n}"] = bytes((i * 7 + n) % 251 for i in range(n))
        for n in sizes:
            assert cache[f"v{n}"] == bytes((i * 7 + n) % 251 for i in range(n))
        assert cache.stats()["allocated_bytes"] == sum(-(-n // PAGE) * PAGE for n in sizes)


def test_lru_byte_limit_purges_the_least_recently_used(name):
    with SharedCache(name, 8 * PAGE) as cache:
        for i in range(8):
            cache[f"k{i}"] = bytes([i]) * PAGE
        time.sleep(0.003)  # hits refresh an entry's time at most once a millisecond
        assert cache["k0"] == bytes([0]) * PAGE  # k0 is now the most recent
        time.sleep(0.003)
        cache["k8"] = b"\x08" * PAGE
        assert cache.get("k1") is None  # the least recently used went
        assert cache["k0"] == bytes([0]) * PAGE and cache["k8"] == b"\x08" * PAGE
        stats = cache.stats()
        assert stats["evictions_size"] == 1 and stats["allocated_bytes"] == 8 * PAGE
        assert stats["purges_detected"] == 1  # the miss on k1 was a purge, and said so
        cache["big"] = b"b" * (5 * PAGE)  # needs 5 pages: the 5 oldest go
        assert len(cache) == 4 and stats["evictions_size"] + 5 == cache.stats()["evictions_size"]
        with pytest.raises(ValueError, match="value too large"):
            cache["huge"] = b"h" * (8 * PAGE + 1)
        assert cache["big"] == b"b" * (5 * PAGE)


# ---------------------------------------------------------------- sharing between processes


def test_unrelated_processes_share_entries_and_memory_is_counted_once(name):
    value = os.urandom(256 << 10)
    with SharedCache(name, 8 << 20) as cache:
        cache["image"] = value
        before = file_bytes(name)
        peer = """
            import sys, hashlib
            from discache import SharedCache
            cache = SharedCache(sys.argv[1], 8 << 20, create=False)
            print(hashlib.sha256(cache["image"]).hexdigest())
            cache["from-peer-" + sys.argv[2]] = sys.argv[2].encode() * 1000
            print(cache.stats()["counter_slot"])
        """
        outs = [run_peer(peer, name, str(i)).split() for i in range(3)]
        import hashlib

        assert {out[0] for out in outs} == {hashlib.sha256(value).hexdigest()}
        for i in range(3):
            assert cache[f"from-peer-{i}"] == str(i).encode() * 1000
        # three readers of 256 KiB added no copy: the file holds what the four entries take
        grown = file_bytes(name) - before
        assert grown == 3 * PAGE, grown
        stats = cache.stats()
        assert stats["host_hits"] >= 3 and stats["hits"] == 3
        assert stats["allocated_bytes"] == (256 << 10) + 3 * PAGE


def _forked_worker(name: str, index: int, queue) -> None:
    cache = SharedCache(name, 4 << 20, create=False)
    cache[f"w{index}"] = bytes([index]) * 10000
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(cache.get(f"w{i}") is None for i in range(4)):
        time.sleep(0.005)
    queue.put((index, [cache.get(f"w{i}") == bytes([i]) * 10000 for i in range(4)],
               cache["parent"]))


def test_forked_workers_share_entries(name):
    cache = SharedCache(name, 4 << 20)
    cache["parent"] = b"made before the fork"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_forked_worker, args=(name, i, queue)) for i in range(4)]
    for w in workers:
        w.start()
    results = sorted(queue.get(timeout=20) for _ in workers)
    for w in workers:
        w.join(10)
        assert w.exitcode == 0
    assert results == [(i, [True] * 4, b"made before the fork") for i in range(4)]
    assert len(cache) == 5
    cache.close()


def test_a_fork_child_uses_the_inherited_instance(name):
    cache = SharedCache(name, 1 << 20)
    cache["before"] = b"1"
    parent_slot = cache.stats()["counter_slot"]
    pid = os.fork()
    if pid == 0:  # the child: its own lock description and counter slot, same entries
        try:
            ok = (cache["before"] == b"1" and cache.stats()["counter_slot"] != parent_slot
                  and cache.stats()["hits"] == 1)
            cache["child"] = b"2"
            del cache["before"]
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache["child"] == b"2" and cache.get("before") is None
    cache["parent-after"] = b"3"  # the child's death released nothing of ours: writes go on
    assert cache.stats()["hits"] == 1  # the child's hits are not this process's


def test_every_process_sees_a_purge_exactly(name):
    value = bytes(range(256)) * 64
    with SharedCache(name, 4 << 20, verify=True) as cache:
        for i in range(20):
            cache[f"k{i}"] = value
        peer = """
            import sys
            from discache import SharedCache
            cache = SharedCache(sys.argv[1], 4 << 20, create=False, verify=True)
            got = [cache.get(f"k{i}") for i in range(20)]
            print(sum(v is None for v in got), sum(v is not None and v != bytes(range(256)) * 64
                                                   for v in got), cache.stats()["purges_detected"],
                  cache.stats()["checksum_failures"])
        """
        assert run_peer(peer, name).split() == ["0", "0", "0", "0"]
        purged = run_peer("""
            import sys, discache
            cache = discache.SharedCache(sys.argv[1], 4 << 20, create=False)
            print(discache.force_reclaim(cache))
        """, name)
        assert int(purged) == 20 * 4  # pages
        # every process, this one too, misses every entry and counts a purge, never old bytes
        assert run_peer(peer, name).split() == ["20", "0", "20", "0"]
        assert all(cache.get(f"k{i}") is None for i in range(20))
        stats = cache.stats()
        assert stats["purges_detected"] == 20 and stats["purged_bytes"] == 20 * 4 * PAGE
        assert stats["allocated_bytes"] == 0 and stats["evictions_purged"] == 20
        assert file_bytes(name) < stats["file_bytes"] - stats["data_pages"] * PAGE + PAGE
        cache["k0"] = b"new"
        assert cache["k0"] == b"new"  # a set after a purge stores anew


def test_views_pin_entries_against_purges_of_any_process(name):
    with SharedCache(name, 1 << 20) as cache:
        cache["pinned"] = b"p" * 10000
        cache["free"] = b"f" * 10000
        with cache.view("pinned") as mv:
            assert mv.readonly and bytes(mv[:3]) == b"ppp" and len(mv) == 10000
            out = run_peer("""
                import sys, discache
                from discache import PinnedError
                cache = discache.SharedCache(sys.argv[1], 1 << 20, create=False)
                print(discache.force_reclaim(cache), cache.get("pinned") is not None)
                try:
                    del cache["pinned"]
                except PinnedError:
                    print("refused")
            """, name)
            assert out.split() == ["3", "True", "refused"]  # only "free"'s 3 pages went
            assert bytes(mv) == b"p" * 10000
            assert cache.stats()["locked_bytes"] == 3 * PAGE
            with pytest.raises(BufferError):
                cache.close()  # a view is alive
        assert cache.get("free") is None
        assert discache.force_reclaim(cache) == 3  # the view ended: now it goes
        assert cache.get("pinned") is None
        with pytest.raises(KeyError):
            with cache.view("pinned"):
                pass


def test_memory_pressure_purges_idle_entries_then_all(name):
    with SharedCache(name, 1 << 20, idle_unlock=0.2) as cache:
        cache["old"] = b"o" * 100
        time.sleep(0.3)
        cache["new"] = b"n" * 100
        stats = cache.stats()
        assert stats["unlocked_bytes"] == PAGE and stats["locked_bytes"] == PAGE
        assert cache.on_memory_pressure("moderate") == PAGE
        assert cache.get("old") is None and cache["new"] == b"n" * 100
        assert cache.on_memory_pressure("critical") == PAGE and cache.get("new") is None
        snap = cache.metrics_snapshot()
        assert snap["pressure_events"] == {"moderate": 1, "critical": 1}
        with pytest.raises(ValueError):
            cache.on_memory_pressure("low")


def test_prometheus_metrics_are_host_wide(name):
    from prometheus_client import CollectorRegistry

    from discache.metrics import DiscacheCollector

    with SharedCache(name, 1 << 20) as cache:
        cache["a"] = b"a" * 5000
        run_peer("""
            import sys, discache
            cache = discache.SharedCache(sys.argv[1], 1 << 20, create=False)
            cache.get("a"); cache.get("a"); cache.get("nope")
        """, name)
        registry = CollectorRegistry()
        DiscacheCollector(registry).watch(cache, "thumbs")
        labels = {"name": "thumbs", "layer": "shared"}
        assert registry.get_sample_value("discache_cache_hits_total", labels) == 2
        assert registry.get_sample_value("discache_cache_misses_total", labels) == 1
        assert registry.get_sample_value("discache_allocated_bytes", labels) == 2 * PAGE


# ---------------------------------------------------------------- misuse


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "/etc/passwd", "x" * 201, "a b",
                                 "é", "a\0b"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError, match="bad SharedCache name"):
        SharedCache(bad, 1 << 20)


def test_bad_arguments_are_refused_and_change_nothing(name):
    with pytest.raises(TypeError):
        SharedCache(b"bytes-name", 1 << 20)
    for maxsize, error in [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                           (True, TypeError), (1 << 50, ValueError), ("1", TypeError)]:
        with pytest.raises(error):
            SharedCache(name, maxsize)
    for idle, error in [(float("nan"), ValueError), (float("inf"), ValueError), (-1, ValueError),
                        ("1", TypeError)]:
        with pytest.raises(error):
            SharedCache(name, 1 << 20, idle_unlock=idle)
    assert not os.path.exists(shm_path(name))
    with SharedCache(name, 1 << 20) as cache:
        cache["k"] = b"v"
        for key in [1, 1.5, None, ("t",), bytearray(b"k")]:
            with pytest.raises(TypeError):
                cache[key] = b"v"
            with pytest.raises(TypeError):
                cache.get(key)
            assert key not in cache
        for value in ["text", 3, None, object(), [1]]:
            with pytest.raises(TypeError):
                cache["k"] = value
        with pytest.raises(BufferError):
            cache["k"] = memoryview(b"abcdef")[::2]  # not contiguous
        with pytest.raises(ValueError, match="key too long"):
            cache["x" * 70000] = b"v"
        with pytest.raises(UnicodeEncodeError):
            cache["\ud800"] = b"v"
        with pytest.raises(ValueError, match="value too large"):
            cache["k"] = b"v" * ((1 << 20) + 1)
        for older in [float("nan"), float("inf"), -1]:
            with pytest.raises(ValueError):
                cache.purge(older)
        assert cache["k"] == b"v" and len(cache) == 1
        with pytest.raises(TypeError):
            pickle.dumps(cache)


def test_attaching_with_another_maxsize_or_to_a_missing_cache(name):
    with pytest.raises(FileNotFoundError, match="create=True"):
        SharedCache(name, 1 << 20, create=False)
    with SharedCache(name, 1 << 20) as cache:
        cache["k"] = b"v"
        with pytest.raises(ValueError, match="maxsize=1048576, not 2097152"):
            SharedCache(name, 2 << 20)
        with pytest.raises(ValueError, match="idle_unlock"):
            SharedCache(name, 1 << 20, idle_unlock=5)
        with SharedCache(name, 1 << 20, create=False) as again:
            assert again["k"] == b"v"


def test_a_file_that_is_not_a_cache_is_refused(name):
    with open(shm_path(name), "wb") as f:
        f.write(b"not a cache" * 1000)
    with pytest.raises(ValueError, match="not a discache shared cache"):
        SharedCache(name, 1 << 20)
    os.unlink(shm_path(name))
    os.symlink("/etc/hostname", shm_path(name))
    with pytest.raises(OSError):
        SharedCache(name, 1 << 20)  # symlinks are not followed


def test_unlink_while_attached(name):
    cache = SharedCache(name, 1 << 20)
    cache["k"] = b"old"
    SharedCache.unlink(name)
    assert not os.path.exists(shm_path(name))
    cache["k2"] = b"still works"  # the attached process keeps its mapping
    assert cache["k"] == b"old" and cache["k2"] == b"still works"
    with SharedCache(name, 1 << 20) as fresh:  # a new open makes a new, empty cache
        assert fresh.get("k") is None and len(fresh) == 0
    cache.close()
    with pytest.raises(FileNotFoundError):
        SharedCache.unlink(name + "-never-made")


def test_use_after_close_and_close_twice(name):
    cache = SharedCache(name, 1 << 20)
    cache["k"] = b"v"
    cache.close()
    cache.close()
    assert cache.closed and "closed" in repr(cache)
    for call in (lambda: cache.get("k"), lambda: cache["k"], lambda: cache.__setitem__("k", b""),
                 lambda: len(cache), lambda: "k" in cache, lambda: cache.stats(),
                 lambda: cache.pop("k"), lambda: cache.clear(), lambda: cache.purge(),
                 lambda: discache.force_reclaim(cache), lambda: list(cache)):
        with pytest.raises(ValueError, match="closed"):
            call()
    with SharedCache(name, 1 << 20) as other:
        assert other["k"] == b"v"  # closing detaches; the entries stay


def test_watch_pressure_runs_until_close_and_a_fork_child_leaves_it_alone(name):
    cache = SharedCache(name, 1 << 20)
    monitor = cache.watch_pressure(source="meminfo", meminfo_interval=0.05)
    assert monitor.running
    with pytest.raises(RuntimeError, match="already watches"):
        cache.watch_pressure(source="meminfo")
    pid = os.fork()
    if pid == 0:  # the child's close must not stop the parent's thread through the shared pipe
        cache.close()
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.2)
    assert monitor.running and monitor.error is None
    cache.close()
    assert not monitor.running


def _versions_writer(name: str, published, stop) -> None:
    cache = SharedCache(name, 1 << 20, create=False)
    version = 0
    while not stop.value:
        version += 1
        cache["k"] = version.to_bytes(8, "little") * (1000 + version % 700)
        published.value = version  # after the set returned: every later get must see >= it
        if version % 50 == 0:
            cache.purge()
            published.value = -version  # purged: None is right, an older version is not


def _versions_reader(name: str, published, stop, result) -> None:
    cache = SharedCache(name, 1 << 20, create=False, verify=True)
    checked = 0
    while not stop.value:
        floor = published.value
        value = cache.get("k")
        if value is None:
            continue
        version = int.from_bytes(value[:8], "little")
        if value != version.to_bytes(8, "little") * (1000 + version % 700) or version < abs(floor):
            result.value = -1  # torn, zeroed or stale
            return
        checked += 1
    result.value = checked


def test_no_process_ever_reads_a_stale_or_torn_value(name):
    cache = SharedCache(name, 1 << 20)
    ctx = multiprocessing.get_context("fork")
    published, stop = ctx.Value("q", 0, lock=False), ctx.Value("b", 0, lock=False)
    results = [ctx.Value("q", 0, lock=False) for _ in range(2)]
    procs = [ctx.Process(target=_versions_writer, args=(name, published, stop))]
    procs += [ctx.Process(target=_versions_reader, args=(name, published, stop, r))
              for r in results]
    for p in procs:
        p.start()
    time.sleep(2.0)
    stop.value = 1
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert all(r.value > 100 for r in results), [r.value for r in results]
    assert published.value != 0 and cache.stats()["evictions_purged"] > 0
    cache.close()
