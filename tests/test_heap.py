"""SpanHeap: best fit, coalescing, segment accounting, misuse."""
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from discache.heap import EXACT_LISTS, Span, SpanHeap


def test_allocate_splits_and_free_coalesces():
    heap = SpanHeap()
    heap.add_segment(7, 1024)
    a, b, c = heap.allocate(1), heap.allocate(10), heap.allocate(300)
    assert (a, b, c) == (Span(7, 0, 1), Span(7, 1, 10), Span(7, 11, 300))
    assert heap.free_pages == 1024 - 311 and heap.used_pages(7) == 311
    assert heap.free(b) == Span(7, 1, 10)
    assert heap.free(a) == Span(7, 0, 11)  # merged with b's pages
    assert heap.free(c) == Span(7, 0, 1024)  # and with everything
    assert heap.free_spans() == [Span(7, 0, 1024)]
    heap.remove_segment(7)
    assert heap.segments == {} and heap.free_pages == 0


def test_best_fit_prefers_the_smallest_span_that_fits():
    heap = SpanHeap()
    heap.add_segment(0, 64)
    spans = [heap.allocate(n) for n in (4, 1, 8, 1, 2, 1)]
    heap.free(spans[0])  # a hole of 4
    heap.free(spans[2])  # a hole of 8
    heap.free(spans[4])  # a hole of 2
    assert heap.allocate(3) == Span(0, 0, 3)  # the 4-page hole, not the 8 nor the tail
    assert heap.allocate(2) == spans[4]


def test_large_spans_use_the_sorted_list():
    heap = SpanHeap()
    heap.add_segment(0, 4096)
    heap.add_segment(1, 1000)
    big = heap.allocate(EXACT_LISTS + 1)
    assert big.segment == 1, "best fit: the 1000-page segment"
    assert heap.allocate(2000).segment == 0
    assert heap.allocate(4096) is None


def test_misuse_raises_and_changes_nothing():
    heap = SpanHeap()
    heap.add_segment(0, 16)
    span = heap.allocate(4)
    with pytest.raises(ValueError, match="already"):
        heap.add_segment(0, 16)
    with pytest.raises(ValueError, match="at least one page"):
        heap.add_segment(1, 0)
    with pytest.raises(ValueError, match="positive"):
        heap.allocate(0)
    with pytest.raises(ValueError, match="still has 4 pages"):
        heap.remove_segment(0)
    with pytest.raises(ValueError, match="not in the heap"):
        heap.remove_segment(5)
    before = heap.free_spans(), heap.free_pages
    for bad in (Span(0, 0, 3), Span(0, 4, 4), Span(1, 0, 4)):
        with pytest.raises(ValueError, match="not an allocated span"):
            heap.free(bad)
    heap.free(span)
    with pytest.raises(ValueError, match="double free"):
        heap.free(span)
    assert heap.free_spans() == [Span(0, 0, 16)] and before[1] == 12


class HeapMachine(RuleBasedStateMachine):
    """Random allocate/free against a per-page ownership map."""

    def __init__(self):
        super().__init__()
        self.heap = SpanHeap()
        self.sizes = {}
        self.owner = {}  # (segment, page) -> span
        self.live = []

    @rule(npages=st.integers(1, 600))
    def add_segment(self, npages):
        segment = len(self.sizes)
        self.heap.add_segment(segment, npages)
        self.sizes[segment] = npages

    @rule(npages=st.integers(1, 300))
    def allocate(self, npages):
        span = self.heap.allocate(npages)
        fits = any(s.npages >= npages for s in self.heap.free_spans()) or span is not None
        if span is None:
            assert not fits
            return
        assert span.npages == npages
        for page in range(span.first, span.end):
            assert (span.segment, page) not in self.owner, "pages handed out twice"
            self.owner[(span.segment, page)] = span
        self.live.append(span)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10_000))
    def free(self, index):
        span = self.live.pop(index % len(self.live))
        self.heap.free(span)
        for page in range(span.first, span.end):
            del self.owner[(span.segment, page)]

    @invariant()
    def free_spans_are_exactly_the_unowned_pages_fully_coalesced(self):
        free = self.heap.free_spans()
        pages = set()
        for a, b in zip(free, free[1:]):
            assert not (a.segment == b.segment and a.end >= b.first), "touching free spans"
        for span in free:
            for page in range(span.first, span.end):
                pages.add((span.segment, page))
        every = {(s, p) for s, n in self.sizes.items() if s in self.heap.segments
                 for p in range(n)}
        assert pages == every - set(self.owner)
        assert self.heap.free_pages == len(pages)


TestHeapMachine = HeapMachine.TestCase
