"""DiscardableMemory (Chromium's base::DiscardableMemory, Python-shaped), the one class of every
allocation: a span of a segment.  What its owner (a manager) provides, and force_reclaim."""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from . import _core, validate


@runtime_checkable
class Reclaimable(Protocol):
    """What discache.force_reclaim takes: memory (or a cache of it) whose unlocked pages the
    kernel can be made to reclaim now."""

    def _force_reclaim(self) -> int:
        """Make the kernel reclaim the unlocked pages now; returns how many are gone."""


def force_reclaim(mem: Any) -> int:
    """Make the kernel reclaim mem's unlocked pages now; returns how many pages are gone."""
    if not isinstance(mem, Reclaimable):
        raise TypeError(f"cannot reclaim a {type(mem).__name__}")
    return mem._force_reclaim()


# The one class of every allocation: a span of a segment (compiled, discache/_span.pyx).
DiscardableMemory = _core.DiscardableMemory


class SpanOwner(Protocol):
    """What a DiscardableMemory asks of the one who handed its span out (a manager): the narrow
    interface between the memory and its owner's bookkeeping.  Every call comes under mutex."""

    backend: str

    @property
    def mutex(self) -> Any:
        """The lock every state change of the span happens under."""

    def lock_span(self, mem: "DiscardableMemory") -> int:
        """Make the span non-discardable; returns how many of its pages were lost."""

    def unlock_span(self, mem: "DiscardableMemory") -> None:
        """Make the span discardable."""

    def close_span(self, mem: "DiscardableMemory") -> None:
        """Take the span back and release its pages."""

    def purge_span(self, mem: "DiscardableMemory") -> int:
        """Discard the unlocked span now; returns the pages discarded."""

    def reclaim_span(self, mem: "DiscardableMemory") -> int:
        """Make the kernel reclaim the unlocked span now; returns the pages gone."""

    def span_buffer(self, mem: "DiscardableMemory") -> Any:
        """A buffer of the locked span's bytes, with an `exports` count."""


def allocate_sole_span(backend: str, new_segment: Callable[[int], Any],
                       nbytes: Any) -> DiscardableMemory:
    """nbytes of new memory, returned locked: a segment of one span (discache.allocate)."""
    nbytes = validate.size(nbytes, "nbytes", _core.physical_memory())
    npages = -(-nbytes // _core.page_size())
    segment = new_segment(npages)
    segment.claim_span(0, npages)
    return DiscardableMemory(None, segment, 0, npages, nbytes, backend=backend)
