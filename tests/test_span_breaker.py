"""A careless or hostile user against the memory layer (DiscardableMemory, Segment, a manager's
spans, DiscardableSharedMemory): each misuse gets a clear exception with nothing changed, or its
documented semantics; locked memory is never purged, a purge is always reported, and the
interpreter never crashes, hangs or leaks.  What may kill a process runs in a child."""
from __future__ import annotations

import copy
import fcntl
import gc
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading

import numpy
import pytest

import discache
from discache import DiscardableMemoryManager, DiscardableSharedMemory, _core, backends
from discache.sim.backend import SimSegment

PAGE = _core.page_size()
AVAILABLE = {info.name for info in backends.available() if info.available}
STANDALONE = [b for b in ("madvfree", "madvfree-sigbus", "memfd", "simulated") if b in AVAILABLE]
COMPILED = [b for b in STANDALONE if b != "simulated"]
MANAGED = [b for b in ("madvfree", "memfd", "simulated") if b in AVAILABLE]
BIG = 2 * 2048  # pages: the lock and unlock loops run without the GIL (NOGIL_PAGES is 2048)
Memory = discache.DiscardableMemory


def make(kind: str, npages: int = 2):
    """(memory, its manager or None) for kind "allocate-<backend>" or "manager-<backend>"."""
    how, backend = kind.split("-", 1)
    if how == "allocate":
        return discache.allocate(npages * PAGE, backend), None
    manager = DiscardableMemoryManager(1 << 30, backend, segment_bytes=16 * PAGE)
    return manager.allocate(npages * PAGE), manager


KINDS = [f"allocate-{b}" for b in STANDALONE] + [f"manager-{b}" for b in MANAGED]
COMPILED_KINDS = [k for k in KINDS if not k.endswith("simulated")]


def filled(mem, byte: int = 0x5A) -> bytes:
    data = bytes([byte]) * mem.nbytes
    mem.write(data)
    return data


def assert_intact(mem, data: bytes) -> None:
    """mem (locked) still holds data, and an unlock/lock cycle reports it exactly."""
    assert mem.is_locked and mem.read() == data
    mem.unlock()
    if mem.lock():
        assert mem.read() == data
    else:
        assert mem.purged_pages > 0  # a purge, reported
    assert mem.is_locked


def fds_and_maps() -> tuple[int, int]:
    gc.collect()
    with open("/proc/self/maps") as maps:
        return len(os.listdir("/proc/self/fd")), sum(1 for _ in maps)


# ---- direct construction ------------------------------------------------------------------------


BAD_NUMBERS = [(True, TypeError), (numpy.int64(-1), ValueError), (1.0, TypeError),
               (math.nan, TypeError), (math.inf, TypeError), (-1, ValueError),
               (1 << 70, (ValueError, OverflowError, IndexError)), ("1", TypeError), (None, TypeError)]


@pytest.mark.parametrize("field", ["first", "npages", "nbytes"])
@pytest.mark.parametrize("value,error", BAD_NUMBERS, ids=[repr(v) for v, _ in BAD_NUMBERS])
@pytest.mark.parametrize("backend", ["madvfree", "simulated"])
def test_direct_construction_with_bogus_numbers_is_refused(field, value, error, backend):
    segment = _core.Segment(2) if backend == "madvfree" else SimSegment(2)
    segment.claim_span(0, 2)
    args = {"first": 0, "npages": 2, "nbytes": 2 * PAGE} | {field: value}
    with pytest.raises(error):
        Memory(None, segment, args["first"], args["npages"], args["nbytes"], backend=backend)
    # nothing taken: the right memory can still be made over the span, and works
    mem = Memory(None, segment, 0, 2, 2 * PAGE, backend=backend)
    data = filled(mem)
    assert_intact(mem, data)
    mem.close()


def test_direct_construction_with_bogus_owners_or_segments_is_refused():
    segment = _core.Segment(1)
    segment.claim_span(0, 1)
    for owner, segment_, error in ((object(), segment, TypeError),  # not a SpanOwner
                                   (None, segment, TypeError),      # no owner and no backend
                                   (None, object(), TypeError), (None, "segment", TypeError),
                                   (None, None, TypeError)):
        with pytest.raises(error):
            Memory(owner, segment_, 0, 1, 1, **({} if segment_ is segment else
                                                {"backend": "madvfree"}))

    class HalfASegment:  # claim_span and mutex, but no npages to check a range against
        mutex = threading.Lock()

        def claim_span(self, first, count):
            pass

    with pytest.raises(TypeError):
        Memory(None, HalfASegment(), 0, 1, 1, backend="madvfree")
    with pytest.raises(ValueError, match="not handed out"):
        Memory(None, _core.Segment(1), 0, 1, 1, backend="madvfree")  # nobody claimed it
    sim = SimSegment(2)
    with pytest.raises(IndexError):
        Memory(None, sim, 1, 2, PAGE, backend="simulated")
    sim.close()
    segment.release_span(0, 1)
    segment.close()


@pytest.mark.parametrize("kind", COMPILED_KINDS)
def test_a_second_memory_over_a_held_span_is_refused(kind):
    mem, manager = make(kind)
    data = filled(mem)
    for owner in (None, manager):
        if owner is None and manager is None:
            error = RuntimeError
        else:
            error = (RuntimeError, ValueError)
        with pytest.raises(error):
            Memory(owner, mem.segment, mem.first, mem.npages, mem.nbytes, backend=mem.backend)
    assert_intact(mem, data)
    if manager is not None:
        # a manager's segment: a memory of its own over the whole of it is refused too
        with pytest.raises((RuntimeError, ValueError)):
            Memory(None, mem.segment, 0, mem.segment.npages, PAGE, backend=mem.backend)
        assert manager.stats()["locked_bytes"] == mem.npages * PAGE
    mem.close()


def test_the_owner_record_cannot_be_replaced():
    manager = DiscardableMemoryManager(1 << 24, "madvfree")
    a, b = manager.allocate(PAGE), manager.allocate(PAGE)
    with pytest.raises(AttributeError):
        a.ticket = b.ticket  # a's lock() would then lock b's span
    a.close(), b.close()


def test_subclasses_work_and_are_checked_alike():
    class Tagged(Memory):
        def describe(self):
            return f"tagged {self.nbytes}"

    segment = _core.Segment(1, "memfd")
    segment.claim_span(0, 1)
    with pytest.raises(TypeError):
        Tagged(None, segment, 0, 1, True, backend="memfd")
    mem = Tagged(None, segment, 0, 1, 100, backend="memfd")
    mem.note = "a caller's attribute"
    assert mem.describe() == "tagged 100" and mem.note == "a caller's attribute"
    data = filled(mem)
    assert_intact(mem, data)
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError):
            duplicate(mem)
    mem.close()
    assert segment.closed


# ---- the segment under the memory ---------------------------------------------------------------


@pytest.mark.parametrize("kind", COMPILED_KINDS)
def test_segment_span_methods_on_a_held_span_are_refused(kind):
    mem, manager = make(kind)
    data = filled(mem)
    segment, span = mem.segment, (mem.first, mem.npages)
    before = manager.stats() if manager else None
    for call in (segment.lock_span, segment.unlock_span, segment.release_span,
                 segment.claim_span, segment.discard_span, segment.reclaim_span,
                 lambda *s: segment.unlock_spans([s])):
        with pytest.raises(RuntimeError):
            call(*span)
    with pytest.raises(RuntimeError):
        segment.close()
    assert (manager.stats() if manager else None) == before
    assert_intact(mem, data)
    mem.unlock()
    # unlocked, the span is still the memory's: only a discard may come from outside, and it is
    # a purge like any other, reported by the next lock
    for call in (segment.lock_span, segment.unlock_span, segment.release_span,
                 segment.claim_span):
        with pytest.raises(RuntimeError):
            call(*span)
    segment.discard_span(*span)
    assert mem.lock() is False and mem.purged_pages == mem.npages
    mem.close()
    if manager is not None:
        assert manager.stats()["allocated_bytes"] == 0


def test_a_segment_on_its_own_still_takes_any_span_call():
    segment = _core.Segment(4)
    segment.unlock_span(0, 4)
    segment.discard_span(1, 1)
    assert segment.lock_span(0, 4) in (1, 2, 3, 4)
    segment.release_span(0, 2)  # never claimed: the segment can still close afterwards
    segment.close()


def test_a_segment_refuses_to_hand_a_span_out_twice_or_unlock_it_twice():
    segment = _core.Segment(4, "memfd")
    segment.claim_span(0, 2)
    with pytest.raises(RuntimeError, match="already handed out"):
        segment.claim_span(1, 2)
    segment.unlock_span(0, 2)
    segment.discard_span(0, 2)
    with pytest.raises(RuntimeError, match="not locked"):
        segment.unlock_span(0, 2)  # a second unlock
    with pytest.raises(ValueError, match="overlap"):
        segment.unlock_spans([(2, 2), (3, 1)])
    assert segment.lock_span(0, 2) == 2  # the discard is still reported
    with pytest.raises(RuntimeError, match="already locked"):
        segment.lock_span(0, 2)
    with pytest.raises(RuntimeError, match="never discarded"):
        segment.discard_span(0, 1)
    segment.release_span(0, 2)
    segment.close()


@pytest.mark.parametrize("backend", [b for b in MANAGED if b != "simulated"])
def test_owner_calls_made_directly_are_refused(backend):
    manager = DiscardableMemoryManager(1 << 24, backend)
    mem = manager.allocate(PAGE)
    data = filled(mem)
    with pytest.raises(RuntimeError, match="already locked"):
        manager.lock_span(mem)
    with pytest.raises(RuntimeError, match="still locked"):
        mem.mark_unlocked()
    assert manager.stats()["locked_bytes"] == PAGE
    assert_intact(mem, data)
    mem.unlock()
    with pytest.raises(RuntimeError, match="not locked"):
        manager.unlock_span(mem)
    assert manager.stats()["locked_bytes"] == 0 and not mem.is_locked
    mem.close()
    alone = discache.allocate(PAGE, backend)
    with pytest.raises(RuntimeError, match="owner"):
        alone.mark_unlocked()
    assert alone.is_locked
    alone.close()


def test_memory_of_one_manager_is_refused_by_another():
    one, two = (DiscardableMemoryManager(1 << 24, "madvfree") for _ in range(2))
    mem = one.allocate(PAGE)
    data = filled(mem)
    for call in (two.lock_span, two.unlock_span, two.close_span, two.purge_span,
                 two.reclaim_span, two.span_buffer, lambda m: two.unlock_many([m])):
        with pytest.raises(ValueError):
            call(mem)
    assert two.stats()["allocated_bytes"] == 0 and one.stats()["locked_bytes"] == PAGE
    assert_intact(mem, data)
    mem.close()


# ---- an owner callback interrupted (KeyboardInterrupt) ------------------------------------------


class Interrupted(DiscardableMemoryManager):
    """A manager whose span calls are interrupted before or after doing their work."""

    when: str | None = None

    def _call(self, name, mem):
        if self.when == "before":
            raise KeyboardInterrupt
        result = getattr(super(), name)(mem)
        if self.when == "after":
            raise KeyboardInterrupt
        return result

    def lock_span(self, mem):
        return self._call("lock_span", mem)

    def unlock_span(self, mem):
        return self._call("unlock_span", mem)

    def close_span(self, mem):
        return self._call("close_span", mem)


@pytest.mark.parametrize("backend", MANAGED)
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("operation", ["lock", "unlock", "close"])
def test_an_interrupted_owner_call_leaves_memory_and_owner_agreeing(backend, when, operation):
    manager = Interrupted(1 << 24, backend)
    mem = manager.allocate(PAGE)
    data = filled(mem)
    if operation == "lock":
        mem.unlock()
    manager.when = when
    with pytest.raises(KeyboardInterrupt):
        getattr(mem, operation)()
    manager.when = None
    stats = manager.stats()
    assert mem.closed == (stats["allocated_bytes"] == 0)
    assert mem.is_locked == (stats["locked_bytes"] == PAGE)
    done = when == "after"
    expected = {"lock": mem.is_locked, "unlock": not mem.is_locked, "close": mem.closed}
    assert expected[operation] == done
    if mem.closed:
        return
    if operation == "lock" and done:
        assert mem.purged_pages == mem.npages  # the lock's answer was lost: report it purged
    # and it goes on working: unlock, lock, close
    if mem.is_locked:
        mem.unlock()
    if mem.lock():
        assert mem.read() == data
    mem.close()
    assert manager.stats()["allocated_bytes"] == 0


def interrupt_at_line(function, nth: int):
    """A trace function raising KeyboardInterrupt at the nth line event of the manager's
    function (as a signal handler's exception could), and a list that counts the events."""
    from discache import manager as manager_module

    events: list[int] = []

    def trace(frame, event, arg):
        if (frame.f_code.co_name != function
                or frame.f_code.co_filename != manager_module.__file__):
            return None

        def each_line(frame, event, arg):
            if event == "line":
                events.append(frame.f_lineno)
                if len(events) == nth:
                    raise KeyboardInterrupt
            return each_line

        return each_line

    return trace, events


@pytest.mark.parametrize("backend", MANAGED)
@pytest.mark.parametrize("operation", ["lock", "unlock", "close"])
def test_an_interrupt_at_any_line_of_the_manager_never_strands_the_memory(backend, operation):
    for nth in range(1, 60):
        manager = DiscardableMemoryManager(1 << 24, backend)
        mem = manager.allocate(PAGE)
        data = filled(mem)
        if operation == "lock":
            mem.unlock()
        trace, events = interrupt_at_line(f"{operation}_span", nth)
        sys.settrace(trace)
        try:
            getattr(mem, operation)()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if len(events) < nth:
            break  # ran to the end: every line has been interrupted once
        # whatever the memory believes now, the segment agrees: locked memory is never purged,
        # and the manager follows at the next call
        manager.release_free_memory()
        if mem.is_locked:
            assert mem.read() == data or mem.purged_pages == mem.npages
        if not mem.closed:
            if mem.is_locked:
                mem.unlock()
            if mem.lock():
                assert mem.read() == data
            mem.unlock()
            mem.lock()
        mem.close()
        stats = manager.stats()
        assert stats["allocated_bytes"] == stats["locked_bytes"] == stats["purged_bytes"] == 0, nth
    else:
        raise AssertionError("the manager's call never ran to its end")


# ---- views kept across unlock, close, collection -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("view", ["slice", "numpy", "memoryview(mem)", "with data as v: slice"])
def test_a_kept_view_refuses_unlock_and_close_and_stays_readable(kind, view):
    mem, manager = make(kind)
    data = filled(mem, 0x33)
    if view == "slice":
        kept = mem.data[PAGE - 3:PAGE + 3]
    elif view == "numpy":
        kept = numpy.frombuffer(mem.data, dtype=numpy.uint8)[PAGE - 3:PAGE + 3]
    elif view == "memoryview(mem)":
        kept = memoryview(mem)[PAGE - 3:PAGE + 3]
    else:
        with mem.data as whole:
            kept = whole[PAGE - 3:PAGE + 3]
    for refused in (mem.unlock, mem.close):
        with pytest.raises(BufferError):
            refused()
        assert mem.is_locked and not mem.closed
        assert bytes(kept) == data[:6]  # the mapping is still there: no dangling pointer
    kept[0] = 0x44  # still writable, and still the memory's bytes
    assert mem.read(PAGE - 3, 1) == b"\x44"
    if manager is not None:
        with pytest.raises(BufferError):
            manager.unlock_many([mem])
        assert mem.is_locked and manager.stats()["locked_bytes"] == mem.nbytes
    del kept
    gc.collect()
    mem.unlock()
    assert mem.lock() in (True, False)
    mem.close()
    assert mem.closed


@pytest.mark.parametrize("kind", KINDS)
def test_a_view_outlives_its_dropped_memory_and_then_everything_goes(kind):
    before = fds_and_maps()
    mem, manager = make(kind, npages=3)
    data = filled(mem, 0x61)
    view = mem.data[2 * PAGE:]
    del mem
    gc.collect()
    if manager is not None:
        assert manager.stats()["allocations"] == 1  # the span waits for the view
    assert bytes(view[:4]) == data[:4]
    view[:4] = b"kept"
    assert bytes(view[:4]) == b"kept"
    del view
    gc.collect()
    if manager is not None:
        assert manager.stats()["allocations"] == 0 and manager.segment_count == 0
        del manager
    after = fds_and_maps()
    assert after[0] == before[0]
    assert abs(after[1] - before[1]) <= 2


@pytest.mark.parametrize("backend", MANAGED)
def test_a_view_outlives_its_memory_and_its_manager(backend):
    DiscardableMemoryManager(1 << 24, backend).allocate(PAGE).close()  # warm up
    before = fds_and_maps()
    manager = DiscardableMemoryManager(1 << 24, backend)
    mem = manager.allocate(2 * PAGE)
    data = filled(mem, 0x4B)
    view = mem.data[PAGE:]
    del mem, manager
    gc.collect()
    assert bytes(view) == data[PAGE:]  # the segment stays mapped for the view
    view[:1] = b"\0"
    del view
    after = fds_and_maps()
    assert after[0] == before[0]
    assert abs(after[1] - before[1]) <= 2


@pytest.mark.parametrize("kind", KINDS)
def test_memory_dropped_without_close_leaks_nothing(kind):
    make(kind)  # warm up (imports, the simulated kernel, the SIGBUS handler)
    before = fds_and_maps()
    for _ in range(50):
        mem, manager = make(kind)
        filled(mem)
        if _ % 2:
            mem.unlock()
        del mem, manager
    after = fds_and_maps()
    assert after[0] == before[0]
    assert abs(after[1] - before[1]) <= 2


# ---- the same memory from two threads ------------------------------------------------------------

ALLOWED = (RuntimeError, ValueError, BufferError, discache.PurgedError)


def hammer(mem, seconds: float = 0.4) -> list[BaseException]:
    """Two threads doing everything to mem at once; returns what was not an allowed refusal."""
    pattern = b"\x5a" * 64
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def work(seed: int):
        step = seed
        while not stop.is_set():
            step = (step * 1103515245 + 12345) % 2 ** 31
            action = step % 9
            try:
                if action == 0:
                    mem.lock()
                elif action == 1:
                    mem.unlock()
                elif action == 2:
                    view = mem.data
                    view[:64] = pattern
                    del view
                elif action == 3:
                    mem.read(0, 64)
                elif action == 4:
                    mem.write(pattern)
                elif action == 5:
                    discache.force_reclaim(mem)
                elif action == 6:
                    with memoryview(mem) as view:
                        bytes(view[:8])
                elif action == 7:
                    mem._purge()
                elif step % 97 == 0:
                    mem.close()
            except ALLOWED:
                pass
            except BaseException as error:  # noqa: BLE001 - collected for the assertion
                unexpected.append(error)
                return

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a thread hangs"
    return unexpected


# BIG pages: the page loops that run without the GIL (the simulated kernel has none)
@pytest.mark.parametrize("kind, npages", [
    pytest.param(kind, npages, id=f"{kind}-{npages} page{'s' * (npages > 1)}")
    for kind in KINDS for npages in (1, BIG)
    if npages == 1 or not kind.endswith("simulated")])
def test_two_threads_doing_everything_to_one_memory(kind, npages):
    mem, manager = make(kind, npages)
    assert hammer(mem) == []
    if not mem.closed:
        if not mem.is_locked and not mem.lock():
            assert mem.purged_pages > 0
        data = filled(mem, 0x77)
        assert_intact(mem, data)
        mem.close()
    if manager is not None:
        stats = manager.stats()
        assert stats["allocated_bytes"] == stats["locked_bytes"] == stats["purged_bytes"] == 0


@pytest.mark.parametrize("backend", [b for b in MANAGED if b != "simulated"])
def test_a_big_span_locked_in_one_thread_leaves_its_neighbours_usable(backend):
    # Two spans of one manager segment: the big one's page loop runs without the GIL, and the
    # other memory must not be refused as "in use by another thread" meanwhile.
    manager = DiscardableMemoryManager(1 << 30, backend, segment_bytes=(BIG + 16) * PAGE)
    big, small = manager.allocate(BIG * PAGE), manager.allocate(PAGE)
    assert big.segment is small.segment
    filled(big)  # written pages: the loops have work to do
    data = filled(small, 0x21)
    stop, errors = threading.Event(), []

    def use_small():
        while not stop.is_set():
            try:
                assert small.read(0, 8) == data[:8]
                small.write(data[:8])
            except BaseException as error:  # noqa: BLE001
                errors.append(error)
                return

    thread = threading.Thread(target=use_small)
    thread.start()
    for _ in range(30):
        big.unlock()
        big.lock()
    stop.set()
    thread.join()
    assert errors == []
    assert_intact(small, data)
    big.close(), small.close()


# ---- fork ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [f"allocate-{b}" for b in COMPILED] + ["manager-madvfree"])
def test_a_child_forked_in_the_middle_of_a_big_lock_or_unlock_can_use_the_memory(kind):
    # The fork can land while another thread's page loop runs without the GIL: the child has no
    # such thread, and its memory must neither stay "in use" forever nor hold stray cookies.
    mem, manager = make(kind, BIG)
    data = filled(mem, 0x64)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            mem.unlock()
            mem.lock()  # a purge here is the kernel's right: the child checks what lock() says

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.alarm(20)
                    ok = True
                    if mem.is_locked:
                        ok = mem.read(0, 8) == data[:8] and mem.read(mem.nbytes - 8) == data[:8]
                        mem.unlock()
                    if mem.lock():
                        ok = ok and mem.read(0, 8) == data[:8]
                    mem.close()
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        thread.join()
    mem.close()


# ---- DiscardableSharedMemory ---------------------------------------------------------------------


def test_shared_memory_opened_from_what_is_not_a_sealed_memfd_is_refused(tmp_path):
    shm = DiscardableSharedMemory.create(PAGE)
    read_end, write_end = os.pipe()
    regular = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    os.ftruncate(regular, 2 * PAGE)
    readonly = os.open(f"/proc/self/fd/{shm.fileno()}", os.O_RDONLY)
    writeonly = os.open(f"/proc/self/fd/{shm.fileno()}", os.O_WRONLY)
    path_only = os.open(f"/proc/self/fd/{shm.fileno()}", os.O_PATH)
    # the segment's very bytes, in a memfd sealed against writes: mmap says EPERM
    write_sealed = os.memfd_create("copy", os.MFD_ALLOW_SEALING)
    os.write(write_sealed, os.pread(shm.fileno(), 2 * PAGE, 0))
    fcntl.fcntl(write_sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                | fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE)
    opened = (read_end, write_end, regular, readonly, writeonly, path_only, write_sealed)
    before = fds_and_maps()[0]
    try:
        for fd in opened + (10_000, -1):
            with pytest.raises(ValueError):
                DiscardableSharedMemory.open(fd, PAGE)
        for fd in (True, 1.5, "3", None):
            with pytest.raises(TypeError):
                DiscardableSharedMemory.open(fd, PAGE)
        assert fds_and_maps()[0] == before
    finally:
        for fd in opened:
            os.close(fd)
    shm.close()


def test_shared_memory_closed_while_views_live_then_used_after_close():
    shm = DiscardableSharedMemory.create(2 * PAGE)
    shm.data[:4] = b"live"
    kept = shm.data[:4]
    array = numpy.frombuffer(shm, dtype=numpy.uint8)
    with pytest.raises(BufferError):
        shm.close()
    assert not shm.closed and bytes(kept) == b"live" and array[0] == ord("l")
    shm.unlock()
    del kept, array
    shm.close()
    shm.close()
    for call in (shm.lock, shm.unlock, shm.purge, shm.fileno, shm.is_memory_locked,
                 shm.is_memory_resident, lambda: shm.data, lambda: memoryview(shm),
                 lambda: discache.force_reclaim(shm)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_shared_memory_in_a_forked_child_with_a_thread_purging():
    shm = DiscardableSharedMemory.create(64 * PAGE)
    shm.data[:5] = b"hello"
    shm.unlock()
    stop = threading.Event()

    def purge_loop():
        while not stop.is_set():
            shm.purge()

    thread = threading.Thread(target=purge_loop)
    thread.start()
    try:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.alarm(20)
                    result = shm.lock()
                    while result is discache.LockResult.FAILED:
                        result = shm.lock()
                    shm.data[:5] = b"child"
                    shm.unlock()
                    code = 0 if shm.purge() in (True, False) else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        thread.join()
    assert not shm.is_memory_locked()
    shm.close()


# ---- SIGBUS mode with the signal handler replaced ------------------------------------------------


def run_child(body: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif("madvfree-sigbus" not in AVAILABLE, reason="madvfree-sigbus does not run here")
@pytest.mark.parametrize("replace", ["signal.signal(signal.SIGBUS, signal.SIG_DFL)",
                                     "signal.signal(signal.SIGBUS, signal.SIG_IGN)",
                                     "faulthandler.enable()"])
def test_sigbus_mode_in_a_forked_child_with_the_handler_replaced(replace):
    result = run_child(f"""
        import faulthandler, os, signal, threading
        import discache
        mem = discache.allocate(8 * 4096, sigbus=True)
        mem.data[:] = b"\\x07" * mem.nbytes
        mem.unlock()
        pid = os.fork()
        if pid == 0:
            {replace}
            out = []
            def use():
                out.append(mem.read(0, 1))
                mem._purge()
                try:
                    mem.read(0, 1)
                except discache.PurgedPageError:
                    out.append("guarded")
                out.append(mem.lock())
                out.append(mem.purged_pages)
            thread = threading.Thread(target=use)
            thread.start(); thread.join()
            print(out, flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), mem.read(0, 1), mem.lock())
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "[b'\\x07', 'guarded', False, 8]\nchild 0 b'\\x07' True\n"


SEGMENT_ACCESS = {
    "segment.read": ("mem.segment.read(0, 4)", "PurgedPageError"),
    "segment.write": ("mem.segment.write(4096, b'x')", "PurgedPageError"),
    "memoryview(segment)": ("bytes(memoryview(mem.segment)[:4])", "BufferError"),
    "span_buffer": ("bytes(memoryview(mem.segment.span_buffer(0, 4096))[:4])", "BufferError"),
}


@pytest.mark.skipif("madvfree-sigbus" not in AVAILABLE, reason="madvfree-sigbus does not run here")
@pytest.mark.parametrize("access", SEGMENT_ACCESS.values(), ids=SEGMENT_ACCESS.keys())
def test_the_segment_of_sigbus_memory_never_lets_a_discarded_page_kill_the_process(access):
    code, error = access
    result = run_child(f"""
        import discache
        mem = discache.allocate(4 * 4096, sigbus=True)
        mem.data[:] = b"\\x07" * mem.nbytes
        assert mem.segment.read(0, 2) == b"\\x07\\x07"   # locked: the guarded copy just copies
        mem.unlock()
        mem._purge()
        try:
            {code}
            print("no error")
        except (discache.PurgedPageError, BufferError) as error:
            print(type(error).__name__)
        print(mem.lock(), mem.purged_pages, mem.segment.read(0, 1))
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == f"{error}\nFalse 4 b'\\x00'\n"


def test_a_segment_given_a_file_that_is_not_a_big_enough_memfd_is_refused(tmp_path):
    # A shared Segment punches holes in the file it maps: given fd=True (fd 1) or a regular file
    # it zeroed the user's file; given a memfd smaller than itself, a page past its end killed
    # the process by SIGBUS.
    regular = os.open(tmp_path / "precious", os.O_RDWR | os.O_CREAT)
    os.write(regular, b"precious" * 1024)
    small = os.memfd_create("small")
    os.ftruncate(small, PAGE)
    read_end, write_end = os.pipe()
    before = fds_and_maps()
    try:
        for fd, error in ((True, TypeError), (1.0, TypeError), (regular, ValueError),
                          (small, ValueError), (read_end, ValueError), (10_000, ValueError)):
            with pytest.raises(error):
                _core.Segment(4, "memfd", fd=fd)
        assert fds_and_maps() == before
        assert os.pread(regular, 8, 0) == b"precious"
        segment = _core.Segment(1, "memfd", fd=small)  # its very size: shared as asked
        segment.write(0, b"shared")
        assert os.pread(small, 6, 0) == b"shared"
        segment.discard_span(0, 1)
        assert os.pread(small, 6, 0) == bytes(6)
        segment.close()
    finally:
        for fd in (regular, small, read_end, write_end):
            os.close(fd)
