"""A pure-Python model of PageTable's semantics: obvious, O(N), and the tests' oracle."""
from __future__ import annotations

STATE_NAMES = ("absent", "present", "volatile", "purged")


class PageTableModel:
    """Per-page flags; every operation walks its pages. Same answers as PageTable, any strategy."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.present = [False] * npages
        self.volatile = [False] * npages
        self.lost = [False] * npages  # discarded since the page was last marked volatile

    def _span(self, first: int, count: int) -> range:
        if count <= 0:
            raise ValueError(f"count must be a positive number of pages, got {count}")
        if first < 0 or first >= self.npages or count > self.npages - first:
            raise IndexError(f"pages [{first}, {first + count}) are outside the table")
        return range(first, first + count)

    def populate(self, first: int, count: int) -> int:
        """Fault pages in; returns how many were not present before."""
        added = 0
        for p in self._span(first, count):
            added += not self.present[p]
            self.present[p] = True
        return added

    def discard(self, first: int, count: int) -> int:
        """Drop pages without a purge; returns how many were present."""
        dropped = 0
        for p in self._span(first, count):
            dropped += self.present[p]
            self.present[p] = False
        return dropped

    def mark_volatile(self, first: int, count: int) -> None:
        """Mark pages volatile; already volatile pages keep what they lost."""
        for p in self._span(first, count):
            if not self.volatile[p]:
                self.volatile[p] = True
                self.lost[p] = False

    def unmark(self, first: int, count: int) -> bool:
        """Make pages non-volatile; True if any of them was lost while volatile."""
        purged = False
        for p in self._span(first, count):
            purged |= self.volatile[p] and self.lost[p]
            self.volatile[p] = False
            self.lost[p] = False
        return purged

    def purge(self, page: int) -> bool:
        """Discard one present volatile page."""
        self._span(page, 1)
        if not (self.volatile[page] and self.present[page]):
            return False
        self.present[page] = False
        self.lost[page] = True
        return True

    def state(self, page: int) -> str:
        """'absent', 'present', 'volatile' or 'purged'."""
        self._span(page, 1)
        if self.volatile[page]:
            if self.present[page]:
                return "volatile"
            return "purged" if self.lost[page] else "absent"
        return "present" if self.present[page] else "absent"

    def is_volatile(self, page: int) -> bool:
        """True if the page is marked volatile."""
        self._span(page, 1)
        return self.volatile[page]

    def states(self, first: int = 0, count: int | None = None) -> bytes:
        """State codes of a span of pages, one byte each."""
        count = self.npages - first if count is None else count
        return bytes(STATE_NAMES.index(self.state(p)) for p in self._span(first, count))
