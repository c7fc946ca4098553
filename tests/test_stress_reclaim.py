"""Reclaim storm on the real kernel: threads use discardable memory while another forces reclaim."""
from __future__ import annotations

import ctypes
import random
import struct
import sys
import threading
import time
from collections import Counter

import pytest

import discache
from discache import _core, backends, force_reclaim
from discache.manager import ManagedMemory

from stress import report, seconds

PAGE = _core.page_size()
WORKERS = 2
SMALL_PAGES = 16
LARGE_PAGES = 2048  # from here lock and unlock run without the GIL (MADVFREE_NOGIL_PAGES)
MADVFREE_S = seconds(18.0)  # split between the three kinds of memory
CACHE_S = seconds(12.0)
SIGBUS_S = seconds(14.0)
SWITCH_INTERVAL_S = 20e-6  # the GIL changes hands 250 times as often as by default

AVAILABLE = {info.name for info in backends.available() if info.available}


def needs(name: str):
    return pytest.mark.skipif(name not in AVAILABLE, reason=f"backend {name!r} does not run here")


def page_word(owner: int, page: int, generation: int) -> bytes:
    """8 non-zero bytes naming who wrote a page, which page, and when."""
    return struct.pack("<BBHI", owner + 1, 0x5A, page + 1, generation + 1)


def pattern(owner: int, npages: int, generation: int) -> bytes:
    return b"".join(page_word(owner, p, generation) * (PAGE // 8) for p in range(npages))


def resident(mem, first: int = 0, count: int = -1) -> int:
    """How many of mem's pages [first, first+count) mincore says are resident."""
    count = mem.npages - first if count < 0 else count
    if isinstance(mem, ManagedMemory):
        return mem.segment.resident_pages(mem.first + first, count)
    return mem._resident_pages(first, count)


def missing_pages(mem) -> set[int]:
    """Pages of mem that mincore says are not resident (discarded, while unlocked)."""
    return {p for p in range(mem.npages) if not resident(mem, p, 1)}


def zero_pages(mem, expected: bytes) -> set[int]:
    """Pages of locked mem that read as zeros; every other page must be exactly as written."""
    with mem.data as view:
        found = bytes(view)
    if found == expected:
        return set()
    zeros, wrong = set(), []
    for p in range(mem.npages):
        page = found[p * PAGE:(p + 1) * PAGE]
        if page == bytes(PAGE):
            zeros.add(p)
        elif page != expected[p * PAGE:(p + 1) * PAGE]:
            wrong.append(p)
    assert not wrong, f"pages {wrong[:8]} are neither intact nor zeroed"
    return zeros


class Storm:
    """Runs worker threads and one reclaiming thread until a deadline; collects failures."""

    def __init__(self, duration: float) -> None:
        self.deadline = time.monotonic() + duration
        self.counts: Counter = Counter()
        self.failures: list[BaseException] = []
        self.guard = threading.Lock()  # taken by a worker for a reclaim-free mincore-to-lock
        self.counting = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.failures

    def count(self, **amounts: int) -> None:
        with self.counting:  # Counter's __missing__ is Python code: the GIL can change hands
            for key, amount in amounts.items():
                self.counts[key] += amount

    def run(self, workers: list, reclaimer) -> None:
        threads = [threading.Thread(target=self._guarded, args=(target,))
                   for target in [*workers, reclaimer]]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # threads interleave inside each other's calls
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        if self.failures:
            raise self.failures[0]

    def _guarded(self, target) -> None:
        try:
            target()
        except BaseException as failure:  # re-raised in the test's thread by run()
            self.failures.append(failure)

    def reclaim_forever(self, memories: list) -> None:
        """Force reclaim of random unlocked memories (or page ranges of them) until the end."""
        chance = random.Random(7)
        while self.running():
            mem = chance.choice(memories)
            with self.guard:
                try:
                    before = resident(mem)
                    if chance.random() < 0.5 or isinstance(mem, ManagedMemory):
                        force_reclaim(mem)
                    else:
                        first = chance.randrange(mem.npages)
                        mem._force_reclaim(first, chance.randint(1, mem.npages - first))
                    discarded = before - resident(mem)
                except RuntimeError:  # a lock or unlock of it runs without the GIL right now
                    self.count(reclaims_busy=1)
                    continue
            # A lock in between re-populates pages: what it found is counted as pages_lost.
            self.count(reclaims=1, pages_discarded=max(discarded, 0))


@needs("madvfree")
@pytest.mark.parametrize("kind", ["madvfree", "madvfree-sigbus", "managed"])
def test_madvfree_memory_under_a_reclaim_storm(kind):
    storm = Storm(MADVFREE_S / 3)
    if kind == "managed":  # spans of a manager's madvfree segments
        manager = discache.DiscardableMemoryManager(limit=64 << 20, backend="madvfree")
        memories = [[manager.allocate(n * PAGE) for n in (SMALL_PAGES, 256)]
                    for _ in range(WORKERS)]
    else:
        memories = [[discache.allocate(n * PAGE, "madvfree", sigbus=kind != "madvfree")
                     for n in (SMALL_PAGES, LARGE_PAGES)] for _ in range(WORKERS)]

    def work(owner: int) -> None:
        chance = random.Random(owner)
        mine = memories[owner]
        generation = [0] * len(mine)
        written = [pattern(owner, mem.npages, 0) for mem in mine]
        for mem, data in zip(mine, written):
            with mem.data as view:
                view[:] = data
            mem.unlock()
        while storm.running():
            which = 0 if chance.random() < 0.75 else 1  # the large one is slow to check
            mem, expected = mine[which], written[which]
            exact = chance.random() < 0.5
            if exact:  # no reclaim between mincore and lock: lock must report exactly that
                with storm.guard:
                    missing = missing_pages(mem)
                    intact = mem.lock()
            else:  # reclaim may race the lock: it must report at least what mincore saw
                missing = missing_pages(mem)
                intact = mem.lock()
            zeroed = zero_pages(mem, expected)
            assert mem.purged_pages == len(zeroed), "a loss went unreported (or was invented)"
            assert intact is (not zeroed)
            assert missing <= zeroed, f"mincore saw {missing - zeroed} gone, lock did not"
            if exact:
                assert zeroed == missing, (zeroed, missing)
            storm.count(locks=1, locks_exact=exact, pages_lost=len(zeroed),
                        pages_missing_mincore=len(missing))
            generation[which] += 1
            expected = written[which] = pattern(owner, mem.npages, generation[which])
            with mem.data as view:
                view[:] = expected
            time.sleep(chance.random() * 0.002)  # locked while the reclaimer keeps going
            assert resident(mem) == mem.npages, "a locked page was discarded"
            assert zero_pages(mem, expected) == set(), "locked contents changed"
            mem.unlock()
            storm.count(operations=4)  # lock, write, verify, unlock

    all_memories = [mem for mine in memories for mem in mine]
    try:
        storm.run([lambda owner=owner: work(owner) for owner in range(WORKERS)],
                  lambda: storm.reclaim_forever(all_memories))
    finally:
        for mem in all_memories:
            mem.close()
    counts = storm.counts
    assert counts["locks"] > 100 and counts["pages_discarded"] > 100, counts
    assert counts["pages_lost"] > 0, "the storm never made a lock find a loss"
    report(f"reclaim-{kind}", {"threads": WORKERS + 1, "seconds": MADVFREE_S / 3,
            **dict(sorted(counts.items()))})


def mincore_resident(address: int, npages: int) -> int:
    """Pages of [address, address + npages pages) that mincore() says are resident."""
    vec = (ctypes.c_ubyte * npages)()
    if LIBC.mincore(ctypes.c_void_p(address), ctypes.c_size_t(npages * PAGE), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec)


LIBC = ctypes.CDLL(None, use_errno=True)


@needs("madvfree")
def test_cache_entries_under_a_reclaim_storm():
    storm = Storm(CACHE_S)
    keys_per_worker, evicted = 48, Counter()
    manager = discache.DiscardableMemoryManager(limit=64 << 20, backend="madvfree")
    cache = discache.DiscardableCache(
        32 << 20, manager=manager, idle_unlock=0.005,
        on_evict=lambda key, reason: evicted.update([(key, reason)]))

    def missing(key) -> int:
        """Pages holding the key's bytes that mincore says are gone, while its slab is unlocked
        (pages of the slab never written stay out of memory without being lost)."""
        with cache.lock_:
            entry = cache.entries_.get(key)
            if entry is None or entry.slab is None or entry.slab.locked:
                return 0
            first, last = entry.offset // PAGE, (entry.offset + entry.size - 1) // PAGE
            npages = last - first + 1
            return npages - mincore_resident(entry.slab.mem.address + first * PAGE, npages)

    def work(owner: int) -> None:
        chance = random.Random(owner)
        stored: dict[tuple, bytes] = {}
        misses, sets = Counter(), Counter()
        while storm.running():
            key = (owner, chance.randrange(keys_per_worker))
            if key not in stored or chance.random() < 0.1:
                npages = chance.randint(1, 3)
                value = pattern(owner, npages, chance.randrange(1 << 20))[:npages * PAGE - 7]
                cache[key] = value
                stored[key] = value
                sets[key] += 1
                storm.count(sets=1)
                continue
            gone = missing(key)
            value = cache.get(key)
            storm.count(gets=1, pages_missing_mincore=gone)
            if value is None:
                misses[key] += 1
                del stored[key]
                storm.count(entries_lost=1)
            else:
                assert value == stored[key], f"{key}: the cache returned other bytes"
                assert not gone, f"{key}: mincore saw {gone} pages gone, the cache returned it"
        # Every loss this worker saw was reported as "purged", and no stored value was reported
        # lost twice (a loss may also be found by another worker locking a shared slab: the
        # worker then may store the key again before it reads it).
        for key in set(misses) | set(sets):
            reported = evicted[(key, "purged")]
            assert misses[key] <= reported <= sets[key], (key, misses[key], reported, sets[key])

    def reclaim_cache() -> None:
        while storm.running():
            storm.count(reclaims=1, pages_discarded=force_reclaim(cache))
            time.sleep(0.001)

    try:
        storm.run([lambda owner=owner: work(owner) for owner in range(WORKERS)], reclaim_cache)
        stats = cache.stats()
    finally:
        cache.close()
        manager.stop()
    counts = storm.counts
    assert stats["evictions_size"] == 0 and stats["purges_detected"] >= counts["entries_lost"]
    assert stats["purges_detected"] == sum(n for (_, why), n in evicted.items() if why == "purged")
    assert counts["entries_lost"] > 0 and counts["gets"] > 1000, counts
    report("reclaim-cache", {"threads": WORKERS + 1, "seconds": CACHE_S,
                             "hits": stats["hits"], **dict(sorted(counts.items()))})


@needs("madvfree-sigbus")
def test_sigbus_conversions_under_a_reclaim_storm():
    storm = Storm(SIGBUS_S)
    npages, ops_per_round = 64, 2000
    memories = [discache.allocate(npages * PAGE, "madvfree", sigbus=True) for _ in range(WORKERS)]

    def access(mem, kind: str, offset: int, size: int, expected: bytes) -> None:
        """One unlocked access: exact bytes, or PurgedPageError (raised, returned nothing)."""
        if kind == "read":
            assert mem.read(offset, size) == expected[offset:offset + size]
        elif kind == "readinto":
            buffer = bytearray(size)
            assert mem.readinto(buffer, offset) == size
            assert buffer == expected[offset:offset + size]
        else:  # the same bytes again: a write that succeeds must change nothing
            assert mem.write(expected[offset:offset + size], offset) == size

    def work(owner: int) -> None:
        chance = random.Random(owner)
        mem = memories[owner]
        generation = 0
        while storm.running():
            expected = pattern(owner, npages, generation)
            with mem.data as view:
                view[:] = expected
            mem.unlock()
            raised: set[int] = set()
            for _ in range(ops_per_round):
                kind = chance.choices(("read", "readinto", "write"), (6, 3, 1))[0]
                first = chance.randrange(npages)
                span = 1 if chance.random() < 0.8 else chance.randint(1, npages - first)
                offset = first * PAGE + chance.randrange(PAGE)
                size = chance.randint(1, (first + span) * PAGE - offset)
                touched = set(range(first, (offset + size - 1) // PAGE + 1))
                try:
                    access(mem, kind, offset, size, expected)
                except discache.PurgedPageError as error:
                    page = (error.address - mem.address) // PAGE
                    assert error.address % PAGE == 0 and page in touched, (page, touched)
                    raised.add(page)
                    storm.count(sigbus_conversions=1, **{f"purged_{kind}": 1})
                else:
                    assert not touched & raised, f"purged pages {touched & raised} came back"
                    storm.count(unlocked_accesses=1)
            missing = missing_pages(mem)
            intact = mem.lock()
            zeroed = zero_pages(mem, expected)
            assert mem.purged_pages == len(zeroed) and intact is (not zeroed)
            assert raised <= zeroed, f"pages {raised - zeroed} raised but lock found them intact"
            assert missing <= zeroed, f"mincore saw {missing - zeroed} gone, lock did not"
            storm.count(locks=1, pages_lost=len(zeroed), pages_raised=len(raised))
            generation += 1

    try:
        storm.run([lambda owner=owner: work(owner) for owner in range(WORKERS)],
                  lambda: storm.reclaim_forever(memories))
    finally:
        for mem in memories:
            mem.close()
    counts = storm.counts
    assert counts["sigbus_conversions"] >= 10_000, counts
    assert all(counts[f"purged_{kind}"] for kind in ("read", "readinto", "write")), counts
    report("sigbus", {"threads": WORKERS + 1, "seconds": SIGBUS_S,
                      **dict(sorted(counts.items()))})
