"""The misuse catalogue of docs/reliability.md: each misuse, and what discache does about it.
Tests are written once and run on every kind of DiscardableMemory where the misuse applies."""
from __future__ import annotations

import os

import pytest

import discache
from discache import (BackendUnavailableError, DiscardableCache, DiscardableMemoryManager,
                      DiscardableSharedMemory, LockResult, PageTable, _core, backends)
from discache.pressure import PressureMonitor
from discache.sim._sim import MAX_PAGES
from kernel_reclaim import reclaim

PAGE = _core.page_size()
AVAILABLE = {info.name: info for info in backends.available()}
KINDS = ["madvfree", "madvfree-sigbus", "memfd", "simulated", "ashmem",
         "manager-madvfree", "manager-memfd", "manager-simulated"]


def _param(kind: str):
    info = AVAILABLE[kind.removeprefix("manager-")]
    marks = () if info.available else pytest.mark.skip(
        reason=f"backend {info.name!r} does not run here: {info.reason}")
    return pytest.param(kind, id=kind, marks=marks)


@pytest.fixture(params=[_param(k) for k in KINDS])
def kind(request) -> str:
    return request.param


@pytest.fixture
def make(kind):
    """allocate() on the kind under test (a backend, or a manager on one); closes what it made."""
    made, managers = [], []

    def make(nbytes: int = 2 * PAGE):
        if kind.startswith("manager-"):
            if not managers:
                managers.append(DiscardableMemoryManager(1 << 22, kind.removeprefix("manager-")))
            mem = managers[0].allocate(nbytes)
        else:
            mem = discache.allocate(nbytes, kind)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        try:
            mem.close()
        except BufferError:
            pass


def filled(make, nbytes: int = 2 * PAGE):
    mem = make(nbytes)
    pattern = bytes(i % 251 + 1 for i in range(nbytes))
    mem.write(pattern)
    return mem, pattern


def state(mem):
    return mem.closed, mem.is_locked, (mem.read() if mem.is_locked else None)


# --- sizes and offsets ---


@pytest.mark.parametrize("nbytes,error", [(0, ValueError), (-1, ValueError),
                                          (1 << 60, ValueError), (2.5, TypeError),
                                          ("4096", TypeError), (None, TypeError)])
def test_bad_size(kind, nbytes, error):
    if kind.startswith("manager-"):
        manager = DiscardableMemoryManager(1 << 22, kind.removeprefix("manager-"))
        with pytest.raises(MemoryError if nbytes == 1 << 60 else error):
            manager.allocate(nbytes)
        assert manager.bytes_allocated == 0 and manager.segment_count == 0
    else:
        with pytest.raises(error):
            discache.allocate(nbytes, kind)


@pytest.mark.parametrize("offset,size", [(-1, 1), (0, 2 * PAGE + 1), (2 * PAGE, 1),
                                         (2 * PAGE + 1, -1)])
def test_read_write_outside_the_memory(make, offset, size):
    mem, pattern = filled(make)
    before = state(mem)
    with pytest.raises(ValueError, match="outside"):
        mem.read(offset, size)
    with pytest.raises(ValueError, match="outside"):
        mem.write(b"z" * max(size, 1), offset)
    if offset < 0 or offset > mem.nbytes:  # readinto copies what fits, from a valid offset
        with pytest.raises(ValueError, match="outside"):
            mem.readinto(bytearray(4), offset)
    assert state(mem) == before


@pytest.mark.parametrize("offset,size", [(1 << 70, 1), (0, 1 << 70)])
def test_offsets_beyond_a_machine_word(make, offset, size):
    mem, _ = filled(make)
    before = state(mem)
    with pytest.raises((OverflowError, ValueError)):
        mem.read(offset, size)
    with pytest.raises((OverflowError, ValueError)):
        mem.write(b"z", offset if offset > 1 else size)
    assert state(mem) == before


@pytest.mark.parametrize("value", [None, 5, "text", [1, 2], object()])
def test_write_of_something_that_is_not_a_buffer(make, value):
    mem, _ = filled(make)
    before = state(mem)
    with pytest.raises(TypeError):
        mem.write(value)
    assert state(mem) == before


def test_readinto_a_read_only_or_non_buffer(make):
    mem, _ = filled(make)
    before = state(mem)
    with pytest.raises((TypeError, BufferError)):
        mem.readinto(b"read-only bytes")
    with pytest.raises(TypeError):
        mem.readinto(None)
    assert state(mem) == before


def test_write_of_a_non_contiguous_buffer(make):
    mem, _ = filled(make)
    before = state(mem)
    with pytest.raises((TypeError, BufferError)):
        mem.write(memoryview(b"abcdefgh")[::2])
    assert state(mem) == before


# --- lock and unlock sequences ---


def test_double_unlock(make):
    mem, _ = filled(make)
    mem.unlock()
    with pytest.raises(RuntimeError, match="not locked"):
        mem.unlock()
    assert not mem.is_locked and not mem.closed


def test_double_lock(make):
    mem, pattern = filled(make)
    with pytest.raises(RuntimeError, match="already locked"):
        mem.lock()
    assert mem.is_locked and mem.read() == pattern


def test_access_while_unlocked(make, kind):
    mem, pattern = filled(make)
    mem.unlock()
    with pytest.raises(RuntimeError, match="unlocked"):
        mem.data
    if kind == "madvfree-sigbus":
        # SIGBUS mode reads unlocked memory: the data, or PurgedPageError for a purged page
        assert mem.read(0, 4) == pattern[:4]
        reclaim(mem)
        with pytest.raises(discache.PurgedPageError):
            mem.read(0, 4)
    else:
        with pytest.raises(RuntimeError, match="unlocked"):
            mem.read()
        with pytest.raises(RuntimeError, match="unlocked"):
            mem.write(b"x")
        with pytest.raises(RuntimeError, match="unlocked"):
            mem.readinto(bytearray(4))
    assert not mem.is_locked


def test_a_view_kept_after_unlock_is_dead(make):
    mem, _ = filled(make)
    view = mem.data
    mem.unlock()
    with pytest.raises(ValueError, match="released"):
        view[0]


def test_unlock_or_close_while_a_slice_of_data_lives(make):
    mem, pattern = filled(make)
    held = mem.data[:8]
    with pytest.raises(BufferError):
        mem.unlock()
    assert mem.is_locked
    with pytest.raises(BufferError):
        mem.close()
    assert not mem.closed and mem.read() == pattern
    held.release()
    mem.unlock()


# --- use after close ---


def test_use_after_close(make):
    mem, _ = filled(make)
    mem.close()
    mem.close()  # twice is harmless
    for call in (mem.lock, mem.unlock, mem.read, lambda: mem.write(b"x"),
                 lambda: mem.readinto(bytearray(1)), lambda: mem.data):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert mem.closed


# --- fork ---


def test_fork_with_locked_memory(make, kind):
    """The child gets the memory as it was, a copy that it may change without touching the
    parent's (memfd segments too: the child copies them into memfds of its own)."""
    mem, pattern = filled(make)
    pid = os.fork()
    if pid == 0:  # the child: must not raise, whatever happens
        ok = False
        try:
            ok = mem.read() == pattern
            mem.write(b"child")
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child did not see the locked data"
    assert mem.read() == pattern
    assert mem.is_locked


# --- backends ---


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        discache.allocate(PAGE, "tmpfs")
    with pytest.raises(TypeError):
        discache.allocate(PAGE, 3)
    with pytest.raises(ValueError, match="sigbus"):
        discache.allocate(PAGE, "memfd", sigbus=True)
    with pytest.raises(ValueError, match="SIGBUS"):
        DiscardableMemoryManager(1 << 20, "madvfree-sigbus")
    if not AVAILABLE["ashmem"].available:
        with pytest.raises(BackendUnavailableError, match="memfd"):
            discache.allocate(PAGE, "ashmem")


# --- limits ---


def test_exhausted_manager_limit_never_purges_locked_memory():
    manager = DiscardableMemoryManager(4 * PAGE, "madvfree")
    with pytest.raises(MemoryError, match="limit"):
        manager.allocate(4 * PAGE + 1)
    assert manager.bytes_allocated == 0
    mems = [manager.allocate(PAGE) for _ in range(6)]  # all locked: the limit cannot be met
    for k, mem in enumerate(mems):
        mem.write(bytes([k + 1]) * PAGE)
    assert manager.bytes_locked == 6 * PAGE > manager.limit
    mems[0].unlock()  # over the limit: the unlocked one goes at once, reported by lock
    assert mems[0].lock() is False
    assert all(m.read() == bytes([k + 1]) * PAGE for k, m in enumerate(mems) if k)
    for mem in mems:
        mem.close()


def test_exhausted_cache_size():
    # eviction is LRU over the whole cache and never takes the entry just stored
    cache = DiscardableCache(100, "madvfree",
                             manager=DiscardableMemoryManager(1 << 20, "madvfree"))
    with pytest.raises(ValueError, match="too large"):
        cache["big"] = b"x" * 101
    assert "big" not in cache and cache.currsize == 0
    cache["a"] = b"a" * 60
    cache["b"] = b"b" * 60  # evicts "a"
    assert "a" not in cache and cache["b"] == b"b" * 60
    cache.close()


def test_bad_limits_and_settings():
    for limit in (0, -1):
        with pytest.raises(ValueError):
            DiscardableMemoryManager(limit, "madvfree")
    for limit in (1.5, True, "1"):
        with pytest.raises(TypeError):
            DiscardableMemoryManager(limit, "madvfree")
    with pytest.raises(ValueError):
        DiscardableMemoryManager(1 << 20, "madvfree", segment_bytes=1)
    with pytest.raises(ValueError):
        DiscardableCache(-1, "madvfree")
    with pytest.raises(TypeError):
        DiscardableCache(100, "madvfree", shards=3)  # gone: the cache is one LRU
    with pytest.raises(ValueError):
        PageTable(0)
    with pytest.raises(ValueError):
        PageTable(MAX_PAGES + 1)


# --- the cache ---


@pytest.fixture
def cache():
    c = DiscardableCache(1 << 16, "madvfree", manager=DiscardableMemoryManager(1 << 20,
                                                                                "madvfree"))
    yield c
    c.close()


@pytest.mark.parametrize("value", ["text", 5, None, [1, 2], {"a": 1}])
def test_cache_value_that_is_not_a_buffer(cache, value):
    cache["k"] = b"old"
    with pytest.raises(TypeError):
        cache["k"] = value
    assert cache["k"] == b"old" and cache.currsize == 3


def test_unpin_without_pin(cache):
    cache["k"] = b"v"
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin("k")
    with pytest.raises(KeyError):
        cache.unpin("missing")
    with pytest.raises(KeyError):
        cache.pin("missing")
    cache.pin("k")
    cache.unpin("k")
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin("k")


def test_missing_or_purged_key(cache):
    cache["k"] = b"v" * 100
    discache.force_reclaim(cache)
    assert cache.get("k") in (None, b"v" * 100)  # never anything else
    with pytest.raises(KeyError):
        cache["never set"]
    with pytest.raises(KeyError):
        del cache["never set"]
    with pytest.raises(KeyError):
        with cache.view("never set"):
            pass


# --- shared memory: offsets, lengths and fds ---


@pytest.fixture
def shm():
    s = DiscardableSharedMemory.create(4 * PAGE)
    yield s
    s.close()


@pytest.mark.parametrize("offset,length", [(1, 0), (0, 1), (-PAGE, 0), (4 * PAGE, 0),
                                           (0, 5 * PAGE), (3 * PAGE, 2 * PAGE)])
def test_shared_lock_unlock_misaligned_or_outside(shm, offset, length):
    shm.unlock()
    for call in (shm.lock, shm.unlock):
        with pytest.raises(ValueError):
            call(offset, length)
    assert shm.locked_page_count == 0 and not shm.is_memory_locked()
    with pytest.raises(TypeError):
        shm.lock(0.5, 0)


def test_shared_double_lock_and_unlock_without_lock(shm):
    with pytest.raises(RuntimeError, match="already locked"):
        shm.lock(0, PAGE)
    shm.unlock(0, PAGE)
    with pytest.raises(RuntimeError, match="not locked"):
        shm.unlock(0, PAGE)
    assert shm.locked_page_count == 3
    shm.unlock(PAGE, 0)
    assert not shm.purge() or shm.locked_page_count == 0


def test_shared_purge_while_locked_is_refused(shm):
    shm.data[:4] = b"keep"
    assert shm.purge() is False and shm.purge() is False
    assert bytes(shm.data[:4]) == b"keep"


def test_shared_open_with_wrong_fds(shm):
    r, w = os.pipe()
    closed = os.dup(r)
    os.close(closed)
    fds_before = set(os.listdir("/proc/self/fd"))
    try:
        for fd, error in ((-1, ValueError), (closed, ValueError), (r, ValueError),
                          (1 << 40, OverflowError), ("3", TypeError), (None, TypeError)):
            with pytest.raises(error):
                DiscardableSharedMemory.open(fd, shm.nbytes)
        with pytest.raises(ValueError, match="not"):
            DiscardableSharedMemory.open(shm.fileno(), shm.nbytes - PAGE)
        with pytest.raises(ValueError):
            DiscardableSharedMemory.open(shm.fileno(), 0)
        assert set(os.listdir("/proc/self/fd")) == fds_before  # nothing leaked
    finally:
        os.close(r), os.close(w)
    peer = DiscardableSharedMemory.open(shm.fileno(), shm.nbytes)
    assert peer.lock() == LockResult.FAILED  # locked by the creator: not granted twice
    peer.close()


def test_shared_use_after_close(shm):
    shm.close()
    for call in (shm.lock, shm.unlock, shm.purge, shm.fileno, lambda: shm.data):
        with pytest.raises(ValueError, match="closed"):
            call()


# --- the lower layers ---


def test_force_reclaim_of_something_else():
    with pytest.raises(TypeError):
        discache.force_reclaim(b"bytes")


def test_segment_span_misuse():
    seg = _core.Segment(4)
    for args, error in (((0, 0), ValueError), ((-1, 1), IndexError), ((3, 2), IndexError),
                        ((1 << 70, 1), OverflowError), (("0", 1), TypeError)):
        with pytest.raises(error):
            seg.lock_span(*args)
    with pytest.raises(BufferError):
        seg.write(0, memoryview(b"abcd")[::2])
    seg.close()
    with pytest.raises(ValueError, match="closed"):
        seg.unlock_span(0, 1)


def test_pressure_monitor_misuse():
    with pytest.raises(ValueError):
        PressureMonitor(print, source="radio")
    with pytest.raises(TypeError):
        PressureMonitor("not callable")
    monitor = PressureMonitor(lambda level: None, source="meminfo").start()
    with pytest.raises(RuntimeError, match="already started"):
        monitor.start()
    monitor.stop()
    monitor.stop()
    manager = DiscardableMemoryManager(1 << 20, "madvfree")
    with pytest.raises(ValueError):
        manager.on_memory_pressure("low")
