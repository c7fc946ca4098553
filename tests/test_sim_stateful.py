"""Random operation sequences on a `token` and a `walk` kernel must give identical results."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from discache import PurgedPageError
from discache.sim._sim import SWAPPED_BIT
from discache.sim import (
    MADV_DONTNEED,
    MADV_FREE,
    MADV_NONVOLATILE,
    MADV_VOLATILE,
    MADV_VOLATILE_ZEROFILL,
    SimulatedKernel,
)

PS = 256
STRATEGIES = ("token", "walk")
ADVICE = st.sampled_from([MADV_VOLATILE, MADV_VOLATILE, MADV_NONVOLATILE, MADV_NONVOLATILE,
                          MADV_VOLATILE_ZEROFILL, MADV_FREE, MADV_DONTNEED, 12345])
READ_SIZES = st.sampled_from([0, 1, 10, PS, 3 * PS])
# Counters that measure the cost of a strategy, the one thing allowed to differ.
COST_KEYS = {"pte_visits", "record_visits", "bookkeeping_bytes"}


def outcome(fn):
    """A call's result, or its exception reduced to what a caller can observe."""
    try:
        return ("ok", fn())
    except PurgedPageError as e:
        return ("sigbus", e.address)
    except OSError as e:
        return ("oserror", type(e).__name__, e.errno)
    except MemoryError:
        return ("nomem",)


class TokenVsWalk(RuleBasedStateMachine):
    """One world per strategy; every rule runs in both and must give the same outcome."""

    @initialize(swap=st.sampled_from([0, 8]))
    def boot(self, swap):
        self.kernels = [SimulatedKernel(ram_pages=16, swap_pages=swap, page_size=PS, strategy=s,
                                        va_pages=256) for s in STRATEGIES]
        for k in self.kernels:
            k.spawn()
        self.maps = []  # (pid, address, npages), identical in both worlds
        self.fds = []

    def both(self, fn):
        results = [outcome(lambda w=w: fn(w)) for w in range(2)]
        assert results[0] == results[1], results
        return results[0]

    def proc(self, w, i):
        """The i-th live process (by pid) of world w; both worlds have the same pids."""
        procs = self.kernels[w].processes
        return procs[sorted(procs)[i % len(procs)]]

    def target(self, m, j):
        """(process, address, npages): the mapping's own process, or any live one (j >= 0)."""
        pid, addr, npages = self.maps[m % len(self.maps)]
        if j >= 0 or pid not in self.kernels[0].processes:
            return (lambda w: self.proc(w, j)), addr, npages
        return (lambda w: self.kernels[w].processes[pid]), addr, npages

    @precondition(lambda self: len(self.kernels[0].processes) < 5)
    @rule(i=st.integers(0, 7), fork=st.booleans())
    def spawn_or_fork(self, i, fork):
        if fork:
            self.both(lambda w: self.proc(w, i).fork().pid)
        else:
            self.both(lambda w: self.kernels[w].spawn().pid)

    @rule(i=st.integers(0, 7), npages=st.integers(1, 8))
    def mmap_private(self, i, npages):
        r = self.both(lambda w: (self.proc(w, i).pid, self.proc(w, i).mmap(npages * PS)))
        if r[0] == "ok":
            self.maps.append((r[1][0], r[1][1], npages))

    @precondition(lambda self: len(self.fds) < 3)
    @rule(npages=st.integers(1, 6))
    def memfd(self, npages):
        r = self.both(lambda w: self.kernels[w].memfd_create(npages * PS))
        self.fds.append((r[1], npages))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 7), f=st.integers(0, 99), off=st.integers(0, 5),
          npages=st.integers(1, 6))
    def mmap_shared(self, i, f, off, npages):
        fd, size = self.fds[f % len(self.fds)]
        off %= size
        npages = min(npages, size - off) if npages < 6 else npages
        r = self.both(lambda w: (self.proc(w, i).pid,
                                 self.proc(w, i).mmap(npages * PS, fd=fd, offset=off * PS)))
        if r[0] == "ok":
            self.maps.append((r[1][0], r[1][1], npages))

    @precondition(lambda self: self.fds)
    @rule(f=st.integers(0, 99))
    def close(self, f):
        fd, _ = self.fds.pop(f % len(self.fds))
        self.both(lambda w: self.kernels[w].close(fd))

    def _write(self, m, j, page, data):
        proc, addr, npages = self.target(m, j)
        self.both(lambda w: proc(w).write(addr + (page % npages) * PS + 3, data))

    def _madvise(self, m, j, page, count, advice):
        proc, addr, npages = self.target(m, j)
        page %= npages
        count = min(count, npages - page)
        self.both(lambda w: proc(w).madvise(addr + page * PS, count * PS, advice))

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), page=st.integers(0, 7),
          data=st.binary(min_size=1, max_size=300))
    def write(self, m, j, page, data):
        self._write(m, j, page, data)

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), page=st.integers(0, 7),
          data=st.binary(min_size=1, max_size=8))
    def write_more(self, m, j, page, data):
        self._write(m, j, page, data)

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), page=st.integers(0, 7), n=READ_SIZES)
    def read(self, m, j, page, n):
        proc, addr, npages = self.target(m, j)
        self.both(lambda w: proc(w).read(addr + (page % npages) * PS, n))

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), page=st.integers(0, 7),
          count=st.integers(1, 8), advice=ADVICE)
    def madvise(self, m, j, page, count, advice):
        self._madvise(m, j, page, count, advice)

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), page=st.integers(0, 7),
          count=st.integers(1, 8), advice=st.sampled_from([MADV_VOLATILE, MADV_NONVOLATILE]))
    def madvise_volatile(self, m, j, page, count, advice):
        self._madvise(m, j, page, count, advice)

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), page=st.integers(-1, 9),
          count=st.integers(0, 9), advice=ADVICE, skew=st.sampled_from([0, 1, PS - 1]))
    def madvise_anywhere(self, m, j, page, count, advice, skew):
        proc, addr, npages = self.target(m, j)
        self.both(lambda w: proc(w).madvise(addr + page * PS + skew, count * PS, advice))

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), page=st.integers(0, 7),
          count=st.integers(1, 4))
    def munmap(self, m, j, page, count):
        proc, addr, npages = self.target(m, j)
        self.both(lambda w: proc(w).munmap(addr + (page % npages) * PS, count * PS))

    @precondition(lambda self: self.maps)
    @rule(m=st.integers(0, 99), j=st.integers(-3, 7), write=st.booleans())
    def touch_all(self, m, j, write):
        proc, addr, npages = self.target(m, j)
        self.both(lambda w: proc(w).touch(addr, npages * PS, write))

    @rule(n=st.integers(0, 12))
    def reclaim(self, n):
        self.both(lambda w: self.kernels[w].reclaim(n))

    @precondition(lambda self: len(self.kernels[0].processes) > 1)
    @rule(i=st.integers(0, 7))
    def exit(self, i):
        self.both(lambda w: self.proc(w, i).exit())

    @invariant()
    def same_picture(self):
        views = []
        for k in self.kernels:
            stats = {key: v for key, v in k.stats().items() if key not in COST_KEYS}
            procs = [(p.pid, p.volatile_pages(), [(m.start, m.end) for m in p.mappings])
                     for p in k.processes.values()]
            views.append((stats, k.volatile_pages(), procs, k.core.resident()))
        assert views[0] == views[1]

    @invariant()
    def every_frame_is_counted_once_per_mapping(self):
        for k in self.kernels:
            mappings = Counter()
            for pg in k._pagers():
                for page in range(pg.top):
                    s = pg.slot(page)
                    if s and not s & SWAPPED_BIT:
                        mappings[s] += 1
            assert {f: count for f, count, _, _ in k.core.resident()} == dict(mappings)
            assert len(mappings) + k.stats()["free_pages"] == k.ram_pages

    @invariant()
    def page_table_agrees_with_slots(self):
        for k in self.kernels:
            pagers = [p.pager for p in k.processes.values()] + [f.pager for f in k.files.values()]
            for pg in pagers:
                states = pg.table.states(0, min(pg.npages, 64))
                for page, state in enumerate(states):
                    # present or volatile in the table exactly when a frame or swap slot backs it
                    assert (state in (1, 2)) == (pg.slot(page) != 0), (pg, page, state)


TokenVsWalk.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_token_and_walk_agree = TokenVsWalk.TestCase


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_outcome_helper_sees_sigbus(strategy):
    k = SimulatedKernel(ram_pages=4, page_size=PS, strategy=strategy)
    p = k.spawn()
    a = p.mmap(PS)
    p.write(a, b"x")
    p.madvise(a, PS, MADV_VOLATILE)
    k.reclaim(1)
    assert outcome(lambda: p.read(a, 1)) == ("sigbus", a)
