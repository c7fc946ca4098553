"""Random sequences checked against what a program may observe: locked data is never lost, a lost
page shows as SIGBUS or zeros only while volatile, and MADV_NONVOLATILE reports every loss and
only losses."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from discache import PurgedPageError
from discache.sim import MADV_NONVOLATILE, MADV_VOLATILE, MADV_VOLATILE_ZEROFILL, SimulatedKernel

PS = 256
NPAGES = 12
ZEROS = bytes(8)


class Page:
    """What one process knows about one of its pages."""

    __slots__ = ("content", "mode", "lost", "maybe_zero")

    def __init__(self, content=ZEROS, mode=None, lost=False, maybe_zero=False):
        self.content = content        # the 8 bytes last written at offset 0
        self.mode = mode              # None (locked), "sigbus" or "zero"
        self.lost = lost              # a loss was observed since the page was marked
        self.maybe_zero = maybe_zero  # reported lost by an unmark but not read back yet

    def copy(self):
        return Page(self.content, self.mode, self.lost, self.maybe_zero)


class ObservedSemantics(RuleBasedStateMachine):
    """One kernel; per process a model of its pages, checked at every observation."""

    @initialize(strategy=st.sampled_from(["token", "walk"]), ram=st.sampled_from([6, 10, 40]),
                shared=st.booleans())
    def boot(self, strategy, ram, shared):
        self.k = SimulatedKernel(ram_pages=ram, page_size=PS, strategy=strategy, va_pages=64)
        p = self.k.spawn()
        if shared:
            # a memfd: volatility is the file's, every process sees the same pages and marks
            self.addr = p.mmap(NPAGES * PS, fd=self.k.memfd_create(NPAGES * PS))
        else:
            self.addr = p.mmap(NPAGES * PS)
        self.shared = shared
        self.procs = [p]
        self.models = {p.pid: [Page() for _ in range(NPAGES)]}
        self.stamp = 0

    def views(self, i):
        """The process and the models that its operations change (all of them for a file)."""
        p = self.procs[i % len(self.procs)]
        pages = self.models[p.pid]
        return p, ([self.models[q.pid] for q in self.procs] if self.shared else [pages]), pages

    def observe(self, p, pages, page, content):
        """Check one read of a page against the model."""
        m = pages[page]
        if content == m.content:
            m.maybe_zero = False
            return
        if m.maybe_zero and content == ZEROS:
            m.content, m.maybe_zero = ZEROS, False
            return
        assert m.mode is not None, f"locked page {page} of pid {p.pid} lost its data"
        assert content == ZEROS, (page, content, m.content)
        # only a zero-fill page may read back zeros while volatile
        assert m.mode == "zero", f"page {page} read zeros in SIGBUS mode"
        self.lost(page, p)

    def lost(self, page, p):
        for pages in (self.models.values() if self.shared else [self.models[p.pid]]):
            pages[page].lost = True
            pages[page].content = ZEROS

    @rule(i=st.integers(0, 3), page=st.integers(0, NPAGES - 1))
    def write(self, i, page):
        p, affected, pages = self.views(i)
        self.stamp += 1
        data = self.stamp.to_bytes(8, "little")
        zero_fills = self.k.stats()["zero_fills"]
        try:
            p.write(self.addr + page * PS, data)
        except PurgedPageError as e:
            assert e.address == self.addr + page * PS
            assert pages[page].mode == "sigbus", f"SIGBUS on a {pages[page].mode} page"
            self.lost(page, p)
            return
        except MemoryError:
            # nothing could be freed (a page being copied on write is pinned, hence <= 1)
            assert self.k.volatile_pages() <= 1 and self.k.stats()["lazyfree_pages"] == 0
            return
        if self.k.stats()["zero_fills"] > zero_fills:
            assert pages[page].mode == "zero"
            self.lost(page, p)  # a purged page was zero-filled under the write
        for model in affected:
            model[page].content = data
            model[page].maybe_zero = False

    @rule(i=st.integers(0, 3), page=st.integers(0, NPAGES - 1))
    def read(self, i, page):
        p, _, pages = self.views(i)
        try:
            content = p.read(self.addr + page * PS, 8)
        except PurgedPageError:
            assert pages[page].mode == "sigbus", f"SIGBUS on a {pages[page].mode} page"
            self.lost(page, p)
            return
        except MemoryError:
            return
        self.observe(p, pages, page, content)

    @rule(i=st.integers(0, 3), first=st.integers(0, NPAGES - 1), count=st.integers(1, NPAGES),
          zero=st.booleans())
    def mark(self, i, first, count, zero):
        p, affected, _ = self.views(i)
        count = min(count, NPAGES - first)
        advice = MADV_VOLATILE_ZEROFILL if zero else MADV_VOLATILE
        p.madvise(self.addr + first * PS, count * PS, advice)
        for model in affected:
            for page in range(first, first + count):
                if model[page].mode is None:
                    model[page].lost = False
                model[page].mode = "zero" if zero else "sigbus"

    @rule(i=st.integers(0, 3), first=st.integers(0, NPAGES - 1), count=st.integers(1, NPAGES))
    def unmark(self, i, first, count):
        p, affected, pages = self.views(i)
        count = min(count, NPAGES - first)
        was_volatile = [pages[q].mode is not None for q in range(first, first + count)]
        seen_lost = any(pages[q].lost and pages[q].mode is not None
                        for q in range(first, first + count))
        purged = p.madvise(self.addr + first * PS, count * PS, MADV_NONVOLATILE)
        if seen_lost:
            assert purged == 1, "a loss the program saw was not reported"
        for model in affected:
            for q in range(first, first + count):
                model[q].mode = None
        # now locked: every page reads its content, or zeros if it was lost (then purged == 1)
        zeros = 0
        for q in range(first, first + count):
            try:
                content = p.read(self.addr + q * PS, 8)
            except MemoryError:
                # RAM is full of locked pages: the rest of the range cannot be read back now
                for model in affected:
                    for r in range(q, first + count):
                        model[r].lost = False
                        model[r].maybe_zero |= bool(purged) and was_volatile[r - first]
                return
            if content != pages[q].content:
                assert content == ZEROS and (was_volatile[q - first] or pages[q].maybe_zero), (
                    q, content, pages[q].content)
                # zeros of a loss an earlier unmark already reported need no new report
                zeros += not pages[q].maybe_zero
                for model in affected:
                    model[q].content = ZEROS
            for model in affected:
                model[q].maybe_zero = False
        if zeros:
            assert purged == 1, "pages were lost but MADV_NONVOLATILE returned 0"
        if purged:
            # a report needs a loss: seen, found now, or invisible on a page that held zeros
            assert seen_lost or zeros or any(
                was_volatile[q - first] and pages[q].content == ZEROS
                for q in range(first, first + count)), "MADV_NONVOLATILE reported a false loss"
        for model in affected:
            for q in range(first, first + count):
                model[q].lost = False

    @rule(n=st.integers(0, 8))
    def reclaim(self, n):
        freed = self.k.reclaim(n)
        assert 0 <= freed <= n

    @precondition(lambda self: len(self.procs) < 4)
    @rule(i=st.integers(0, 3))
    def fork(self, i):
        p = self.procs[i % len(self.procs)]
        child = p.fork()
        self.procs.append(child)
        self.models[child.pid] = [m.copy() for m in self.models[p.pid]]

    @precondition(lambda self: len(self.procs) > 1)
    @rule(i=st.integers(0, 3))
    def exit(self, i):
        p = self.procs.pop(i % len(self.procs))
        p.exit()
        del self.models[p.pid]

    @invariant()
    def counts_are_consistent(self):
        marked = [sum(m.mode is not None for m in self.models[p.pid]) for p in self.procs]
        assert [p.volatile_pages() for p in self.procs] == marked
        assert self.k.volatile_pages() <= self.k.stats()["used_pages"]


ObservedSemantics.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_observed_semantics = ObservedSemantics.TestCase
