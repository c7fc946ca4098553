"""A set of disjoint half-open page intervals (which volatile pages zero-fill instead of SIGBUS)."""
from __future__ import annotations

from bisect import bisect_right


class IntervalSet:
    """Disjoint, sorted [start, end) intervals of page numbers."""

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def copy(self) -> IntervalSet:
        """An independent copy."""
        other = IntervalSet()
        other.starts = self.starts[:]
        other.ends = self.ends[:]
        return other

    def __contains__(self, page: int) -> bool:
        k = bisect_right(self.starts, page) - 1
        return k >= 0 and page < self.ends[k]

    def __len__(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))

    def remove(self, start: int, end: int) -> None:
        """Take [start, end) out of the set."""
        if start >= end or not self.starts:
            return
        i = max(bisect_right(self.starts, start) - 1, 0)
        j = bisect_right(self.starts, end - 1)
        pieces_s: list[int] = []
        pieces_e: list[int] = []
        for k in range(i, j):
            s, e = self.starts[k], self.ends[k]
            if e <= start or s >= end:
                pieces_s.append(s)
                pieces_e.append(e)
                continue
            if s < start:
                pieces_s.append(s)
                pieces_e.append(start)
            if e > end:
                pieces_s.append(end)
                pieces_e.append(e)
        self.starts[i:j] = pieces_s
        self.ends[i:j] = pieces_e

    def add(self, start: int, end: int) -> None:
        """Put [start, end) into the set, merging with neighbours."""
        if start >= end:
            return
        self.remove(start, end)
        k = bisect_right(self.starts, start)
        if k > 0 and self.ends[k - 1] == start:
            start = self.starts[k - 1]
            k -= 1
            del self.starts[k], self.ends[k]
        if k < len(self.starts) and self.starts[k] == end:
            end = self.ends[k]
            del self.starts[k], self.ends[k]
        self.starts.insert(k, start)
        self.ends.insert(k, end)

    def items(self) -> list[tuple[int, int]]:
        """The intervals, in order."""
        return list(zip(self.starts, self.ends))
