#!/usr/bin/env python3
"""Fuzz discache.heap.SpanHeap: segments, best-fit allocation and coalescing frees."""
from __future__ import annotations

from _harness import atheris, checked, main, REJECTED

with atheris.instrument_imports():
    from discache.heap import Span, SpanHeap


def picture(heap: SpanHeap) -> tuple:
    return heap.segments, heap.free_spans(), heap.free_pages, dict(heap._allocated)


def check(heap: SpanHeap, allocated: set) -> None:
    """Free and allocated spans tile every segment exactly; free neighbours are merged."""
    for seg, npages in heap.segments.items():
        pieces = sorted([(s.first, s.npages, "free") for s in heap.free_spans() if s.segment == seg]
                        + [(s.first, s.npages, "used") for s in allocated if s.segment == seg])
        at = 0
        for k, (first, n, kind) in enumerate(pieces):
            assert first == at, (seg, pieces)
            at += n
            if k and kind == "free":
                assert pieces[k - 1][2] == "used", f"adjacent free spans not merged: {pieces}"
        assert at == npages, (seg, pieces)
        assert heap.used_pages(seg) == sum(s.npages for s in allocated if s.segment == seg)
    assert heap.free_pages == sum(s.npages for s in heap.free_spans())


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    heap = SpanHeap()
    allocated: set = set()
    for _ in range(fdp.ConsumeIntInRange(1, 50)):
        op = fdp.ConsumeIntInRange(0, 4)
        if op == 0:
            seg, npages = fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(-1, 300)
            refused = npages <= 0 or seg in heap.segments
            got = checked(lambda: heap.add_segment(seg, npages), (ValueError,),
                          lambda: picture(heap))
            assert (got is REJECTED) == refused, (seg, npages)
        elif op == 1:
            npages = fdp.ConsumeIntInRange(-1, 300)
            got = checked(lambda: heap.allocate(npages), (ValueError,), lambda: picture(heap))
            if got is REJECTED:
                assert npages <= 0
            elif got is not None:
                assert got.npages == npages and got not in allocated
                allocated.add(got)
            else:
                assert all(s.npages < npages for s in heap.free_spans()), "best fit missed"
        elif op == 2 and allocated and fdp.ConsumeBool():
            span = sorted(allocated)[fdp.ConsumeIntInRange(0, len(allocated) - 1)]
            allocated.discard(span)
            heap.free(span)
        elif op == 2:
            # a double free, a span never handed out, a wrong size: refused, nothing changes
            span = Span(fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(-1, 300),
                        fdp.ConsumeIntInRange(-1, 300))
            if span not in allocated:
                got = checked(lambda: heap.free(span), (ValueError,), lambda: picture(heap))
                assert got is REJECTED, span
        elif op == 3:
            seg = fdp.ConsumeIntInRange(0, 4)
            wholly_free = seg in heap.segments and heap.used_pages(seg) == 0
            got = checked(lambda: heap.remove_segment(seg), (ValueError,), lambda: picture(heap))
            assert (got is not REJECTED) == wholly_free, seg
        check(heap, allocated)


if __name__ == "__main__":
    main(test_one_input)
