"""Costs of the real backends beside the bare stdlib call, measured in the same run.

Run: python -m pytest bench/bench_backends.py --benchmark-only
Target (issue 4): a 1-page madvfree unlock+lock roundtrip costs at most 1.3x the bare
mmap.madvise(MADV_FREE) on the same number of pages; compare rows with the same `pages`.
"""
from __future__ import annotations

import mmap

import pytest

import discache
from discache import _core, backends

PAGE = _core.page_size()
PAGES = [1, 16, 256]
RUNS = {info.name: info for info in backends.available()}
REAL = [name for name in ("madvfree", "madvfree-sigbus", "memfd") if RUNS[name].available]


@pytest.fixture
def dirty_mmap():
    """A stdlib private anonymous mmap factory (MADV_FREE refuses shared), every page written."""
    made = []

    def make(npages: int) -> mmap.mmap:
        m = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.write(b"\x01" * (npages * PAGE))
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.mark.parametrize("pages", PAGES)
def test_bare_madvise_free(benchmark, dirty_mmap, pages):
    """One stdlib mmap.madvise(MADV_FREE) call, repeated on the same (so: clean) pages."""
    m = dirty_mmap(pages)
    benchmark.extra_info.update(op="bare mmap.madvise(MADV_FREE), clean pages", backend="stdlib", pages=pages)
    benchmark(m.madvise, mmap.MADV_FREE, 0, pages * PAGE)


@pytest.mark.parametrize("pages", PAGES)
def test_bare_madvise_free_dirty(benchmark, dirty_mmap, pages):
    """The floor a roundtrip pays: mmap.madvise(MADV_FREE) on pages written since (untimed)."""
    m = dirty_mmap(pages)
    offsets = range(0, pages * PAGE, PAGE)

    def dirty():
        for offset in offsets:
            m[offset] = 1

    benchmark.extra_info.update(op="bare mmap.madvise(MADV_FREE), dirty pages",
                                backend="stdlib", pages=pages)
    benchmark.pedantic(m.madvise, args=(mmap.MADV_FREE, 0, pages * PAGE), setup=dirty,
                       rounds=20000 // pages, iterations=1, warmup_rounds=10)


@pytest.mark.parametrize("pages", PAGES)
def test_bare_madvise_free_and_redirty(benchmark, dirty_mmap, pages):
    """The stdlib roundtrip: MADV_FREE, then a write per page to take the pages back (blind)."""
    m = dirty_mmap(pages)
    offsets = range(0, pages * PAGE, PAGE)

    def roundtrip():
        m.madvise(mmap.MADV_FREE, 0, pages * PAGE)
        for offset in offsets:
            m[offset] = 1

    benchmark.extra_info.update(op="bare madvise + write per page", backend="stdlib",
                                pages=pages)
    benchmark(roundtrip)


@pytest.mark.parametrize("pages", PAGES)
@pytest.mark.parametrize("backend", REAL)
def test_unlock_lock_roundtrip(benchmark, backend, pages):
    """unlock() + lock() of intact memory."""
    mem = discache.allocate(pages * PAGE, backend)
    mem.data[:] = b"\x02" * mem.nbytes
    unlock, lock = mem.unlock, mem.lock

    def roundtrip():
        unlock()
        return lock()

    benchmark.extra_info.update(op="unlock+lock", backend=backend, pages=pages)
    assert benchmark(roundtrip) is True
    mem.close()


@pytest.mark.parametrize("pages", PAGES)
@pytest.mark.parametrize("backend", REAL)
def test_lock_when_purged(benchmark, backend, pages):
    """lock() of memory whose every page was reclaimed (force_reclaim in the untimed setup)."""
    mem = discache.allocate(pages * PAGE, backend)
    results = []

    def setup():
        mem.data[:] = b"\x03" * mem.nbytes
        mem.unlock()
        discache.force_reclaim(mem)

    def lock():
        results.append(mem.lock())

    benchmark.extra_info.update(op="lock when purged", backend=backend, pages=pages)
    benchmark.pedantic(lock, setup=setup, rounds=200, iterations=1, warmup_rounds=2)
    assert not any(results)
    mem.close()


@pytest.mark.parametrize("pages", PAGES)
def test_memfd_purge(benchmark, pages):
    """DiscardableSharedMemory.purge() of populated, unlocked pages (the punch-hole)."""
    shm = discache.DiscardableSharedMemory.create(pages * PAGE)
    shm.unlock()
    results = []

    def setup():
        assert shm.lock() == discache.LockResult.PURGED or shm.is_memory_locked()
        shm.data[:] = b"\x04" * shm.nbytes  # populate every page again
        shm.unlock()

    def purge():
        results.append(shm.purge())

    shm.lock()
    shm.unlock()
    benchmark.extra_info.update(op="memfd purge", backend="memfd", pages=pages)
    benchmark.pedantic(purge, setup=setup, rounds=300, iterations=1, warmup_rounds=2)
    assert all(results)
    shm.close()


@pytest.mark.skipif(not RUNS["madvfree-sigbus"].available, reason="no userfaultfd SIGBUS here")
def test_purged_page_error(benchmark):
    """A guarded read of a purged page: SIGBUS, siglongjmp, PurgedPageError raised and caught."""
    mem = discache.allocate(PAGE, sigbus=True)
    mem.unlock()
    discache.force_reclaim(mem)

    def read():
        try:
            mem.read(0, 1)
        except discache.PurgedPageError:
            return True
        return False

    benchmark.extra_info.update(op="read of a purged page", backend="madvfree-sigbus", pages=1)
    assert benchmark(read) is True
    mem.lock()
    mem.close()
