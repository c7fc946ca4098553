"""DiscardableCache used carelessly, hostilely and from many threads at once (issue 10's redesign).

Each test names the behaviour it expects; its docstring says what happened when it was written
and what should happen.  Risky cases (crashes, deadlocks) run in a subprocess with a timeout."""
import copy
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from discache import PinnedError, force_reclaim
from discache.cache import DiscardableCache, cached
from discache.manager import PAGE, DiscardableMemoryManager

REAL = ["madvfree", "memfd"]
BACKENDS = REAL + ["simulated"]
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(backend="madvfree", maxsize=1 << 20, **kwargs):
    kwargs.setdefault("manager", DiscardableMemoryManager(64 << 20, backend))
    kwargs.setdefault("idle_unlock", None)  # no timer unless a test asks for one
    return DiscardableCache(maxsize, **kwargs)


def pattern(key, size):
    """Bytes that differ per key and per position, so a stale, zeroed or foreign value shows."""
    seed = hash(key) & 0xFF
    return bytes((seed + i * 7) & 0xFF for i in range(min(size, 251))) * (size // 251) + bytes(
        (seed + i * 7) & 0xFF for i in range(size % 251))


def consistency_problems(cache):
    """What is wrong between the dict, the LRU list, currsize and the slabs' slot counts."""
    problems = []
    lru = cache._lru()
    entries = dict(cache.entries_)
    if len(lru) != len(entries) or any(entries.get(e.key) is not e for e in lru):
        problems.append(f"LRU list has {len(lru)} entries, the dict {len(entries)}")
    weights = sum(e.weight for e in entries.values())
    if weights != cache.currsize:
        problems.append(f"currsize {cache.currsize} != sum of weights {weights}")
    live = sum(slab.live for slab in cache._slabs)
    with_slab = sum(1 for e in entries.values() if e.slab is not None)
    if live != with_slab:
        problems.append(f"slabs hold {live} live slots for {with_slab} entries")
    return problems


def run_python(code, timeout=30):
    """Run code in a fresh interpreter on this tree; (returncode, stdout+stderr)."""
    env = dict(os.environ, PYTHONPATH=HERE)
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
    return done.returncode, done.stdout + done.stderr


class HashFailsOnce:
    """A key whose __hash__ raises on one chosen call (counted across all instances)."""

    calls = 0
    fail_at = None

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        HashFailsOnce.calls += 1
        if HashFailsOnce.calls == HashFailsOnce.fail_at:
            raise RuntimeError("hash fails")
        return hash(self.name)

    def __eq__(self, other):
        return isinstance(other, HashFailsOnce) and other.name == self.name


class EqFailsOnce:
    """Keys that all collide, whose __eq__ raises on one chosen call."""

    calls = 0
    fail_at = None

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        return 7

    def __eq__(self, other):
        EqFailsOnce.calls += 1
        if EqFailsOnce.calls == EqFailsOnce.fail_at:
            raise RuntimeError("eq fails")
        return isinstance(other, EqFailsOnce) and other.name == self.name

    def __repr__(self):
        return f"EqFailsOnce({self.name})"


# ---------------------------------------------------------------------- values


@pytest.mark.parametrize("make_array", [
    lambda: np.arange(100, dtype=np.int32)[::2],
    lambda: np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    lambda: np.arange(10, dtype=np.int16)[::-1],
], ids=["strided", "fortran", "reversed"])
def test_a_non_contiguous_numpy_array_is_stored_as_its_c_order_bytes(make_array):
    """Now: numpy raises ValueError ("ndarray is not C-contiguous"), not BufferError, for a
    PyBUF_SIMPLE request, so _store's copy fallback never runs and the set raises ValueError
    (and discache.cached takes that ValueError for "too large": returned uncached, counted as
    too_large).  Should: store the array's C-order bytes, weighing its nbytes, as the docs say."""
    cache = make()
    array = make_array()
    cache["a"] = array
    assert cache["a"] == array.tobytes()
    assert cache.currsize == array.nbytes


def test_getsizeof_sees_the_value_as_given_even_when_it_is_copied():
    """Now (with the copy fallback of a non-contiguous value): getsizeof is handed the bytes
    copy, or never called since the set fails first; a getsizeof written for the user's type
    (lambda a: a.size * 2) breaks.  Should: getsizeof(value) gets the value the user passed,
    as cachetools does."""
    cache = make(getsizeof=lambda a: int(a.size) * 2)
    array = np.arange(100, dtype=np.int32)[::2]
    cache["a"] = array
    assert cache.currsize == 100
    assert cache["a"] == array.tobytes()


def test_a_zero_dimensional_array_and_a_strided_memoryview_round_trip():
    """Held: a 0-d array weighs its itemsize; a strided memoryview of a bytearray is copied."""
    cache = make()
    cache["zero-d"] = np.array(5, dtype=np.int64)
    assert cache["zero-d"] == np.array(5, dtype=np.int64).tobytes()
    assert cache.currsize == 8
    cache["strided"] = memoryview(bytearray(b"0123456789"))[::2]
    assert cache["strided"] == b"02468"
    assert cache.currsize == 13


def test_a_huge_maxsize_is_refused_with_valueerror_or_accepted():
    """Now: maxsize=2**63 (or 2**64) raises OverflowError from the constructor, and a getsizeof
    returning 2**70 raises OverflowError from the set (so discache.cached raises instead of
    returning the value uncached).  Should: a maxsize beyond what C holds is accepted as
    unbounded (cachetools takes any int) or refused with ValueError, as documented; a weight
    beyond it is "too large" (ValueError)."""
    manager = DiscardableMemoryManager(64 << 20, "madvfree")
    try:
        cache = DiscardableCache(2 ** 64, manager=manager, idle_unlock=None)
    except ValueError:
        pass
    else:
        cache["a"] = b"a"
        assert cache["a"] == b"a"
    cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=None,
                             getsizeof=lambda v: 2 ** 70)
    with pytest.raises(ValueError):
        cache["a"] = b"a"
    assert len(cache) == 0


# ---------------------------------------------------------------------- hostile keys


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_key_whose_hash_raises_during_a_set_changes_nothing(fail_at):
    """Now: __hash__ is called 3 times by a set of a new key; if the 2nd call raises, the slot
    claimed for the value is never given back (a slab counts a live slot no entry owns); if the
    3rd raises, the entry is in the LRU list but not in the dict, so a later eviction or clear()
    raises KeyError.  Should: the set raises and the cache is exactly as before."""
    cache = make(maxsize=300)
    cache[HashFailsOnce("old")] = b"o" * 100
    HashFailsOnce.calls, HashFailsOnce.fail_at = 0, fail_at
    try:
        try:
            cache[HashFailsOnce("new")] = b"n" * 100
        except RuntimeError:
            assert HashFailsOnce("new") not in cache
    finally:
        HashFailsOnce.fail_at = None
    assert consistency_problems(cache) == []
    cache["x"] = b"x" * 150
    cache["y"] = b"y" * 150  # evicts everything older
    cache.clear()
    assert len(cache) == 0 and cache.currsize == 0


@pytest.mark.parametrize("operation", ["set_new", "set_with_eviction", "replace_other_class",
                                       "delete", "pop", "popitem"])
@pytest.mark.parametrize("fail_at", range(1, 8))
def test_a_key_whose_eq_raises_leaves_the_cache_consistent(operation, fail_at):
    """Now: with colliding keys whose __eq__ raises on its Nth call, a set can leave a claimed
    slot owned by no entry, or an entry in the LRU list but not the dict (clear() then raises
    KeyError); del/pop/popitem can unlink an entry from the LRU list and leave it in the dict
    (never evicted again, still counted in currsize).  Should: the operation raises and changes
    nothing, or completes; dict, LRU list, currsize and slabs always agree."""
    cache = make(maxsize=300 if operation == "set_with_eviction" else 1 << 20)
    keys = [EqFailsOnce(i) for i in range(3)]
    EqFailsOnce.fail_at = None
    for key in keys:
        cache[key] = bytes([key.name]) * 100
    cache.get(keys[0])  # keys[1] is the least recently used
    actions = {
        "set_new": lambda: cache.__setitem__(EqFailsOnce(8), b"n" * 10),
        "set_with_eviction": lambda: cache.__setitem__(EqFailsOnce(9), b"n" * 100),
        "replace_other_class": lambda: cache.__setitem__(keys[1], b"r" * 5000),
        "delete": lambda: cache.__delitem__(keys[1]),
        "pop": lambda: cache.pop(keys[1]),
        "popitem": cache.popitem,
    }
    EqFailsOnce.calls, EqFailsOnce.fail_at = 0, fail_at
    try:
        actions[operation]()
    except RuntimeError:
        pass
    finally:
        EqFailsOnce.fail_at = None
    assert consistency_problems(cache) == []
    for key, got in cache.items():
        assert got in (bytes([key.name]) * 100, b"n" * 10, b"n" * 100, b"r" * 5000)
    cache.clear()
    assert len(cache) == 0 and cache.currsize == 0


# ---------------------------------------------------------------------- hostile callbacks


def test_on_evict_raising_inside_view_does_not_leave_the_entry_pinned():
    """Now: view() pins the entry, then reports pending purges; when on_evict raises there,
    the exception leaves view() before the memoryview exists, and the pin is never released:
    the entry can never be deleted, replaced, unlocked or purged again.  Should: the pin is
    undone (or the report happens before pinning)."""
    def on_evict(key, reason):
        raise RuntimeError("on_evict fails")

    cache = make(on_evict=on_evict)
    cache["lost"] = b"l" * 40000  # a slab of its own
    cache["kept"] = b"k" * 100
    cache.pin("kept")
    force_reclaim(cache)
    cache.unpin("kept")
    reported = []
    old_hook, sys.unraisablehook = sys.unraisablehook, reported.append
    try:
        with pytest.raises(KeyError):
            with cache.view("lost"):
                pass
    finally:
        sys.unraisablehook = old_hook
    # on_evict's failure beside the KeyError is not lost: it goes to sys.unraisablehook
    assert [type(u.exc_value) for u in reported] == [RuntimeError]
    try:
        with cache.view("kept"):
            pass
    except RuntimeError:
        pass
    assert cache.stats()["pinned_entries"] == 0
    cache.on_evict_ = None
    del cache["kept"]


def test_on_evict_raising_still_reports_every_other_eviction():
    """Now: when on_evict raises for one key, the other keys evicted or found purged by the
    same call are never reported (a set evicting 3 entries reports 1; a purged slab of 5
    entries reports 1) -- a silent loss.  Should: every eviction reaches on_evict; the
    exception may surface afterwards."""
    reported = []

    def on_evict(key, reason):
        reported.append((key, reason))
        raise RuntimeError("on_evict fails")

    cache = make(maxsize=300, on_evict=on_evict)
    for i in range(3):
        cache[i] = b"x" * 100
    with pytest.raises(RuntimeError):
        cache["big"] = b"y" * 300
    assert sorted(reported) == [(0, "size"), (1, "size"), (2, "size")]

    reported.clear()
    cache = make(on_evict=on_evict)
    for i in range(5):
        cache[i] = b"z" * 100  # one slab
    force_reclaim(cache)
    try:
        cache.get(0)
    except RuntimeError:
        pass
    try:
        list(cache)
    except RuntimeError:
        pass
    assert sorted(reported) == [(i, "purged") for i in range(5)]


def test_a_purge_found_by_view_or_pin_is_reported_before_keyerror():
    """Now: view() and pin() of a purged key raise KeyError without reporting the purge; the
    report waits in events_ for some later call.  Should: on_evict(key, "purged") has run by
    the time KeyError reaches the caller, as get() does."""
    reported = []
    cache = make(on_evict=lambda key, reason: reported.append((key, reason)))
    cache["a"] = b"a" * 40000
    cache["b"] = b"b" * 40000
    force_reclaim(cache)
    with pytest.raises(KeyError):
        with cache.view("a"):
            pass
    assert reported == [("a", "purged")]
    with pytest.raises(KeyError):
        cache.pin("b")
    assert reported == [("a", "purged"), ("b", "purged")]


def test_cached_and_get_or_create_return_a_value_larger_than_the_manager_uncached():
    """Now: with maxsize above the manager's limit, a value between the two passes the maxsize
    check and the manager's allocate raises MemoryError, out of the decorated function and out
    of get_or_create.  Should: such a value is too large for this cache: returned uncached
    (counted in too_large), as for a value above maxsize."""
    manager = DiscardableMemoryManager(16 * PAGE, "madvfree")
    cache = DiscardableCache(1 << 30, manager=manager, idle_unlock=None)
    big = b"b" * (32 * PAGE)

    @cached(cache)
    def produce(n):
        return big

    assert produce(1) == big
    assert cache.get_or_create("k", lambda: big) == big
    assert len(cache) == 0 and cache.stats()["too_large"] == 2


# ---------------------------------------------------------------------- the end of a process


@pytest.mark.parametrize("backend", REAL)
def test_a_view_alive_at_exit_stays_readable_until_the_interpreter_is_gone(backend):
    """Now: the cache's weakref.finalize runs at exit (atexit=True) and closes every slab,
    pinned ones included; a view still held -- read by an atexit handler registered before
    discache was imported, or by a daemon thread -- then reads unmapped memory: the interpreter
    dies with SIGSEGV (rc -11).  Should: a slab pinned by a live view is never freed under it."""
    code = f"""
        import atexit
        state = {{}}
        def read_view_at_exit():
            mv = state["mv"]
            assert bytes(mv[:4]) == b"kkkk" and mv[-1] == ord("k")
            print("read at exit", flush=True)
        atexit.register(read_view_at_exit)
        from discache.cache import DiscardableCache
        from discache.manager import DiscardableMemoryManager
        manager = DiscardableMemoryManager(64 << 20, {backend!r})
        cache = DiscardableCache(8 << 20, manager=manager, idle_unlock=None)
        cache["k"] = b"k" * (1 << 20)
        state["context"] = cache.view("k")
        state["mv"] = state["context"].__enter__()
    """
    returncode, output = run_python(code)
    assert (returncode, "read at exit" in output) == (0, True), output


@pytest.mark.parametrize("backend", REAL)
def test_fork_while_another_thread_holds_the_managers_lock_leaves_the_child_usable(backend):
    """Now: only the caches' locks (and the timer's) are held across fork; the manager's RLock
    is not.  A thread purging for memory pressure, or allocating from the shared manager, holds
    it at the fork in most children (37 of 40 with an allocating thread): the child's first
    cache set that needs a new slab waits for it forever.  Should: the manager's lock is taken
    before fork and reset in the child, as issue 10 asks ("fork resets the cache's and
    manager's locks in the child")."""
    code = f"""
        import os, signal, threading
        from discache.cache import DiscardableCache
        from discache.manager import PAGE, DiscardableMemoryManager
        manager = DiscardableMemoryManager(64 << 20, {backend!r})
        cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=0.001)
        for i in range(20):
            cache[i] = bytes([i]) * 3000
        stop = threading.Event()
        def allocate_from_the_manager():
            while not stop.is_set():
                manager.allocate(PAGE).close()
        def pressure():
            while not stop.is_set():
                manager.on_memory_pressure("critical")
        threads = [threading.Thread(target=allocate_from_the_manager),
                   threading.Thread(target=pressure)]
        for thread in threads:
            thread.start()
        hung = 0
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                signal.alarm(2)
                cache["child"] = b"c" * 40000  # a slab of its own: the manager allocates
                os._exit(0 if cache["child"] == b"c" * 40000 else 1)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code == -signal.SIGALRM:
                hung += 1
                break
            assert code == 0, code
        stop.set()
        for thread in threads:
            thread.join()
        print("hung", hung)
    """
    returncode, output = run_python(code)
    assert (returncode, "hung 0" in output) == (0, True), output


# ---------------------------------------------------------------------- careless keys


class MutableKey:
    """A key whose hash follows a field the program may change after storing it."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return hash(self.value)

    def __eq__(self, other):
        return isinstance(other, MutableKey) and other.value == self.value

    def __repr__(self):
        return f"MutableKey({self.value})"


def test_popitem_never_spins_forever_on_a_key_mutated_after_it_was_stored():
    """Now: the LRU entry's key no longer finds itself in the dict, so popitem() loops forever
    (it releases and retakes the lock each turn: the process hangs, 100% CPU).  A dict returns
    the entry; cachetools raises KeyError.  Should: popitem() returns (or raises) promptly."""
    code = """
        from discache.cache import DiscardableCache
        from discache.manager import DiscardableMemoryManager
        class MutableKey:
            def __init__(self, value):
                self.value = value
            def __hash__(self):
                return hash(self.value)
            def __eq__(self, other):
                return isinstance(other, MutableKey) and other.value == self.value
        cache = DiscardableCache(1 << 20, manager=DiscardableMemoryManager(1 << 24, "madvfree"),
                                 idle_unlock=None)
        key = MutableKey(1)
        cache[key] = b"a" * 100
        cache["b"] = b"b" * 100
        key.value = 2
        try:
            cache.popitem()
        except KeyError:
            pass
        print("popitem returned")
    """
    returncode, output = run_python(code, timeout=10)
    assert (returncode, "popitem returned" in output) == (0, True), output


def test_a_key_mutated_after_it_was_stored_does_not_break_other_keys():
    """Now: once the mutated key is the least recently used, a set that must evict raises
    KeyError (after storing its value) and leaves the mutated entry unlinked from the LRU list
    but in the dict, counted in currsize for ever; clear() then keeps it.  Should: sets of
    other keys keep working and dict, LRU list and currsize agree (evicting the lost entry,
    like dict.popitem can)."""
    cache = make(maxsize=300)
    key = MutableKey(1)
    cache[key] = b"a" * 100
    cache["b"] = b"b" * 100
    key.value = 2
    cache["c"] = b"c" * 200  # must evict the mutated entry (or "b" too)
    assert cache["c"] == b"c" * 200
    assert consistency_problems(cache) == []
    cache.clear()
    assert cache.currsize == 0


# ---------------------------------------------------------------------- the garbage collector


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finalizer_using_the_cache_during_a_cache_call_breaks_nothing(backend):
    """Now: a weakref.finalize(handle, cache.pop, key) -- "drop the cached bytes when the object
    dies" -- run by the garbage collector in the middle of a cache call of the same thread
    re-enters the cache's RLock and changes slabs under the outer call: sets, gets, sweeps and
    iteration raise StopIteration, RuntimeError ("discardable memory is already locked",
    "... closed> is not locked", "dictionary changed size during iteration"), ValueError
    ("discardable memory is closed") or OSError (madvise ENOMEM on memory already given back),
    and the finalizers' own pops fail the same way.  Should: only KeyError/PinnedError where
    documented; every value returned intact; the cache consistent; memory back to 0 at close.
    (The GC threshold is lowered to make the collections fall inside cache calls often.)"""
    import random
    import weakref

    rng = random.Random(2)
    cache = make(backend, maxsize=200_000)
    manager = cache.manager

    class Handle:
        """Owns a cached thumbnail, dropped with it; in a cycle, so the collector frees it."""

        def __init__(self, key):
            self.me = self
            cache[key] = pattern(key, 100 + key * 50)
            weakref.finalize(self, cache.pop, key, None)

    errors = []
    unraisable = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    old_threshold = gc.get_threshold()
    gc.set_threshold(20)
    try:
        for _ in range(4000):
            try:
                Handle(rng.randrange(1000, 1100))
                key = rng.randrange(60)
                size = rng.choice([10, 100, 3000, 5000, 40000])
                action = rng.random()
                if action < 0.4:
                    cache[key] = pattern(key, size)
                elif action < 0.6:
                    got = cache.get(key)
                    if got is not None and got != pattern(key, len(got)):
                        errors.append(f"wrong bytes for {key}")
                elif action < 0.7:
                    cache.pop(key, None)
                elif action < 0.75:
                    list(cache.items())
                elif action < 0.8:
                    cache.sweep(0)
                elif action < 0.82:
                    force_reclaim(cache)
                else:
                    with cache.view(key):
                        pass
            except (KeyError, PinnedError):
                pass
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        gc.set_threshold(*old_threshold)
        gc.collect()
        sys.unraisablehook = old_hook
    failed_finalizers = sorted({f"{type(u.exc_value).__name__}: {u.exc_value}"
                                for u in unraisable})
    assert (sorted(set(errors)), failed_finalizers) == ([], [])
    assert consistency_problems(cache) == []
    cache.close()
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


# ---------------------------------------------------------------------- held: threads


STRESS_SIZES = [0, 1, 16, 100, 1000, 4095, 4096, 4097, 32768, 32769, 70000]


def versioned(key, version):
    """A value naming its key and version in every 8 bytes, its size set by the version."""
    size = STRESS_SIZES[version % len(STRESS_SIZES)]
    unit = key.to_bytes(4, "little") + version.to_bytes(4, "little")
    return (unit * (size // 8 + 1))[:size]


def versioned_problem(key, got):
    """None if got is exactly some version of key's value (or missing), else what is wrong."""
    if got is None:
        return None
    got = bytes(got)
    if len(got) < 8:
        return None if len(got) in (0, 1) else f"{key}: {len(got)} bytes"
    owner = int.from_bytes(got[:4], "little")
    version = int.from_bytes(got[4:8], "little")
    if owner != key or got != versioned(key, version):
        return f"{key}: got {len(got)} bytes of key {owner} version {version}, torn or foreign"
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_key_set_stored_deleted_iterated_pinned_and_viewed_by_many_threads(backend):
    """Held: 2 setters, 2 readers, a deleter, an iterator (items, popitem), 2 viewers (view,
    pin/unpin) on 8 keys crossing every size class and slab kind, with idle_unlock=0, while
    another thread calls critical and moderate pressure and force_reclaim: every value read is
    exactly one that was stored for its key, no view changes under its reader, the cache ends
    consistent with no pin left, and the manager gets every byte back at close()."""
    import random

    manager = DiscardableMemoryManager(16 << 20, backend)
    cache = DiscardableCache(400_000, manager=manager, idle_unlock=0, verify=True)
    stop = threading.Event()
    errors = []

    def guarded(work):
        def run(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                try:
                    work(rng, seed)
                except (KeyError, PinnedError):
                    pass
                except Exception as exc:  # anything else is a failure
                    errors.append(f"{work.__name__}: {type(exc).__name__}: {exc}")
        return run

    def note(key, got):
        problem = versioned_problem(key, got)
        if problem:
            errors.append(problem)

    def setter(rng, seed):
        key = rng.randrange(8)
        cache[key] = versioned(key, rng.randrange(1 << 30))

    def reader(rng, seed):
        key = rng.randrange(8)
        note(key, cache.get(key))
        note(key, cache[key])

    def deleter(rng, seed):
        key = rng.randrange(8)
        if rng.random() < 0.5:
            del cache[key]
        else:
            note(key, cache.pop(key, None))
        time.sleep(0.0005)

    def iterator(rng, seed):
        for key, got in cache.items():
            note(key, got)
        if rng.random() < 0.1:
            note(*cache.popitem())

    def viewer(rng, seed):
        key = rng.randrange(8)
        with cache.view(key) as mv:
            first = bytes(mv)
            time.sleep(0.0002)
            if bytes(mv) != first:
                errors.append(f"{key}: a view changed under its reader")
        note(key, first)
        cache.pin(key)
        try:
            note(key, cache.get(key))
        finally:
            cache.unpin(key)

    def pressure(rng, seed):
        manager.on_memory_pressure("critical")
        force_reclaim(cache)
        manager.on_memory_pressure("moderate")
        time.sleep(0.001)

    workers = [setter, setter, reader, reader, deleter, iterator, viewer, viewer, pressure]
    threads = [threading.Thread(target=guarded(w), args=(i,)) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(set(errors)) == []
    assert consistency_problems(cache) == []
    assert cache.stats()["pinned_entries"] == 0
    assert cache.stats()["hits"] > 100
    for key, got in cache.items():
        note(key, got)
    assert errors == []
    cache.close()
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


def test_many_caches_on_one_small_manager_under_pressure_and_close_from_threads():
    """Held: 12 caches with random idle_unlock on one 8 MiB manager, 16 threads setting, reading,
    viewing and sometimes closing them, one thread calling critical then moderate pressure in a
    loop: every value read is the one stored, every cache consistent, 0 bytes left at the end."""
    import random

    manager = DiscardableMemoryManager(8 << 20, "madvfree")
    caches = [DiscardableCache(1 << 20, manager=manager,
                               idle_unlock=random.choice([0, 0.001, 0.01, None]))
              for _ in range(12)]
    stop = threading.Event()
    errors = []

    def user(i):
        rng = random.Random(i)
        cache = caches[i % len(caches)]
        while not stop.is_set():
            key = rng.randrange(40)
            try:
                cache[key] = versioned(key, rng.randrange(1 << 30))
                other = rng.randrange(40)
                problem = versioned_problem(other, cache.get(other))
                if problem:
                    errors.append(problem)
                if rng.random() < 0.01:
                    cache.close()
                if rng.random() < 0.05:
                    with cache.view(rng.randrange(40)) as mv:
                        bytes(mv)
            except (KeyError, PinnedError):
                pass
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    def pressure():
        while not stop.is_set():
            manager.on_memory_pressure("critical")
            manager.on_memory_pressure("moderate")
            time.sleep(0.001)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(16)]
    threads.append(threading.Thread(target=pressure))
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert [consistency_problems(cache) for cache in caches] == [[]] * len(caches)
    for cache in caches:
        cache.close()
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


def test_a_bytearray_resized_by_another_thread_during_sets_is_stored_whole():
    """Held: a thread growing and shrinking a bytearray while another stores it: the resize
    fails with BufferError while the set holds its buffer, and each stored value is one whole
    state of the bytearray (a run of one byte)."""
    cache = make()
    data = bytearray(b"a" * 5000)
    stop = threading.Event()
    resize_errors = []

    def mutate():
        letter = 0
        while not stop.is_set():
            letter = (letter + 1) % 26
            try:
                data[:] = bytes([97 + letter]) * (3000 + letter * 100)
            except BufferError:
                resize_errors.append(1)

    thread = threading.Thread(target=mutate)
    thread.start()
    try:
        for i in range(3000):
            cache[i % 10] = data
            got = cache[i % 10]
            assert got == got[:1] * len(got)
    finally:
        stop.set()
        thread.join()
    assert consistency_problems(cache) == []


# ---------------------------------------------------------------------- held: re-entrancy


class Meddler:
    """Colliding keys whose first __eq__ after `action` is set runs it (once)."""

    action = None

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        return 3

    def __eq__(self, other):
        action, Meddler.action = Meddler.action, None
        if action is not None:
            action()
        return isinstance(other, Meddler) and other.name == self.name

    def __repr__(self):
        return f"Meddler({self.name})"


@pytest.mark.parametrize("meddling", ["set_other", "set_evicting_all", "delete_same",
                                      "delete_other", "clear", "close", "sweep_and_reclaim"])
@pytest.mark.parametrize("operation", ["set_new", "overwrite", "delete", "pop", "get", "view"])
def test_a_key_whose_eq_uses_the_same_cache_keeps_it_consistent(operation, meddling):
    """Held: a key's __eq__, run by the dict lookup inside a set/delete/pop/get/view, sets,
    deletes, clears, closes or sweeps the same cache: the operation completes or raises
    KeyError, and the cache stays consistent with exact values."""
    cache = make(maxsize=450)
    keys = [Meddler(i) for i in range(4)]
    for key in keys:
        cache[key] = bytes([key.name]) * 100
    cache.get(keys[0])
    meddlings = {
        "set_other": lambda: cache.__setitem__("other", b"o" * 100),
        "set_evicting_all": lambda: cache.__setitem__("other", b"o" * 400),
        "delete_same": lambda: cache.__delitem__(keys[1]),
        "delete_other": lambda: cache.__delitem__(keys[2]),
        "clear": cache.clear,
        "close": cache.close,
        "sweep_and_reclaim": lambda: (cache.sweep(0), force_reclaim(cache)),
    }
    operations = {
        "set_new": lambda: cache.__setitem__(Meddler(9), b"\x09" * 100),
        "overwrite": lambda: cache.__setitem__(Meddler(1), b"\x01" * 100),
        "delete": lambda: cache.__delitem__(Meddler(1)),
        "pop": lambda: cache.pop(Meddler(1)),
        "get": lambda: cache.get(Meddler(1)),
        "view": lambda: cache.view(Meddler(1)).__enter__(),
    }
    Meddler.action = meddlings[meddling]
    try:
        operations[operation]()
    except KeyError:
        pass
    finally:
        Meddler.action = None
    assert consistency_problems(cache) == []
    for key, got in cache.items():
        assert got == (b"o" * len(got) if key == "other" else bytes([key.name]) * 100)


@pytest.mark.parametrize("meddling", ["set", "delete", "close", "clear", "set_same", "popitem"])
def test_on_evict_and_getsizeof_that_use_the_same_cache_keep_it_consistent(meddling):
    """Held: on_evict (for size evictions and purges) and getsizeof that set, delete, clear,
    close or pop the same cache: no exception, consistent cache, memory back at close."""
    calls = []

    def on_evict(key, reason):
        calls.append(key)
        if len(calls) > 20:
            return
        if meddling == "set":
            cache[f"evicted-{key}"] = b"e" * 100
        elif meddling == "delete" and "k2" in cache:
            del cache["k2"]
        elif meddling == "close":
            cache.close()
        elif meddling == "clear":
            cache.clear()
        elif meddling == "set_same":
            cache[key] = b"again" * 20
        elif meddling == "popitem" and len(cache):
            cache.popitem()

    def getsizeof(value):
        if meddling == "set" and len(value) == 100:
            cache["side"] = b"s" * 50
        elif meddling == "delete" and "k0" in cache:
            del cache["k0"]
        return len(value)

    cache = make(maxsize=300, on_evict=on_evict, getsizeof=getsizeof)
    manager = cache.manager
    for i in range(6):
        cache[f"k{i}"] = bytes([i]) * 100
    force_reclaim(cache)
    list(cache)
    for i in range(3):
        cache[f"k{i}"] = bytes([i]) * 100
    assert consistency_problems(cache) == []
    for key, got in cache.items():
        assert got in (bytes([int(key[1:])]) * 100 if key.startswith("k") else got,
                       b"e" * 100, b"again" * 20, b"s" * 50)
    cache.close()
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


def test_a_view_released_while_another_thread_holds_the_lock_is_settled_later():
    """Held: close() inside a view, then the view ends while another thread holds the cache's
    lock (a key's slow __eq__ inside a set): the slab is left to the timer, which frees it."""
    class SlowKey:
        def __init__(self, name):
            self.name = name

        def __hash__(self):
            return 1

        def __eq__(self, other):
            time.sleep(0.3)
            return isinstance(other, SlowKey) and other.name == self.name

    cache = make()
    manager = cache.manager
    cache["viewed"] = b"v" * 50000
    context = cache.view("viewed")
    context.__enter__()
    cache.close()
    cache[SlowKey(1)] = b"1" * 100
    setter = threading.Thread(target=cache.__setitem__, args=(SlowKey(2), b"2" * 100))
    setter.start()
    time.sleep(0.1)
    context.__exit__(None, None, None)  # the lock is busy: the slab becomes an orphan
    assert len(cache._orphans) == 1
    setter.join()
    deadline = time.monotonic() + 5
    while cache._orphans and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not cache._orphans
    assert manager.stats()["allocated_bytes"] == sum(slab.nbytes for slab in cache._slabs) > 0
    cache.close()
    assert manager.stats()["allocated_bytes"] == 0


# ---------------------------------------------------------------------- held: views, sizes, copies


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_and_exported_views_outlive_close_and_free_everything_when_gone(backend):
    """Held: two views of one key, a numpy array made from one and a slice of the other, with
    close() inside: the bytes stay readable until the last of them goes, then the manager has
    every byte back; the cache is usable again; a view kept past close() and a slot reused
    after it never show each other's bytes."""
    cache = make(backend)
    manager = cache.manager
    cache["a"] = b"a" * 100
    cache["big"] = b"B" * 50000
    with cache.view("a") as outer:
        with cache.view("a") as inner:
            array = np.frombuffer(inner, dtype=np.uint8)
            piece = outer[5:10]
            cache.close()
        assert bytes(outer[:3]) == b"aaa"
    assert array.tobytes() == b"a" * 100 and bytes(piece) == b"a" * 5
    assert manager.stats()["allocated_bytes"] > 0
    del array
    gc.collect()
    assert bytes(piece) == b"a" * 5
    del piece
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0
    cache["x"] = b"x" * 100
    with cache.view("x") as mv:
        kept = np.frombuffer(mv, dtype=np.uint8)
    cache.close()
    cache["y"] = b"y" * 100
    cache["x"] = b"z" * 100
    assert kept.tobytes() == b"x" * 100
    assert (cache["x"], cache["y"]) == (b"z" * 100, b"y" * 100)
    del kept
    cache.close()
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


@pytest.mark.parametrize("backend", REAL)
def test_a_cache_dropped_while_a_view_lives_frees_its_memory_after_the_view(backend):
    """Held: del cache (no close) with a view and a numpy array of it alive: the bytes stay
    valid; once both are gone the garbage collector gives every byte back."""
    manager = DiscardableMemoryManager(64 << 20, backend)
    cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=0.001)
    cache["v"] = b"v" * 100
    context = cache.view("v")
    array = np.frombuffer(context.__enter__(), dtype=np.uint8)
    del cache
    gc.collect()
    time.sleep(0.02)
    assert array.tobytes() == b"v" * 100
    context.__exit__(None, None, None)
    del context
    gc.collect()
    assert array.tobytes() == b"v" * 100
    del array
    gc.collect()
    assert manager.stats()["allocated_bytes"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_at_every_size_class_boundary_round_trip_and_overwrite(backend):
    """Held: a value of each class's slot size, one byte less and one more, 0, 1, page and
    32768/32769 bytes: read back exactly, overwritten with one byte less exactly, currsize
    always the sum of the values."""
    from discache._cache import SIZE_CLASSES

    cache = make(backend, maxsize=16 << 20)
    sizes = sorted({size for slot, _, _ in SIZE_CLASSES for size in (slot - 1, slot, slot + 1)}
                   | {0, 1, PAGE - 1, PAGE, PAGE + 1, 32767, 32768, 32769, 65537})
    for size in sizes:
        cache[size] = pattern(size, size)
    assert [size for size in sizes if cache[size] != pattern(size, size)] == []
    assert cache.currsize == sum(sizes)
    for size in sizes:
        cache[size] = pattern(size + 1, max(0, size - 1))
    assert [s for s in sizes if cache[s] != pattern(s + 1, max(0, s - 1))] == []
    assert consistency_problems(cache) == []


@pytest.mark.parametrize("backend", ["madvfree", "simulated"])
def test_pickle_and_copies_of_a_cache_with_purged_and_pinned_entries(backend):
    """Held: after force_reclaim with one entry pinned, pickle/copy/deepcopy hold exactly the
    intact entries (the pinned one and its slab-mates), unpinned, with the same bytes; the
    original keeps its pin; all of them give their memory back at close()."""
    cache = make(backend)
    for i in range(10):
        cache[i] = pattern(i, 40000 if i % 2 else 100)
    cache.pin(1)
    force_reclaim(cache)
    clones = [pickle.loads(pickle.dumps(cache)), copy.copy(cache), copy.deepcopy(cache)]
    for clone in clones:
        assert list(clone) == [1]
        assert clone[1] == pattern(1, 40000)
        assert clone.stats()["pinned_entries"] == 0
    assert cache.stats()["pinned_entries"] == 1
    cache.unpin(1)
    for each in [cache] + clones[1:]:
        each.close()
    gc.collect()
    assert cache.manager.stats()["allocated_bytes"] == 0


@pytest.mark.parametrize("limit", [PAGE, 2 * PAGE])
def test_a_manager_smaller_than_a_slab_still_stores_exact_values(limit):
    """Held: a manager of one or two pages: values get slabs of their own, read back exactly;
    a value above the limit raises (MemoryError, or ValueError "too large") and changes
    nothing; close() frees all."""
    manager = DiscardableMemoryManager(limit, "madvfree")
    cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=None)
    for i in range(20):
        cache[i] = pattern(i, 100)
    assert all(cache[i] == pattern(i, 100) for i in range(20))
    with pytest.raises((MemoryError, ValueError)):
        cache["big"] = b"x" * (limit + 1)
    assert consistency_problems(cache) == [] and len(cache) == 20
    cache.close()
    assert manager.stats()["allocated_bytes"] == 0


@pytest.mark.parametrize("backend", REAL)
def test_an_array_made_on_a_views_buffer_keeps_its_bytes_while_it_lives(backend):
    """Now: np.ndarray(shape, dtype, buffer=mv) takes the buffer and keeps the EntryView (not
    the memoryview, and no export) as its base; the pin ends with the `with`, so the array
    then shows another key's bytes once the slot is reused (b"bbbb" where b"aaaa" was stored),
    and after close() reading it kills the interpreter with SIGSEGV.  Should: the entry stays
    pinned while anything holding the view's buffer object lives (the EntryView's lifetime,
    not the count of exports)."""
    code = f"""
        import numpy as np
        from discache.cache import DiscardableCache
        from discache.manager import DiscardableMemoryManager
        manager = DiscardableMemoryManager(64 << 20, {backend!r})
        cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=None)
        cache["a"] = b"a" * 100
        with cache.view("a") as mv:
            small = np.ndarray((100,), np.uint8, buffer=mv)
        try:
            del cache["a"]
        except Exception:
            pass  # refusing to delete a pinned entry is fine
        cache["b"] = b"b" * 100
        print("small", small[:4].tobytes(), flush=True)
        cache["big"] = b"B" * 100000
        with cache.view("big") as mv:
            big = np.ndarray((100000,), np.uint8, buffer=mv)
        cache.close()
        print("big", big[:4].tobytes(), big[-4:].tobytes(), flush=True)
    """
    returncode, output = run_python(code)
    assert returncode == 0, output
    assert "small b'aaaa'" in output and "big b'BBBB' b'BBBB'" in output, output


def test_a_consumer_holding_an_export_of_the_views_memoryview_does_not_make_the_with_raise():
    """Now: view()'s exit calls mv.release(); a consumer holding a buffer export of mv itself
    (pickle.PickleBuffer(mv), a Cython typed memoryview, a C extension keeping Py_buffer) makes
    it raise BufferError("memoryview has 1 exported buffer") out of the `with`, masking the
    body's own exception if any.  Should: the with ends quietly and the entry stays pinned
    until the consumer lets go (as for a slice)."""
    cache = make()
    cache["a"] = b"a" * 100
    with cache.view("a") as mv:
        held = pickle.PickleBuffer(mv)
    assert bytes(held.raw()) == b"a" * 100
    assert cache.stats()["pinned_entries"] == 1
    held.release()
    del held, mv
    gc.collect()
    assert cache.stats()["pinned_entries"] == 0


# ---------------------------------------------------------------------- caches coming and going


def test_pressure_while_caches_are_created_in_another_thread_never_raises():
    """Now: manager.on_memory_pressure iterates its WeakValueDictionary of caches in Python
    while another thread registers new caches: RuntimeError("dictionary changed size during
    iteration") out of the pressure call (6 times in 3 s here) -- the PSI monitor's callback.
    Should: pressure reaches the caches registered when it starts, and never raises."""
    manager = DiscardableMemoryManager(64 << 20, "madvfree")
    kept = [DiscardableCache(1 << 20, manager=manager, idle_unlock=None) for _ in range(200)]
    stop = threading.Event()
    errors = []

    def churn():
        while not stop.is_set():
            cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=None)
            cache["a"] = b"a"
            kept.append(cache)
            if len(kept) > 400:
                del kept[:100]

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not errors:
            try:
                manager.on_memory_pressure("critical")
            except RuntimeError as exc:
                errors.append(str(exc))
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_fork_while_another_thread_creates_and_drops_caches_leaves_the_child_able_to_run():
    """Now: the fork handler keeps strong references to every cache whose lock it took; in the
    child, releasing them drops the last reference to caches the other thread had let go, so
    their finalizer runs inside the after-fork hook and frees slabs through the manager, whose
    lock that thread held at the fork: the child hangs before running a line of its own.
    Should: every child runs and exits."""
    code = """
        import os, signal, threading, time
        from discache.cache import DiscardableCache
        from discache.manager import DiscardableMemoryManager
        manager = DiscardableMemoryManager(64 << 20, "madvfree")
        kept = []
        stop = threading.Event()
        def churn():
            while not stop.is_set():
                cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=None)
                cache["a"] = b"a" * 100
                kept.append(cache)
                if len(kept) > 400:
                    del kept[:100]
        thread = threading.Thread(target=churn)
        thread.start()
        hung = 0
        for _ in range(60):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            deadline = time.monotonic() + 2
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.005)
            if hung:
                break
        stop.set()
        thread.join()
        print("hung", hung)
    """
    returncode, output = run_python(code, timeout=60)
    assert (returncode, "hung 0" in output) == (0, True), output


# ---------------------------------------------------------------------- the idle timer


def test_a_huge_idle_unlock_on_one_cache_does_not_stop_the_timer_of_every_other():
    """Now: idle_unlock=1e12 ("practically never") is accepted; the process's one timer thread
    then calls Condition.wait(5e11), which raises OverflowError ("timestamp out of range for
    platform time_t"): the thread dies, and no cache of the process is ever unlocked by it
    again (another cache with idle_unlock=0.05 stays locked).  Should: such a deadline is
    clamped (or the value refused by the constructor); the timer never dies."""
    code = """
        import time
        from discache import idle
        from discache.cache import DiscardableCache
        from discache.manager import DiscardableMemoryManager
        manager = DiscardableMemoryManager(64 << 20, "madvfree")
        try:
            lazy = DiscardableCache(1 << 20, manager=manager, idle_unlock=1e12)
            lazy["a"] = b"a" * 100
        except ValueError:
            pass  # refusing it is fine too
        time.sleep(0.2)
        cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=0.05)
        cache["b"] = b"b" * 40000
        deadline = time.monotonic() + 2
        while cache.stats()["locked_bytes"] and time.monotonic() < deadline:
            time.sleep(0.01)
        print("timer running", idle.TIMER.running, "locked", cache.stats()["locked_bytes"])
    """
    returncode, output = run_python(code)
    assert "timer running True locked 0" in output, output


def test_cached_caches_a_non_contiguous_array_result():
    """Now: storing a strided array raises numpy's ValueError, which discache.cached takes for
    "too large": the result is returned but silently never cached (every call a miss, counted
    as too_large).  Should: the second call is a hit."""
    cache = make()
    calls = []

    @cached(cache, info=True)
    def column(n):
        calls.append(n)
        return np.arange(64, dtype=np.int32).reshape(8, 8)[:, n]

    first = column(1)
    assert bytes(column(1)) == first.tobytes()
    assert len(calls) == 1 and cache.stats()["too_large"] == 0


@pytest.mark.parametrize("backend", ["madvfree"])
def test_fork_with_the_idle_timer_busy_gives_a_child_whose_cache_goes_idle(backend):
    """Held: forks while a thread sets entries and the timer ticks every 0.5 ms: each child
    reads every entry exactly, and its own timer unlocks its cache within 2 s.  (Not memfd:
    its pages are shared with the parent, whose thread keeps overwriting them while the child
    reads -- the problem test_a_forked_child_never_changes_what_the_parents_cache_returns
    shows from the other side.)"""
    cache = make(backend, idle_unlock=0.001)
    for i in range(50):
        cache[i] = versioned(i, 3)
    stop = threading.Event()

    def busy():
        i = 0
        while not stop.is_set():
            cache[i % 50] = versioned(i % 50, 3 + i % 5)
            i += 1

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        for _ in range(10):
            time.sleep(0.003)
            pid = os.fork()
            if pid == 0:
                signal.alarm(5)
                ok = all(versioned_problem(k, v) is None for k, v in cache.items())
                ok = ok and len(cache) == 50
                deadline = time.monotonic() + 2
                while cache.stats()["locked_bytes"] and time.monotonic() < deadline:
                    time.sleep(0.01)
                os._exit(0 if ok and not cache.stats()["locked_bytes"] else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("child_does", ["exits_normally", "overwrites_a_key", "closes"])
@pytest.mark.parametrize("backend", REAL)
def test_a_forked_child_never_changes_what_the_parents_cache_returns(backend, child_does):
    """Now (memfd): the cache's segments are MAP_SHARED memfds, so after fork parent and child
    write the same pages while each keeps its own slot bookkeeping.  A child that overwrites
    "a" makes the parent's cache["a"] return the child's bytes; a child that closes its cache,
    or merely exits normally (sys.exit: the cache's atexit finalizer frees its slabs, punching
    holes in the shared memfd), makes the parent's cache return zeros for every entry -- with
    no purge reported.  (madvfree: private copy-on-write, correct.)  Should: the parent gets
    exactly its own values, or a reported loss (missing, on_evict "purged"); never another
    process's bytes or zeros."""
    code = f"""
        import os, sys
        from discache.cache import DiscardableCache
        from discache.manager import DiscardableMemoryManager
        reported = []
        manager = DiscardableMemoryManager(64 << 20, {backend!r})
        cache = DiscardableCache(1 << 20, manager=manager, idle_unlock=None,
                                 on_evict=lambda key, reason: reported.append(key))
        cache["a"] = b"a" * 100
        cache["big"] = b"B" * 50000
        pid = os.fork()
        if pid == 0:
            if {child_does!r} == "overwrites_a_key":
                cache["a"] = b"X" * 100
                cache["new"] = b"N" * 100
                os._exit(0)
            if {child_does!r} == "closes":
                cache.close()
                os._exit(0)
            sys.exit(0)
        os.waitpid(pid, 0)
        for key, expected in (("a", b"a" * 100), ("big", b"B" * 50000)):
            got = cache.get(key)
            ok = got == expected or (got is None and key in reported)
            print(key, "ok" if ok else f"WRONG {{got[:8]!r}}")
    """
    returncode, output = run_python(code)
    assert returncode == 0, output
    assert output.split() == ["a", "ok", "big", "ok"], output


def test_currsize_never_exceeds_maxsize_even_with_pinned_entries():
    """Now: with a 250-byte entry pinned (or only being viewed) in a cache of maxsize 300, a set
    of 100 bytes succeeds and leaves currsize 350 > maxsize, while maxsize is documented as
    "the most currsize may be".  Should (a judgement call for the lead): the set that cannot
    fit without evicting a pinned entry raises ValueError and changes nothing -- or the docs
    say that pins may hold the cache over maxsize."""
    cache = make(maxsize=300)
    cache["pinned"] = b"p" * 250
    cache.pin("pinned")
    try:
        cache["new"] = b"n" * 100
    except ValueError:
        pass
    assert cache.currsize <= cache.maxsize


def test_the_collector_pause_leaves_the_programs_own_setting():
    """The caches pause the garbage collector while a cache's lock is held (a finalizer run by
    a collection in the middle of a cache call would re-enter it half-way through a change) and
    put back what they found: a program that disabled the collector before using caches finds
    it disabled, one that left it on finds it on.  (The pause is process-wide: a gc.disable()
    made by one thread while another is inside a cache call is undone when that call ends; the
    docs say so: set the collector before threads use caches.)"""
    cache = make()
    was_enabled = gc.isenabled()
    try:
        for setting in (False, True, False):
            (gc.enable if setting else gc.disable)()
            cache["k"] = b"v" * 5000
            assert cache["k"] == b"v" * 5000
            cache.sweep(0)
            assert cache.get("k") == b"v" * 5000
            list(cache.items())
            del cache["k"]
            assert gc.isenabled() == setting, "a cache call changed the collector's setting"
    finally:
        (gc.enable if was_enabled else gc.disable)()
