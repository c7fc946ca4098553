"""Regression tests of the memory layer's misuse (issue 11's reproducers, issue 10's thread and
fork misuse): each would corrupt, crash, hang or leak before its fix."""
from __future__ import annotations

import copy
import gc
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy
import pytest

import discache
from discache import DiscardableMemoryManager, DiscardableSharedMemory, _core, backends
from discache.sim import backend as simbackend

PAGE = _core.page_size()
AVAILABLE = {info.name for info in backends.available() if info.available}
MANAGER_BACKENDS = [b for b in ("madvfree", "memfd", "simulated") if b in AVAILABLE]
STANDALONE_BACKENDS = [b for b in ("madvfree", "madvfree-sigbus", "memfd", "ashmem", "simulated")
                       if b in AVAILABLE]


@pytest.fixture(params=MANAGER_BACKENDS)
def manager(request):
    m = DiscardableMemoryManager(1 << 24, request.param, segment_bytes=16 * PAGE)
    yield m
    m.stop()


def filled(m: DiscardableMemoryManager, byte: int, pages: int = 1):
    mem = m.allocate(pages * PAGE)
    mem.write(bytes([byte]) * (pages * PAGE))
    return mem


def accounting(m: DiscardableMemoryManager) -> dict:
    stats = m.stats()
    keys = ("allocated_bytes", "locked_bytes", "unlocked_bytes", "purged_bytes", "allocations",
            "segments")
    return {k: stats[k] for k in keys} | {"unlocks": stats.get("unlocks", 0)}


# --- 1, 2: unlock_many refuses the same memory twice and memory of another manager -------------


def test_unlock_many_refuses_the_same_memory_twice(manager):
    a, b = filled(manager, 1), filled(manager, 2)
    before = accounting(manager)
    with pytest.raises(ValueError, match="more than once"):
        manager.unlock_many([a, b, a])
    assert accounting(manager) == before
    assert a.is_locked and b.is_locked
    assert a.read() == b"\x01" * PAGE and b.read() == b"\x02" * PAGE
    a.unlock()
    assert a.lock() is True
    assert a.read() == b"\x01" * PAGE, "a cookie left in the page would show here"
    assert manager.stats()["locked_bytes"] == 2 * PAGE


def test_unlock_many_refuses_memory_of_another_manager(manager):
    other = DiscardableMemoryManager(1 << 24, manager.backend, segment_bytes=16 * PAGE)
    mine = filled(manager, 3)
    theirs = filled(other, 4)
    before, before_other = accounting(manager), accounting(other)
    for batch in ([theirs], [mine, theirs], [theirs, mine]):
        with pytest.raises(ValueError, match="not memory of this manager"):
            manager.unlock_many(batch)
    assert accounting(manager) == before and accounting(other) == before_other
    assert mine.is_locked and theirs.is_locked
    manager.release_free_memory()
    other.release_free_memory()
    assert mine.read() == b"\x03" * PAGE and theirs.read() == b"\x04" * PAGE


def test_unlock_many_refuses_memory_not_from_a_manager(manager):
    mine = filled(manager, 5)
    loose = discache.allocate(PAGE, "simulated")
    with pytest.raises(ValueError):
        manager.unlock_many([mine, loose])
    with pytest.raises(ValueError):
        manager.unlock_many([mine, "not memory"])
    assert mine.is_locked and loose.is_locked
    loose.close()


def test_a_manager_refuses_to_lock_unlock_or_reclaim_memory_of_another(manager):
    other = DiscardableMemoryManager(1 << 24, manager.backend)
    theirs = filled(other, 6)
    for call in (manager.unlock_span, manager.close_span, manager.lock_span, manager.purge_span,
                 manager.reclaim_span, manager.span_buffer):
        with pytest.raises(ValueError):
            call(theirs)
    assert theirs.is_locked and not theirs.closed and other.stats()["locked_bytes"] == PAGE


def test_unlock_many_records_its_latency(manager):
    mems = [filled(manager, i) for i in range(3)]
    count = manager.latency["unlock"].snapshot()["buckets"][-1][1]
    manager.unlock_many(mems)
    assert manager.latency["unlock"].snapshot()["buckets"][-1][1] == count + 1


# --- 3: copies ----------------------------------------------------------------------------------


def copy_kinds():
    for backend in STANDALONE_BACKENDS:
        yield pytest.param(lambda b=backend: discache.allocate(PAGE, b), id=backend)
    for backend in MANAGER_BACKENDS:
        yield pytest.param(lambda b=backend: DiscardableMemoryManager(1 << 22, b).allocate(PAGE),
                           id=f"manager-{backend}")


@pytest.mark.parametrize("make", list(copy_kinds()))
@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy,
                                       lambda mem: pickle.loads(pickle.dumps(mem))],
                         ids=["copy", "deepcopy", "pickle"])
def test_copies_are_refused(make, duplicate):
    mem = make()
    mem.write(b"original")
    with pytest.raises(TypeError):
        duplicate(mem)
    assert mem.is_locked and mem.read(0, 8) == b"original"
    mem.unlock()
    assert mem.lock() in (True, False)
    mem.close()


# --- 4: a manager across fork -------------------------------------------------------------------


def test_a_forked_child_never_shares_a_span_with_its_parent(manager):
    inherited = filled(manager, 7)
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            own = filled(manager, 8)  # the span the parent allocates next, in the same heap
            inherited.write(b"\x09" * PAGE)
            os.write(to_parent_w, b"x")
            os.read(to_child_r, 1)  # the parent has written its own allocation meanwhile
            ok = own.read() == b"\x08" * PAGE and inherited.read() == b"\x09" * PAGE
            own.unlock()
            inherited.unlock()
            manager.release_free_memory()
            ok = ok and own.lock() is False and manager.stats()["locked_bytes"] == PAGE
        finally:
            os._exit(0 if ok else 1)
    os.close(to_child_r)
    os.close(to_parent_w)
    assert os.read(to_parent_r, 1) == b"x"
    mine = filled(manager, 10)
    os.write(to_child_w, b"x")
    _, status = os.waitpid(pid, 0)
    os.close(to_child_w)
    os.close(to_parent_r)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's memory was changed by its parent"
    assert inherited.read() == b"\x07" * PAGE, "the child wrote into the parent's locked memory"
    assert mine.read() == b"\x0a" * PAGE, "the child was given the parent's span"
    assert manager.stats()["locked_bytes"] == 2 * PAGE


@pytest.mark.parametrize("backend", STANDALONE_BACKENDS)
@pytest.mark.parametrize("standalone", [False, True], ids=["manager", "allocate"])
def test_a_forked_child_uses_memory_a_thread_was_busy_with_at_fork(backend, standalone):
    """The fork hooks hold the manager's lock; the child makes itself a new one, and memory made
    before the fork must use that one (a span that kept the old lock deadlocked the child)."""
    if standalone:
        memories = [discache.allocate(PAGE, backend) for _ in range(4)]
    else:
        manager = DiscardableMemoryManager(1 << 22, backend if backend in MANAGER_BACKENDS
                                           else "madvfree")
        memories = [manager.allocate(PAGE) for _ in range(4)]
    busy, stop = memories[1:], threading.Event()

    def churn():
        while not stop.is_set():
            for mem in busy:
                mem.unlock()
                if not mem.lock():
                    mem.write(b"\0")

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(10):
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)  # a deadlocked child dies instead of hanging the test
                results = []

                def use(mem=memories[0]):
                    mem.write(b"child")
                    mem.unlock()
                    results.append(mem.lock() in (True, False))

                # from a thread of the child's own: the fork hook's hold of the old lock, by the
                # forking thread, would let the main thread in by re-entry
                user = threading.Thread(target=use)
                user.start()
                user.join()
                os._exit(0 if results == [True] else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "the child hung or failed"
    finally:
        stop.set()
        thread.join()


def test_a_forked_child_copies_only_the_written_pages_of_a_memfd_segment():
    if "memfd" not in AVAILABLE:
        pytest.skip("no memfd here")
    m = DiscardableMemoryManager(1 << 24, "memfd", segment_bytes=256 * PAGE)
    mem = filled(m, 0x33)
    later = m.allocate(PAGE)  # claimed, never written: a hole
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            segment = mem.segment
            blocks = os.fstat(segment.fileno()).st_blocks * 512
            ok = (mem.read() == b"\x33" * PAGE and later.read() == bytes(PAGE)
                  and blocks <= 4 * PAGE)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child copied holes, or lost data"


# --- 8: dropped allocations are collected -------------------------------------------------------


def test_dropped_allocations_are_freed(manager):
    limit_pages = manager.limit // PAGE
    for _ in range(4 * limit_pages // 64):
        mem = manager.allocate(64 * PAGE)
        mem.write(b"x")  # dropped locked, without close()
    del mem
    gc.collect()
    stats = manager.stats()
    assert stats["allocated_bytes"] == 0 and stats["locked_bytes"] == 0
    assert stats["allocations"] == 0 and stats["segments"] == 0


def test_the_manager_holds_no_strong_reference_to_an_allocation(manager):
    mem = filled(manager, 1)
    mem.unlock()  # unlocked memory sits in the purge order: weakly
    ref = weakref.ref(mem)
    del mem
    assert ref() is None
    assert manager.stats()["allocations"] == 0


def test_an_allocation_in_a_reference_cycle_is_freed_by_the_collector(manager):
    mem = filled(manager, 1)
    mem.cycle = mem  # type: ignore[attr-defined]
    del mem
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


def test_a_view_outliving_its_dropped_allocation_keeps_the_span(manager):
    mem = filled(manager, 0x11)
    view = mem.data[:16]
    del mem
    gc.collect()
    others = [filled(manager, 0x22) for _ in range(20)]
    assert bytes(view) == b"\x11" * 16, "the span was handed out again under a live view"
    assert manager.stats()["allocations"] == 21, "the dropped one waits for its view"
    view.release()
    gc.collect()
    assert manager.stats()["allocations"] == 20
    for mem in others:
        mem.close()
    assert manager.stats()["allocated_bytes"] == 0


def test_dropped_caches_free_their_memory(manager):
    for _ in range(20):
        cache = discache.DiscardableCache(1 << 20, manager=manager)
        for key in range(8):
            cache[key] = b"x" * (64 << 10)
    del cache
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


def test_dropped_simulated_memory_is_unmapped():
    discache.allocate(PAGE, "simulated").close()
    process = simbackend._process
    baseline = len(process.mappings)
    for _ in range(50):
        discache.allocate(4 * PAGE, "simulated")
    gc.collect()
    discache.allocate(PAGE, "simulated").close()  # unmaps what the collector queued
    assert len(process.mappings) == baseline


# --- 10: a failed allocation --------------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in ("madvfree", "memfd") if b in AVAILABLE])
def test_a_failed_allocation_raises_memory_error_and_changes_nothing(backend):
    script = textwrap.dedent(f"""
        import resource
        from discache import DiscardableMemoryManager, _core
        PAGE = _core.page_size()
        m = DiscardableMemoryManager(1 << 30, {backend!r}, segment_bytes=16 * PAGE)
        kept = m.allocate(PAGE)
        kept.write(b"k" * PAGE)
        idle = m.allocate(PAGE)
        idle.write(b"i" * PAGE)
        idle.unlock()
        before = m.stats()
        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, ((vm << 10) + (64 << 20), resource.RLIM_INFINITY))
        try:
            m.allocate(512 << 20)
        except MemoryError:
            pass
        else:
            raise SystemExit("no MemoryError")
        after = m.stats()
        assert after == before, (before, after)
        assert idle.lock() is True, "the failed allocation purged unrelated memory"
        assert idle.read() == b"i" * PAGE and kept.read() == b"k" * PAGE
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_an_allocation_over_the_limit_purges_nothing(manager):
    idle = filled(manager, 1)
    idle.unlock()
    before = accounting(manager)
    with pytest.raises(MemoryError):
        manager.allocate(manager.limit + 1)
    assert accounting(manager) == before
    assert idle.lock() is True


# --- 12: sizes and durations --------------------------------------------------------------------


@pytest.mark.parametrize("backend", STANDALONE_BACKENDS)
def test_sizes_are_validated_alike_by_every_backend(backend):
    mem = discache.allocate(numpy.int64(PAGE), backend)
    assert mem.nbytes == PAGE
    assert mem.write(b"abc", numpy.int64(5)) == 3
    assert mem.read(numpy.int64(5), numpy.int32(3)) == b"abc"
    mem.close()
    for bad, error in ((True, TypeError), (1.0, TypeError), ("4096", TypeError), (None, TypeError),
                       (0, ValueError), (-1, ValueError), (numpy.int64(0), ValueError)):
        with pytest.raises(error):
            discache.allocate(bad, backend)


def test_sizes_are_validated_alike_by_the_manager_and_shared_memory(manager):
    mem = manager.allocate(numpy.int64(PAGE))
    assert mem.nbytes == PAGE
    assert DiscardableMemoryManager(numpy.int64(1 << 22), manager.backend,
                                    segment_bytes=numpy.int32(1 << 16)).limit == 1 << 22
    shm = DiscardableSharedMemory.create(numpy.int64(PAGE))
    assert shm.nbytes == PAGE
    shm.close()
    for bad, error in ((True, TypeError), (1.5, TypeError), (0, ValueError), (-PAGE, ValueError)):
        with pytest.raises(error):
            manager.allocate(bad)
        with pytest.raises(error):
            DiscardableMemoryManager(bad, manager.backend)
        with pytest.raises(error):
            DiscardableSharedMemory.create(bad)
    assert manager.stats()["allocations"] == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, 0, True, "1", None])
def test_durations_are_validated_alike(bad):
    m = DiscardableMemoryManager(1 << 22, "simulated")
    with pytest.raises((ValueError, TypeError)):
        DiscardableMemoryManager(1 << 22, "simulated", purge_age=bad)
    with pytest.raises((ValueError, TypeError)):
        m.start_background_purge(bad)
    assert m._background is None, "a refused interval started no thread"
    if bad is not None and bad != 0:  # age 0: purge every unlocked byte; None: purge_age
        with pytest.raises((ValueError, TypeError)):
            m.purge_older_than(bad)
    m.start_background_purge(numpy.float64(0.01))
    m.stop()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, 0, True, "1", 1e300])
def test_shared_memory_purge_times_are_validated(bad):
    """purge(now=inf) raised OverflowError and nan was accepted: now it is duration's check."""
    shm = DiscardableSharedMemory.create(4096)
    shm.unlock()
    with pytest.raises((ValueError, TypeError)):
        shm.purge(now=bad)
    assert shm.lock() == discache.LockResult.SUCCESS, "a refused purge changed nothing"
    shm.close()


def test_opening_a_read_only_memfd_raises_value_error():
    """open() of a memfd opened read-only raised PermissionError where ValueError is said."""
    shm = DiscardableSharedMemory.create(4096)
    fd = os.open(f"/proc/self/fd/{shm.fileno()}", os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="reading and writing"):
            DiscardableSharedMemory.open(fd, 4096)
    finally:
        os.close(fd)
        shm.close()


def test_memfd_lock_does_not_starve_behind_a_looping_force_reclaim():
    if "memfd" not in AVAILABLE:
        pytest.skip("no memfd here")
    mem = discache.allocate(64 * PAGE, "memfd")
    stop = threading.Event()
    errors = []

    def reclaim_forever():
        while not stop.is_set():
            try:
                discache.force_reclaim(mem)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)
                return

    thread = threading.Thread(target=reclaim_forever)
    thread.start()
    try:
        for _ in range(300):
            mem.unlock()
            if not mem.lock():
                assert mem.purged_pages == mem.npages
    finally:
        stop.set()
        thread.join()
    assert not errors
    mem.close()


# --- issue 10: threads and fork -----------------------------------------------------------------


THREADS = 6


def run_threads(work, count=THREADS):
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def own_memory_roundtrips(allocate):
    def work(i):
        for round_ in range(40):
            mem = allocate()
            pattern = bytes([(i * 40 + round_) % 251 + 1]) * mem.nbytes
            mem.write(pattern)
            mem.unlock()
            if mem.lock():
                assert mem.read() == pattern
            assert bytes(mem.data[:1]) in (pattern[:1], b"\0")
            mem.unlock()
            mem.close()

    return work


@pytest.mark.parametrize("backend", STANDALONE_BACKENDS)
def test_every_backend_is_thread_safe(backend):
    run_threads(own_memory_roundtrips(lambda: discache.allocate(2 * PAGE, backend)))


def test_every_manager_is_thread_safe(manager):
    run_threads(own_memory_roundtrips(lambda: manager.allocate(2 * PAGE)))
    assert accounting(manager)["allocated_bytes"] == 0


def test_threads_sharing_one_allocation_keep_the_accounting(manager):
    shared = [filled(manager, i) for i in range(4)]

    def work(i):
        for round_ in range(200):
            mem = shared[(i + round_) % len(shared)]
            try:
                if round_ % 2:
                    mem.unlock()
                else:
                    mem.lock()
            except RuntimeError:  # another thread got there first: allowed, nothing changed
                pass
            if round_ % 25 == 0:
                try:
                    manager.unlock_many(shared[:2])
                except RuntimeError:
                    pass

    run_threads(work)
    locked = sum(mem.npages * PAGE for mem in shared if mem.is_locked)
    assert manager.stats()["locked_bytes"] == locked


def fork_repeatedly(busy, times=30):
    stop = threading.Event()
    errors = []

    def loop():
        while not stop.is_set():
            try:
                busy()
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)
                return

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for _ in range(times):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    busy()
                    code = 0
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child deadlocked")
                time.sleep(0.001)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        thread.join()
    assert not errors, errors


def test_fork_while_another_thread_uses_the_manager(manager):
    def busy():
        mem = manager.allocate(3 * PAGE)
        mem.unlock()
        mem.lock()
        manager.stats()
        mem.close()

    fork_repeatedly(busy)


def test_fork_while_another_thread_uses_simulated_memory():
    def busy():
        mem = discache.allocate(PAGE, "simulated")
        mem.unlock()
        mem.lock()
        mem.close()

    fork_repeatedly(busy)


# a manager does not take SIGBUS mode (test_sigbus_misuse.py): allocate only there
@pytest.mark.parametrize("backend, standalone", [
    pytest.param(backend, standalone, id=f"{'allocate' if standalone else 'manager'}-{backend}")
    for backend in ("madvfree", "madvfree-sigbus", "memfd") if backend in STANDALONE_BACKENDS
    for standalone in (False, True) if standalone or backend != "madvfree-sigbus"])
def test_closing_the_segment_under_its_memory_is_refused(backend, standalone):
    """mem.segment is reachable: closing it would unmap pages the memory (and a cache's compiled
    hit path) still reads.  Refused while any span of it is handed out, nothing changed."""
    if standalone:
        mem = discache.allocate(PAGE, backend)
    else:
        mem = DiscardableMemoryManager(1 << 22, backend).allocate(PAGE)
    mem.write(b"kept")
    with pytest.raises(RuntimeError, match="close the memory instead"):
        mem.segment.close()
    assert mem.read(0, 4) == b"kept" and not mem.segment.closed
    mem.unlock()
    assert mem.lock() in (True, False)
    mem.close()
    assert mem.segment is None
