"""Page spans carved out of segments, with exact-size free lists and coalescing."""
from __future__ import annotations

import bisect
from typing import NamedTuple, Optional

EXACT_LISTS = 256  # free lists for spans of 1..255 pages; larger spans share one sorted list


class Span(NamedTuple):
    """Pages [first, first + npages) of segment `segment`."""

    segment: int
    first: int
    npages: int

    @property
    def end(self) -> int:
        """The first page past the span."""
        return self.first + self.npages


class SpanHeap:
    """Best-fit allocation of page spans from segments (Chromium's discardable client heap)."""

    def __init__(self) -> None:
        # Exact-size lists are insertion-ordered dicts used as LIFO stacks: the span freed last
        # is reused first, while its pages are most likely still resident.
        self._exact: list[dict[Span, None]] = [{} for _ in range(EXACT_LISTS)]
        self._large: list[tuple[int, int, int]] = []  # sorted (npages, segment, first)
        self._by_first: dict[tuple[int, int], Span] = {}  # free spans by (segment, first)
        self._by_end: dict[tuple[int, int], Span] = {}  # free spans by (segment, end)
        self._segments: dict[int, int] = {}  # segment -> pages
        self._used: dict[int, int] = {}  # segment -> pages allocated
        self._allocated: dict[tuple[int, int], int] = {}  # (segment, first) -> npages
        self.free_pages = 0

    @property
    def segments(self) -> dict[int, int]:
        """Pages of each segment, by segment id."""
        return dict(self._segments)

    def used_pages(self, segment: int) -> int:
        """Pages of a segment that are allocated."""
        return self._used[segment]

    def add_segment(self, segment: int, npages: int) -> None:
        """Hand a new segment's pages to the heap, all free."""
        if segment in self._segments:
            raise ValueError(f"segment {segment} is already in the heap")
        if npages <= 0:
            raise ValueError(f"a segment needs at least one page, got {npages}")
        self._segments[segment] = npages
        self._used[segment] = 0
        self._insert(Span(segment, 0, npages))

    def remove_segment(self, segment: int) -> None:
        """Take a wholly free segment out of the heap."""
        if self._used.get(segment, 0):
            raise ValueError(f"segment {segment} still has {self._used[segment]} pages in use")
        if segment not in self._segments:
            raise ValueError(f"segment {segment} is not in the heap")
        del self._segments[segment], self._used[segment]
        self._remove(self._by_first[(segment, 0)])  # wholly free: one coalesced span

    def allocate(self, npages: int) -> Optional[Span]:
        """The best-fitting free span of npages, or None when no segment has room."""
        if npages <= 0:
            raise ValueError(f"npages must be positive, got {npages}")
        found = self._best_fit(npages)
        if found is None:
            return None
        self._remove(found)
        if found.npages > npages:
            self._insert(Span(found.segment, found.first + npages, found.npages - npages))
        self._used[found.segment] += npages
        self._allocated[(found.segment, found.first)] = npages
        return Span(found.segment, found.first, npages)

    def free(self, span: Span) -> Span:
        """Return a span, merged with free neighbours; the free span that results."""
        if self._allocated.get((span.segment, span.first)) != span.npages:
            raise ValueError(f"{span} is not an allocated span of this heap (double free?)")
        del self._allocated[(span.segment, span.first)]
        self._used[span.segment] -= span.npages
        merged = span
        before = self._by_end.get((span.segment, span.first))
        if before is not None:
            self._remove(before)
            merged = Span(span.segment, before.first, before.npages + merged.npages)
        after = self._by_first.get((span.segment, span.end))
        if after is not None:
            self._remove(after)
            merged = Span(span.segment, merged.first, merged.npages + after.npages)
        self._insert(merged)
        return merged

    def _best_fit(self, npages: int) -> Optional[Span]:
        for size in range(npages, EXACT_LISTS):
            if self._exact[size]:
                return next(reversed(self._exact[size]))
        k = bisect.bisect_left(self._large, (npages, -1, -1))
        if k < len(self._large):
            size, segment, first = self._large[k]
            return Span(segment, first, size)
        return None

    def _insert(self, span: Span) -> None:
        if span.npages < EXACT_LISTS:
            self._exact[span.npages][span] = None
        else:
            bisect.insort(self._large, (span.npages, span.segment, span.first))
        self._by_first[(span.segment, span.first)] = span
        self._by_end[(span.segment, span.end)] = span
        self.free_pages += span.npages

    def _remove(self, span: Span) -> None:
        if span.npages < EXACT_LISTS:
            del self._exact[span.npages][span]
        else:
            self._large.remove((span.npages, span.segment, span.first))
        del self._by_first[(span.segment, span.first)]
        del self._by_end[(span.segment, span.end)]
        self.free_pages -= span.npages

    def free_spans(self) -> list[Span]:
        """Every free span, sorted."""
        return sorted(self._by_first.values())
