"""Benchmarks of the simulated kernel: madvise costs (token vs walk vs MADV_FREE), faults, reclaim,
fork and whole-workload throughput.  Run: python -m pytest bench/bench_sim.py

Each group compares designs on the same sizes in the same run; extra_info carries the page-entry
visits and sizes, so reports can be built from the saved JSON (--benchmark-json)."""
from __future__ import annotations

import pytest

from discache.sim import MADV_FREE, MADV_NONVOLATILE, MADV_VOLATILE, SimulatedKernel
from discache.sim.replay import DESIGNS, Replayer
from discache.sim.workload import image_cache

PS = 4096
SIZES = [1, 64, 4096, 262144]


def volatile_process(strategy, npages, purged_fraction=0.1):
    """A process with one npages mapping, resident where RAM allows, some of it purged."""
    resident = max(int(npages * purged_fraction), 1)
    k = SimulatedKernel(ram_pages=resident, page_size=PS, strategy=strategy,
                        va_pages=max(npages, 1 << 16))
    p = k.spawn()
    a = p.mmap(npages * PS)
    p.touch(a, resident * PS, write=True)
    p.madvise(a, npages * PS, MADV_VOLATILE)
    k.reclaim(resident)
    return k, p, a


@pytest.mark.parametrize("npages", SIZES)
@pytest.mark.parametrize("strategy", ["token", "walk"])
def test_unmark(benchmark, strategy, npages):
    k, p, a = volatile_process(strategy, npages)
    nbytes = npages * PS

    def remark():
        p.madvise(a, nbytes, MADV_VOLATILE)

    before = k.stats()["pte_visits"]
    p.madvise(a, nbytes, MADV_NONVOLATILE)
    visits = k.stats()["pte_visits"] - before
    benchmark.group = f"unmark {npages} pages"
    benchmark.extra_info.update(op="MADV_NONVOLATILE", strategy=strategy, pages=npages,
                                pte_visits=visits)
    benchmark.pedantic(p.madvise, args=(a, nbytes, MADV_NONVOLATILE), setup=remark,
                       rounds=50 if npages > 4096 else 200, warmup_rounds=2)


@pytest.mark.parametrize("npages", SIZES)
def test_unmark_madv_free_lock(benchmark, npages):
    """The MADV_FREE design's "unmark": touch every page to learn what was lost (cookie check)."""
    k = SimulatedKernel(ram_pages=npages, page_size=PS, va_pages=max(npages, 1 << 16))
    p = k.spawn()
    a = p.mmap(npages * PS)
    p.touch(a, npages * PS, write=True)
    nbytes = npages * PS

    def free():
        p.madvise(a, nbytes, MADV_FREE)

    benchmark.group = f"unmark {npages} pages"
    benchmark.extra_info.update(op="MADV_FREE lock (touch every page)", strategy="madv_free",
                                pages=npages, pte_visits=npages)
    benchmark.pedantic(p.touch, args=(a, nbytes, True), setup=free,
                       rounds=50 if npages > 4096 else 200, warmup_rounds=2)


@pytest.mark.parametrize("npages", SIZES)
@pytest.mark.parametrize("advice", ["volatile-token", "volatile-walk", "madv_free"])
def test_mark(benchmark, advice, npages):
    strategy = "walk" if advice == "volatile-walk" else "token"
    k = SimulatedKernel(ram_pages=npages, page_size=PS, strategy=strategy,
                        va_pages=max(npages, 1 << 16))
    p = k.spawn()
    a = p.mmap(npages * PS)
    p.touch(a, npages * PS, write=True)
    nbytes = npages * PS
    flag = MADV_FREE if advice == "madv_free" else MADV_VOLATILE

    def unmark():
        if flag == MADV_FREE:
            p.touch(a, nbytes, True)
        else:
            p.madvise(a, nbytes, MADV_NONVOLATILE)

    before = k.stats()["pte_visits"]
    p.madvise(a, nbytes, flag)
    visits = k.stats()["pte_visits"] - before
    unmark()
    benchmark.group = f"mark {npages} pages"
    benchmark.extra_info.update(op="mark", design=advice, pages=npages, pte_visits=visits)
    benchmark.pedantic(p.madvise, args=(a, nbytes, flag), setup=unmark,
                       rounds=50 if npages > 4096 else 200, warmup_rounds=2)


@pytest.mark.parametrize("npages", [1 << 16, 1 << 20])
def test_fault_in(benchmark, npages):
    """Sim throughput: first touch of npages (a frame allocated and mapped for each)."""
    def setup():
        k = SimulatedKernel(ram_pages=npages, page_size=PS)
        p = k.spawn()
        return (p, p.mmap(npages * PS)), {}

    def run(p, a):
        p.touch(a, npages * PS, write=True)

    benchmark.group = "sim throughput"
    k = SimulatedKernel(ram_pages=npages, page_size=PS)
    p = k.spawn()
    p.touch(p.mmap(npages * PS), npages * PS, write=True)
    per_page = k.stats()["bookkeeping_bytes"] / npages
    benchmark.extra_info.update(op="fault in", pages=npages, bookkeeping_bytes_per_page=per_page)
    benchmark.pedantic(run, setup=setup, rounds=5)


@pytest.mark.parametrize("npages", [1 << 16, 1 << 20])
def test_reclaim_all_volatile(benchmark, npages):
    """Sim throughput: purge every page of an npages volatile mapping (two CLOCK laps)."""
    stats = {}

    def setup():
        k = SimulatedKernel(ram_pages=npages, page_size=PS)
        p = k.spawn()
        a = p.mmap(npages * PS)
        p.touch(a, npages * PS, write=True)
        p.madvise(a, npages * PS, MADV_VOLATILE)
        stats["k"] = k
        return (k,), {}

    def run(k):
        assert k.reclaim(npages) == npages

    benchmark.group = "sim throughput"
    benchmark.pedantic(run, setup=setup, rounds=5)
    benchmark.extra_info.update(op="reclaim all volatile", pages=npages,
                                scanned=stats["k"].stats()["reclaim_scanned"])


@pytest.mark.parametrize("where, policy", [
    ("none", "always age"), ("none", "age while volatile"),
    ("first", "age while volatile"), ("last", "age while volatile"),
])
def test_swapless_reclaim(benchmark, where, policy):
    """Reclaim 4096 pages out of 65536 resident, 10% volatile (written first or last) or none,
    no swap; every page was just written, so the clock's first lap only clears referenced bits."""
    ram = 1 << 16
    nvol = 0 if where == "none" else ram // 10
    stats = {}

    def setup():
        k = SimulatedKernel(ram_pages=ram, page_size=PS, always_age=policy == "always age")
        p = k.spawn()
        a = p.mmap(ram * PS)
        p.touch(a, ram * PS, write=True)
        vol = a if where == "first" else a + (ram - nvol) * PS
        if nvol:
            p.madvise(vol, nvol * PS, MADV_VOLATILE)
        stats["k"] = k
        return (k,), {}

    def run(k):
        return k.reclaim(4096)

    benchmark.group = "swapless reclaim"
    freed = benchmark.pedantic(run, setup=setup, rounds=10)
    benchmark.extra_info.update(op="reclaim 4096", volatile_written=where, policy=policy,
                                freed=freed, scanned=stats["k"].stats()["reclaim_scanned"])


def test_fork(benchmark):
    """fork of a process with 65536 resident pages, half of them volatile."""
    npages = 1 << 16
    k = SimulatedKernel(ram_pages=npages, page_size=PS)
    p = k.spawn()
    a = p.mmap(npages * PS)
    p.touch(a, npages * PS, write=True)
    p.madvise(a, npages // 2 * PS, MADV_VOLATILE)

    def run():
        p.fork().exit()

    benchmark.group = "sim throughput"
    benchmark.extra_info.update(op="fork+exit", pages=npages)
    benchmark(run)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_image_cache(benchmark, design):
    """The built-in workload of `discache simulate`, one design per entry."""
    ops = list(image_cache(steps=2000))
    results = []

    def run():
        results.append(Replayer(DESIGNS[design], 1 << 16).run(ops))

    benchmark.group = "image cache workload"
    benchmark.pedantic(run, rounds=3)
    row = results[-1].row()
    benchmark.extra_info.update(design=design, ops=len(ops), **{
        k: row[k] for k in ("unmark visits/call", "mark visits/call", "locks purged",
                            "pages purged", "SIGBUS", "zero reads", "reclaimed", "scanned")})
