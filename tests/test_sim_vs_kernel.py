"""The simulator against the real kernel: the same seeded random sequences of mmap, write, read,
MADV_FREE, MADV_DONTNEED, fork + write in the child, munmap and a forced reclaim (MADV_COLD, then
MADV_PAGEOUT, from each CPU, as discache.force_reclaim does) run on real private anonymous memory
and on discache.sim, and every page must read back the same (its data, or zeros) after every step.

Where the kernel is deterministic the comparison is exact: a page never lazily freed keeps its
data through any reclaim, MADV_DONTNEED zeroes at once, a child's writes never reach the parent.
Where it is not: a forced reclaim of a lazily freed page is best effort on a real kernel (a page
held in another CPU's LRU batch, or isolated by another reclaimer, survives it).  The simulator
always takes such a page; the real one may read back zeros (taken) or its exact data (survived),
nothing else.  A survivor is retried twice, then dropped with MADV_DONTNEED so that both sides go
on from the same state, and counted.  Known deviations (docs/sim.md, "The simulator against the
kernel") are pinned by the tests at the end of this file."""
from __future__ import annotations

import mmap
import os
import pickle
import random
import traceback
from dataclasses import dataclass, field

import pytest

from discache._core import on_every_cpu
from discache.sim import (MADV_COLD, MADV_DONTNEED, MADV_FREE, MADV_PAGEOUT, SimulatedKernel)

PAGE = mmap.PAGESIZE
SEQUENCES = 500
STEPS = 14
SLOTS = 3  # regions a sequence may have mapped at once
MAX_PAGES = 6
CHILD_STEPS = 4  # at most, in a forked child
FORK_SHARE = 0.04  # of the steps; ~0.5 fork per sequence: each one forks the test process
PAGES_ZERO = bytes(PAGE)


@dataclass
class Region:
    """One mapping on both sides: the real mmap and the simulated address."""

    real: mmap.mmap
    addr: int
    npages: int


@dataclass
class Tally:
    """What the comparisons found."""

    checks: int = 0  # page comparisons made
    mismatches: list = field(default_factory=list)
    taken: int = 0  # lazily freed pages a forced reclaim took on both sides
    survived: int = 0  # lazily freed pages the real kernel kept through every retry
    retried: int = 0  # survivors of a first reclaim taken by a retry
    forks: int = 0

    def merge(self, other: "Tally") -> None:
        """Add another tally (a forked child's) to this one."""
        self.checks += other.checks
        self.mismatches += other.mismatches
        self.taken += other.taken
        self.survived += other.survived
        self.retried += other.retried
        self.forks += other.forks


# ---------------------------------------------------------------------- one side each


def real_map(npages: int) -> mmap.mmap:
    """Private anonymous memory, as discache's madvfree backend maps it."""
    return mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def real_reclaim(regions: list[Region]) -> None:
    """discache.force_reclaim's sequence: MADV_COLD from each CPU, then MADV_PAGEOUT from each."""
    on_every_cpu(lambda: [r.real.madvise(MADV_COLD) for r in regions])
    on_every_cpu(lambda: [r.real.madvise(MADV_PAGEOUT) for r in regions])


def sim_reclaim(proc, regions: list[Region]) -> None:
    """The same on the simulator (one CPU: nothing to drain)."""
    for advice in (MADV_COLD, MADV_PAGEOUT):
        for r in regions:
            proc.madvise(r.addr, r.npages * PAGE, advice)


def data_for(seed: int, step: int, page: int, size: int) -> bytes:
    """Bytes nobody else writes, never all zero."""
    stamp = f"<{seed}:{step}:{page}>".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


def describe(page: bytes) -> str:
    """A page for a failure message: zeros, or its first stamp."""
    if page == PAGES_ZERO:
        return "zeros"
    start = page.find(b"<")
    return repr(page[start:start + 16]) if start >= 0 else repr(page[:16])


# ---------------------------------------------------------------------- the sequences


def random_op(rng: random.Random, regions: dict[int, Region]) -> tuple:
    """One operation that applies to the current regions."""
    live = sorted(regions)
    free_slots = [s for s in range(SLOTS) if s not in regions]
    if not live or (free_slots and rng.random() < 0.12):
        return ("mmap", rng.choice(free_slots), rng.randint(1, MAX_PAGES))
    slot = rng.choice(live)
    npages = regions[slot].npages
    first = rng.randrange(npages)
    count = rng.randint(1, npages - first)
    kinds = ["write"] * 6 + ["read"] * 2 + ["free"] * 5 + ["dontneed"] * 2 + ["reclaim"] * 4
    kinds += ["munmap"]
    kind = rng.choice(kinds)
    if kind == "write":
        whole = rng.random() < 0.5
        offset = 0 if whole else rng.randrange(0, PAGE - 32)
        return ("write", slot, first, count, offset, PAGE if whole else rng.randint(1, 32))
    if kind in ("read", "free", "dontneed"):
        return (kind, slot, first, count)
    if kind == "munmap":
        return ("munmap", slot)
    return ("reclaim",)


class Pair:
    """One process on each side: real memory in this process, a simulated process."""

    def __init__(self, seed: int, proc, regions: dict[int, Region], tally: Tally) -> None:
        self.seed = seed
        self.proc = proc
        self.regions = regions
        self.tally = tally
        self.history: list[tuple] = []

    def apply(self, step: int, op: tuple, real: bool = True) -> None:
        """Run op on the simulator and (unless real is false) on the real memory, then compare."""
        self.history.append(op)
        kind = op[0]
        if kind == "mmap":
            _, slot, npages = op
            self.regions[slot] = Region(real_map(npages) if real else None,
                                        self.proc.mmap(npages * PAGE), npages)
        elif kind == "munmap":
            region = self.regions.pop(op[1])
            if real:
                region.real.close()
            self.proc.munmap(region.addr, region.npages * PAGE)
        elif kind == "write":
            _, slot, first, count, offset, size = op
            region = self.regions[slot]
            for page in range(first, first + count):
                data = data_for(self.seed, step, page, size)
                at = page * PAGE + offset
                if real:
                    region.real[at:at + size] = data
                self.proc.write(region.addr + at, data)
        elif kind == "read":
            _, slot, first, count = op
            region = self.regions[slot]
            nbytes = count * PAGE
            got = self.proc.read(region.addr + first * PAGE, nbytes)
            if real:
                self._compare(step, slot, first, region.real[first * PAGE:first * PAGE + nbytes],
                              got)
        elif kind in ("free", "dontneed"):
            _, slot, first, count = op
            region = self.regions[slot]
            advice = MADV_FREE if kind == "free" else MADV_DONTNEED
            if real and advice == MADV_FREE:
                # From each CPU: a page held in another CPU's LRU batch is skipped silently
                # (test_madv_free_skips_a_page_in_another_cpus_batch); this drains them.
                on_every_cpu(lambda: region.real.madvise(advice, first * PAGE, count * PAGE))
            elif real:
                region.real.madvise(advice, first * PAGE, count * PAGE)
            self.proc.madvise(region.addr + first * PAGE, count * PAGE, advice)
        elif kind == "reclaim":
            if real:
                self._reclaim_both(step)
            else:
                sim_reclaim(self.proc, list(self.regions.values()))
        if real:
            self.compare_all(step)

    def _reclaim_both(self, step: int) -> None:
        regions = list(self.regions.values())
        before = {slot: self._sim_pages(r) for slot, r in self.regions.items()}
        real_reclaim(regions)
        sim_reclaim(self.proc, regions)
        for attempt in range(3):
            survivors = []
            for slot, region in self.regions.items():
                sim_now = self._sim_pages(region)
                for page in range(region.npages):
                    was, sim = before[slot][page], sim_now[page]
                    if sim == PAGES_ZERO and was != PAGES_ZERO and \
                            self._real_page(region, page) == was:
                        survivors.append((region, page))  # the kernel kept it: best effort
            if attempt == 0:
                first_survivors = len(survivors)
            if not survivors:
                break
            if attempt < 2:
                # What discache's reclaim does with a page kept: free it again (the simulator
                # says it is lazily freed: nothing wrote it since), from each CPU, and retry.
                on_every_cpu(lambda: [region.real.madvise(MADV_FREE, page * PAGE, PAGE)
                                      for region, page in survivors])
                real_reclaim(regions)
                continue
            for region, page in survivors:
                region.real.madvise(MADV_DONTNEED, page * PAGE, PAGE)
            self.tally.survived += len(survivors)
        self.tally.retried += first_survivors - len(survivors)
        for slot, region in self.regions.items():
            sim_now = self._sim_pages(region)
            for page in range(region.npages):
                if before[slot][page] != PAGES_ZERO and sim_now[page] == PAGES_ZERO:
                    self.tally.taken += 1

    def _sim_pages(self, region: Region) -> list[bytes]:
        whole = self.proc.read(region.addr, region.npages * PAGE)
        return [whole[i * PAGE:(i + 1) * PAGE] for i in range(region.npages)]

    @staticmethod
    def _real_page(region: Region, page: int) -> bytes:
        return region.real[page * PAGE:(page + 1) * PAGE]

    def compare_all(self, step: int) -> None:
        """Every page of every region, real against simulated."""
        for slot, region in self.regions.items():
            self._compare(step, slot, 0, region.real[:], self.proc.read(
                region.addr, region.npages * PAGE))

    def _compare(self, step: int, slot: int, first: int, real: bytes, sim: bytes) -> None:
        npages = len(real) // PAGE
        self.tally.checks += npages
        if real == sim:
            return
        for i in range(npages):
            r, s = real[i * PAGE:(i + 1) * PAGE], sim[i * PAGE:(i + 1) * PAGE]
            if r != s:
                self.tally.mismatches.append({
                    "seed": self.seed, "step": step, "pid": os.getpid(), "slot": slot,
                    "page": first + i, "real": describe(r), "sim": describe(s),
                    "ops": list(self.history)})


def fork_step(pair: Pair, step: int, rng: random.Random) -> None:
    """Fork both sides; the child runs a few steps (writes among them) and compares on its own,
    reporting by pipe; the parent then runs the same steps on the simulated child, which exits,
    and compares its own pages."""
    child_regions = {slot: Region(r.real, r.addr, r.npages) for slot, r in pair.regions.items()}
    # The child's steps, drawn ahead (the parent replays them on its simulated child): a write,
    # then any steps, its own mmap and munmap of shared regions among them.
    shape = {slot: Region(None, 0, r.npages) for slot, r in child_regions.items()}
    batch = [("write", *random_op_write(rng, shape))]
    for _ in range(rng.randint(0, CHILD_STEPS - 1)):
        op = random_op(rng, shape)
        if op[0] == "mmap":
            shape[op[1]] = Region(None, 0, op[2])
        elif op[0] == "munmap":
            del shape[op[1]]
        batch.append(op)
    pair.history.append(("fork", batch))
    pair.tally.forks += 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compare, report, leave without running any cleanup
        status = 0
        try:
            os.close(read_end)
            child = Pair(pair.seed, pair.proc.fork(), child_regions, Tally())
            child.history = list(pair.history)
            for op in batch:
                child.apply(step, op)
            payload = pickle.dumps(("ok", child.tally))
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
            status = 1
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(payload)
    if kind == "error":
        raise AssertionError(f"seed {pair.seed}: the forked child failed:\n{value}")
    pair.tally.merge(value)
    sim_child = Pair(pair.seed, pair.proc.fork(), dict(child_regions), Tally())
    for op in batch:
        sim_child.apply(step, op, real=False)
    sim_child.proc.exit()
    pair.compare_all(step)


def random_op_write(rng: random.Random, regions: dict[int, Region]) -> tuple:
    """A write to some pages of one region (the child's write of "fork + write in the child")."""
    slot = rng.choice(sorted(regions))
    npages = regions[slot].npages
    first = rng.randrange(npages)
    return slot, first, rng.randint(1, npages - first), 0, PAGE


def run_sequence(seed: int, tally: Tally) -> None:
    """One seeded sequence on a fresh simulated kernel and fresh real mappings."""
    rng = random.Random(seed)
    kernel = SimulatedKernel(ram_pages=1024, swap_pages=0, page_size=PAGE)
    pair = Pair(seed, kernel.spawn(), {}, tally)
    try:
        for step in range(STEPS):
            if pair.regions and rng.random() < FORK_SHARE:
                fork_step(pair, step, rng)
            else:
                pair.apply(step, random_op(rng, pair.regions))
    finally:
        for region in pair.regions.values():
            region.real.close()


def test_pages_read_back_the_same_on_the_simulator_and_the_kernel():
    """>= 500 seeded sequences: zero disagreements; forced reclaims took real pages."""
    tally = Tally()
    for seed in range(SEQUENCES):
        run_sequence(seed, tally)
    print(f"\n{SEQUENCES} sequences, {tally.forks} forks, {tally.checks} page comparisons, "
          f"{tally.taken} lazily freed "
          f"pages taken by forced reclaims, {tally.retried} after a retry, {tally.survived} kept "
          "by the kernel through every retry (best effort)")
    assert not tally.mismatches, (
        f"{len(tally.mismatches)} disagreements, the first: {tally.mismatches[:3]}")
    assert tally.checks > SEQUENCES * STEPS and tally.forks > SEQUENCES // 10
    # The sequences must reach the nondeterministic case, and forced reclaim must mostly work,
    # or the zeros side of the comparison was never exercised.
    assert tally.taken > 100
    assert tally.survived < tally.taken


# ---------------------------------------------------------------------- known deviations


def _pages_kept(m: mmap.mmap, npages: int) -> int:
    return sum(m[i * PAGE] != 0 for i in range(npages))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to put a page in "
                    "another CPU's LRU batch")
def test_madv_free_skips_a_page_in_another_cpus_batch():
    """Deviation 1: a real MADV_FREE silently skips a page that sits in another CPU's LRU batch
    (here: put back there by a MADV_PAGEOUT that could not page it out, having no swap), so a
    forced reclaim keeps it; the simulator marks every page.  MADV_FREE from each CPU (what the
    differential test does) drains the batches first, and the page is taken."""
    cpus = sorted(os.sched_getaffinity(0))
    npages = 4
    kept_single, kept_each = [], []
    try:
        for _ in range(10):
            for from_each in (False, True):
                m = real_map(npages)
                os.sched_setaffinity(0, {cpus[1]})
                m[:] = b"x" * (npages * PAGE)
                m.madvise(MADV_COLD)
                m.madvise(MADV_PAGEOUT)  # no swap here: kept, put back in this CPU's batch
                if from_each:
                    os.sched_setaffinity(0, set(cpus))
                    on_every_cpu(lambda: m.madvise(MADV_FREE))
                else:
                    os.sched_setaffinity(0, {cpus[0]})
                    m.madvise(MADV_FREE)
                    os.sched_setaffinity(0, set(cpus))
                real_reclaim([Region(m, 0, npages)])
                (kept_each if from_each else kept_single).append(_pages_kept(m, npages))
                m.close()
    finally:
        os.sched_setaffinity(0, set(cpus))
    kernel = SimulatedKernel(ram_pages=64, page_size=PAGE)
    proc = kernel.spawn()
    addr = proc.mmap(npages * PAGE)
    proc.write(addr, b"x" * (npages * PAGE))
    sim_reclaim(proc, [Region(None, addr, npages)])
    proc.madvise(addr, npages * PAGE, MADV_FREE)
    sim_reclaim(proc, [Region(None, addr, npages)])
    assert proc.read(addr, npages * PAGE) == bytes(npages * PAGE)  # the simulator takes them
    # Per-CPU batches are shared by every task of a CPU: another task may drain one meanwhile,
    # so the skip shows in most trials, not all; from each CPU nothing is ever skipped.
    assert max(kept_single) == npages, kept_single
    assert kept_each == [0] * 10, kept_each


def _rss_pages() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1])


def test_a_read_fault_maps_the_zero_page_on_linux_and_a_frame_in_the_simulator():
    """Deviation 2 (accounting only, both read zeros): reading untouched private memory maps
    Linux's shared zero page, using no memory; the simulator gives each page a zero frame."""
    npages = 1024
    m = real_map(npages)
    try:
        before = _rss_pages()
        assert all(m[i * PAGE] == 0 for i in range(npages))
        real_growth = _rss_pages() - before
    finally:
        m.close()
    kernel = SimulatedKernel(ram_pages=4 * npages, page_size=PAGE)
    proc = kernel.spawn()
    addr = proc.mmap(npages * PAGE)
    assert proc.touch(addr, npages * PAGE) == npages
    assert kernel.stats()["used_pages"] == npages
    assert real_growth < npages // 4, real_growth
