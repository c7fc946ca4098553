"""Behaviour of DiscardableMemory, written once and run on every registered backend."""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

import discache
from discache import _core, backends
from kernel_reclaim import reclaim

PAGE = _core.page_size()


def _backend_params() -> list:
    """One param per registered backend; an unavailable one skips with the probe's reason."""
    params = []
    for info in backends.available():
        marks = () if info.available else pytest.mark.skip(
            reason=f"backend {info.name!r} does not run here: {info.reason}")
        params.append(pytest.param(info.name, id=info.name, marks=marks))
    return params


@pytest.fixture(params=_backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    """The name of each backend in turn."""
    return request.param


@pytest.fixture
def make(backend: str):
    """allocate() on the backend under test; closes what it made."""
    made = []

    def make(nbytes: int = 8 * PAGE):
        mem = discache.allocate(nbytes, backend)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close()


def fill(mem, seed: int = 1) -> bytes:
    """Fill mem with a pattern that differs in every page's first word; returns the pattern."""
    pattern = bytes((i * 7 + seed + i // PAGE) % 251 + 1 for i in range(mem.nbytes))
    mem.data[:] = pattern
    return pattern


# --- allocation and the locked state ---

def test_allocate_returns_locked_memory_of_the_size(make, backend):
    mem = make(3 * PAGE + 5)
    assert isinstance(mem, discache.DiscardableMemory)
    assert mem.is_locked and not mem.closed
    assert mem.nbytes == 3 * PAGE + 5 and mem.npages == 4
    assert mem.backend == backend
    assert len(mem.data) == mem.nbytes and not mem.data.readonly


def test_contents_survive_unlock_and_lock_when_not_reclaimed(make):
    mem = make()
    pattern = fill(mem)
    for _ in range(3):
        mem.unlock()
        assert not mem.is_locked
        assert mem.lock() is True
        assert mem.purged_pages == 0
        assert bytes(mem.data) == pattern


def test_locked_memory_is_never_reclaimed(make):
    mem = make()
    pattern = fill(mem)
    assert discache.force_reclaim(mem) == 0
    assert bytes(mem.data) == pattern
    mem.unlock()
    assert mem.lock()
    assert bytes(mem.data) == pattern


@pytest.mark.parametrize("name", [p for p in _backend_params() if "madvfree" in p.values[0]])
def test_madvfree_locked_pages_survive_pageout_from_every_cpu(name):
    mem = discache.allocate(16 * PAGE, name)
    try:
        pattern = fill(mem)
        mem.unlock()
        assert mem.lock()
        # Locked pages are dirty again: even a forced MADV_PAGEOUT cannot drop them.
        _core.on_every_cpu(lambda: mem._cold(True))
        _core.on_every_cpu(lambda: mem._pageout(True))
        assert mem._resident_pages() == 16
        assert bytes(mem.data) == pattern
        mem.unlock()
        assert mem.lock() is True
        assert bytes(mem.data) == pattern
    finally:
        mem.close()


@pytest.mark.parametrize("npages", [1, 5, 64])
def test_every_reclaimed_page_is_reported(make, npages):
    mem = make(npages * PAGE)
    fill(mem)
    mem.unlock()
    # What the kernel really discarded (it may keep a page another reclaimer holds, see
    # docs/backends.md); lock() must report exactly that.
    gone = reclaim(mem, at_least=max(1, npages // 2))
    assert mem.lock() is False
    assert mem.purged_pages == len(gone)
    assert mem.is_locked
    # Contents are undefined, but the memory is usable: refill and keep going.
    pattern = fill(mem, seed=9)
    mem.unlock()
    assert mem.lock() is True
    assert bytes(mem.data) == pattern


def test_reclaim_never_hands_back_zeros_as_intact(make):
    for _ in range(5):
        mem = make(4 * PAGE)
        fill(mem)
        mem.unlock()
        reclaimed = discache.force_reclaim(mem)
        intact = mem.lock()
        assert intact == (reclaimed == 0)
        if intact:
            assert b"\0" * 8 not in bytes(mem.data[:8])


def test_with_locks_and_unlocks(make):
    mem = make()
    pattern = fill(mem)
    mem.unlock()
    with mem as view:
        assert mem.is_locked
        assert bytes(view) == pattern
    assert not mem.is_locked


def test_with_raises_purged_error_and_leaves_memory_locked(make):
    mem = make()
    fill(mem)
    mem.unlock()
    reclaim(mem)
    with pytest.raises(discache.PurgedError, match="refill"):
        with mem:
            pytest.fail("the body must not run on purged memory")
    assert mem.is_locked
    fill(mem)
    mem.unlock()


def test_accessors_read_and_write_locked_memory(make):
    mem = make(2 * PAGE)
    assert mem.write(b"hello", PAGE - 2) == 5
    assert mem.read(PAGE - 2, 5) == b"hello"
    assert mem.read(2 * PAGE - 3) == bytes(3)
    target = bytearray(7)
    assert mem.readinto(target, PAGE - 2) == 7
    assert target == b"hello\0\0"
    assert mem.readinto(bytearray(10), 2 * PAGE - 4) == 4


def test_views_are_released_by_unlock(make):
    mem = make()
    view = mem.data
    mem.unlock()
    with pytest.raises(ValueError):
        view[0]
    with pytest.raises(RuntimeError, match="unlocked"):
        mem.data


def test_data_after_the_caller_released_its_view(make):
    # found by the stress tests and fuzz/fuzz_memory.py: a released mem.data stayed cached
    mem = make()
    with mem.data as view:
        view[:3] = b"abc"
    assert bytes(mem.data[:3]) == b"abc"
    assert mem.read(0, 3) == b"abc"
    mem.unlock()


def test_unlock_with_a_live_slice_raises_and_stays_locked(make):
    mem = make()
    part = mem.data[10:20]
    with pytest.raises(BufferError):
        mem.unlock()
    assert mem.is_locked
    part[0] = 42
    assert mem.data[10] == 42
    part.release()
    mem.unlock()
    assert not mem.is_locked


# --- bad inputs: clear exceptions, nothing changed ---

@pytest.mark.parametrize("nbytes, error", [
    (0, ValueError), (-1, ValueError), (2**63, ValueError), (1 << 80, ValueError),
    (_core.physical_memory() + 1, ValueError), (1.5, TypeError), ("10", TypeError),
    (None, TypeError),
])
def test_bad_sizes_raise(backend, nbytes, error):
    with pytest.raises(error):
        discache.allocate(nbytes, backend)


def test_unknown_backend_raises_value_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        discache.allocate(PAGE, "nope")
    with pytest.raises(TypeError):
        discache.allocate(PAGE, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend"):
        discache.DiscardableMemoryAllocator("nope")


def test_sigbus_needs_madvfree():
    with pytest.raises(ValueError, match="sigbus=True needs the madvfree backend"):
        discache.allocate(PAGE, "memfd", sigbus=True)


def test_ashmem_says_why_and_what_to_use_instead():
    ok, reason = _core.probe_ashmem()
    if ok:
        pytest.skip("/dev/ashmem exists here")
    with pytest.raises(discache.BackendUnavailableError, match="memfd"):
        discache.allocate(PAGE, "ashmem")
    with pytest.raises(discache.BackendUnavailableError, match="ashmem"):
        discache.DiscardableMemoryAllocator("ashmem")
    with pytest.raises(discache.BackendUnavailableError, match="5.18"):
        _core.Segment(1, "ashmem")  # the segment kind itself says so too, when used directly


def test_double_unlock_raises_and_changes_nothing(make):
    mem = make()
    pattern = fill(mem)
    mem.unlock()
    with pytest.raises(RuntimeError, match="not locked"):
        mem.unlock()
    assert not mem.is_locked
    assert mem.lock() is True
    assert bytes(mem.data) == pattern


def test_double_lock_raises_and_changes_nothing(make):
    mem = make()
    pattern = fill(mem)
    with pytest.raises(RuntimeError, match="already locked"):
        mem.lock()
    assert mem.is_locked and bytes(mem.data) == pattern


def test_closed_memory_raises_value_error(make):
    mem = make()
    mem.close()
    mem.close()  # idempotent
    assert mem.closed and not mem.is_locked
    for call in (mem.lock, mem.unlock, lambda: mem.data, lambda: mem.read(0, 1),
                 lambda: mem.write(b"x"), lambda: discache.force_reclaim(mem)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_access_while_unlocked_raises(make, backend):
    mem = make()
    mem.unlock()
    with pytest.raises(RuntimeError, match="unlocked"):
        mem.data
    if backend == "madvfree-sigbus":
        return  # reads and writes unlocked memory by design: see test_sigbus.py
    for call in (lambda: mem.read(0, 1), lambda: mem.write(b"x"),
                 lambda: mem.readinto(bytearray(1))):
        with pytest.raises(RuntimeError, match="unlocked"):
            call()
    assert not mem.is_locked


@pytest.mark.parametrize("offset, size", [(-1, 1), (0, 8 * PAGE + 1), (8 * PAGE + 1, 0),
                                          (4 * PAGE, 4 * PAGE + 1)])
def test_out_of_range_access_raises_and_writes_nothing(make, offset, size):
    mem = make()
    pattern = fill(mem)
    with pytest.raises(ValueError, match="outside"):
        mem.read(offset, size)
    with pytest.raises(ValueError, match="outside"):
        mem.write(b"x" * max(size, 1), offset)
    assert bytes(mem.data) == pattern


def test_force_reclaim_rejects_other_objects():
    with pytest.raises(TypeError):
        discache.force_reclaim(bytearray(10))


# --- the allocator ---

def test_allocator_counts_and_releases_unlocked_memory(backend):
    allocator = discache.DiscardableMemoryAllocator(backend)
    assert allocator.backend == backend
    kept, freed = allocator.allocate(3 * PAGE), allocator.allocate(2 * PAGE + 1)
    try:
        assert allocator.bytes_allocated == 5 * PAGE + 1
        pattern = fill(kept)
        fill(freed)
        freed.unlock()
        assert allocator.release_free_memory() == 3 * PAGE
        assert freed.lock() is False
        assert bytes(kept.data) == pattern
        freed.close()
        assert allocator.bytes_allocated == 3 * PAGE
    finally:
        kept.close()
        freed.close()
    assert allocator.bytes_allocated == 0


def test_auto_picks_the_first_available_backend():
    mem = discache.allocate(PAGE)
    try:
        runs = {info.name: info.available for info in backends.available()}
        assert mem.backend == next(name for name in backends.AUTO_ORDER if runs[name])
    finally:
        mem.close()


# --- no leaks ---

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_no_fd_or_mapping_leaks_after_10000_cycles(backend):
    for _ in range(50):  # warm up allocator caches of Python itself
        discache.allocate(PAGE, backend).close()
    fds, mappings = _fds(), _mappings()
    for i in range(10_000):
        mem = discache.allocate(2 * PAGE, backend)
        if i % 2:
            mem.data[0] = 1
            mem.unlock()
        mem.close()
    assert _fds() == fds
    assert _mappings() <= mappings + 2  # the Python heap may grow by an arena or two


def test_dropped_memory_is_freed_without_close(backend):
    for _ in range(50):
        discache.allocate(PAGE, backend)
    # Earlier tests' garbage (cycles holding fds) is collected now, and no collection runs
    # during the count: the count sees only what dropping this test's memory frees.
    gc.collect()
    gc.disable()
    try:
        fds, mappings = _fds(), _mappings()
        for _ in range(2000):
            discache.allocate(PAGE, backend).unlock()
        assert _fds() == fds
        assert _mappings() <= mappings + 2
    finally:
        gc.enable()


# --- discache info ---

def test_info_lists_every_backend_truthfully():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "discache.cli", "info"], env=env,
                         capture_output=True, text=True, check=True).stdout
    listed = {}
    for line in out.split("backends:")[1].splitlines():
        if line.strip() and not line.startswith("   "):  # not a wrapped reason's next line
            name, mark = line.split()[:2]
            listed[name] = mark == "yes"
    assert listed == {info.name: info.available for info in backends.available()}
    for name, ok in listed.items():
        if ok:
            discache.allocate(PAGE, name).close()
        else:
            with pytest.raises(discache.BackendUnavailableError):
                discache.allocate(PAGE, name)
