"""DiscardableMemory (Chromium's base::DiscardableMemory, Python-shaped): the interface, and
SpanMemory, the one class of every allocation that is a span of a segment."""
from __future__ import annotations

import abc
import threading
from typing import Any, Optional, Protocol, runtime_checkable

from . import _core, tracing, validate
from .errors import PurgedError


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



class DiscardableMemory(abc.ABC):
    """Memory the system may discard while unlocked; lock() reports whether it did."""

    nbytes: int
    npages: int
    purged_pages: int

    @property
    @abc.abstractmethod
    def backend(self) -> str:
        """The backend's name."""

    @property
    @abc.abstractmethod
    def is_locked(self) -> bool:
        """True while locked."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once closed."""

    @property
    @abc.abstractmethod
    def data(self) -> memoryview:
        """Writable view of the nbytes, only while locked."""

    @abc.abstractmethod
    def lock(self) -> bool:
        """Lock; True if intact, False if something was purged (contents undefined, refill)."""

    @abc.abstractmethod
    def unlock(self) -> None:
        """Unlock: the memory may be discarded until the next lock()."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the memory."""

    @abc.abstractmethod
    def read(self, offset: int = 0, size: int = -1) -> bytes:
        """Copy bytes out."""

    @abc.abstractmethod
    def readinto(self, buffer: Any, offset: int = 0) -> int:
        """Copy bytes into buffer; returns the count."""

    @abc.abstractmethod
    def write(self, data: Any, offset: int = 0) -> int:
        """Copy bytes in; returns the count."""

    @abc.abstractmethod
    def _purge(self) -> int:
        """Discard the pages now if unlocked (a policy's purge); returns how many went."""

    @abc.abstractmethod
    def _force_reclaim(self) -> int:
        """Make the kernel reclaim the pages now if unlocked (discache.force_reclaim); returns how
        many are gone."""

    def __enter__(self) -> memoryview:
        if not self.lock():
            raise PurgedError(
                f"{self.purged_pages} of {self.npages} pages were purged; the memory is locked "
                "with undefined contents: refill mem.data, then unlock() or close()")
        return self.data

    def __exit__(self, *exc_info: Any) -> None:
        if self.is_locked:
            self.unlock()


DiscardableMemory.register(_core.MappedMemory)  # MadvFreeMemory, AshmemMemory: compiled, whole


def _released(view: memoryview) -> bool:
    """True once the caller released the view."""
    try:
        view.nbytes
    except ValueError:
        return True
    return False


class SpanOwner(Protocol):
    """What a SpanMemory asks of whoever hands its span out (a manager, or a segment of one
    span): the narrow interface between the memory and its owner's bookkeeping."""

    backend: str

    @property
    def mutex(self) -> Any:
        """The lock every state change of the span happens under."""

    def lock_span(self, mem: "SpanMemory") -> int:
        """Make the span non-discardable; returns how many of its pages were lost."""

    def unlock_span(self, mem: "SpanMemory") -> None:
        """Make the span discardable."""

    def close_span(self, mem: "SpanMemory") -> None:
        """Take the span back and release its pages."""

    def purge_span(self, mem: "SpanMemory") -> int:
        """Discard the unlocked span now; returns the pages discarded."""

    def reclaim_span(self, mem: "SpanMemory") -> int:
        """Make the kernel reclaim the unlocked span now; returns the pages gone."""

    def span_buffer(self, mem: "SpanMemory") -> Any:
        """A buffer of the locked span's bytes, with an `exports` count."""


class SpanMemory(DiscardableMemory):
    """Pages [first, first+npages) of a segment: the one class of every allocation made by a
    DiscardableMemoryManager, and of discache.allocate on the memfd and simulated backends.

    It owns its state (locked, closed, purged pages, the views it handed out); its owner
    decides what the segment does (see SpanOwner)."""

    def __init__(self, owner: SpanOwner, segment: Any, first: int, npages: int, nbytes: int,
                 ticket: Any = None) -> None:
        self.owner = owner
        self.segment_ = segment
        self.first = first
        self.npages = npages
        self.nbytes = nbytes
        self.ticket = ticket  # the owner's record of the span
        self.purged_pages = 0
        self._locked = True
        self._closed = False
        self._view: Optional[memoryview] = None  # handed out by .data during this lock
        self._buffer: Any = None  # the owner's buffer of the span during this lock
        if tracing.active is not None: tracing.active.allocate(self)

    def __copy__(self) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be copied: the copy would share the "
                        "memory and its lock state; allocate new memory and write into it")

    def __deepcopy__(self, memo: Any) -> Any:
        return self.__copy__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    @property
    def backend(self) -> str:
        """The backend's name."""
        return self.owner.backend

    @property
    def is_locked(self) -> bool:
        """True while locked."""
        return self._locked and not self._closed

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._closed

    @property
    def segment(self) -> Any:
        """The segment holding the span (None once closed)."""
        return None if self._closed else self.segment_

    _segment = segment  # the name ManagedMemory had (tests/test_imagecache.py reads it)

    @property
    def offset(self) -> int:
        """Byte offset of the memory in its segment."""
        return self.first * _core.page_size()

    @property
    def address(self) -> Optional[int]:
        """Address of the first byte (valid while open; read or write it only while locked), or
        None for a backend without a mapping of its own (simulated)."""
        self._check_open()
        base = getattr(self.segment_, "address", None)
        return None if base is None else base + self.offset

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("discardable memory is closed")

    def _check_locked(self) -> None:
        self._check_open()
        if not self._locked:
            raise RuntimeError("discardable memory is unlocked: lock() it first")

    def lock(self) -> bool:
        """Lock; True if intact, False if anything was purged (contents undefined: refill)."""
        with self.owner.mutex:
            self._check_open()
            if self._locked:
                raise RuntimeError("discardable memory is already locked (locks do not nest)")
            lost = self.owner.lock_span(self)
            self._locked = True
            self.purged_pages = lost
            if tracing.active is not None: tracing.active.lock(self, lost)
        return lost == 0

    def unlock(self) -> None:
        """Unlock: the kernel or a policy may now discard the memory."""
        with self.owner.mutex:
            self.prepare_unlock()
            self.owner.unlock_span(self)
            self._locked = False
            if tracing.active is not None: tracing.active.unlock(self)

    def prepare_unlock(self) -> None:
        """Refuse (BufferError, RuntimeError, ValueError) unless the memory can be unlocked now;
        release the view handed out.  For the owner's batch unlock; then mark_unlocked()."""
        self._check_open()
        if not self._locked:
            raise RuntimeError("discardable memory is not locked")
        self._release_views()

    def mark_unlocked(self) -> None:
        """The owner unlocked the span (a batch unlock, after prepare_unlock())."""
        self._locked = False
        if tracing.active is not None: tracing.active.unlock(self)

    def close(self) -> None:
        """Free the memory; calling it again does nothing."""
        with self.owner.mutex:
            if self._closed:
                return
            self._release_views()
            self.owner.close_span(self)
            self._closed = True
            self._locked = False
            if tracing.active is not None: tracing.active.close(self)

    def _purge(self) -> int:
        """Discard the pages now if unlocked (a policy's purge); returns how many went."""
        with self.owner.mutex:
            self._check_open()
            return 0 if self._locked else self.owner.purge_span(self)

    def _force_reclaim(self) -> int:
        """Make the kernel reclaim the pages now if unlocked; returns how many are gone."""
        # Under the owner's lock: a lock() from another thread in the middle of the reclaim
        # would have its pages freed again and paged out (the reclaim retries) while locked.
        with self.owner.mutex:
            self._check_open()
            gone = 0 if self._locked else self.owner.reclaim_span(self)
            if tracing.active is not None and not self._locked: tracing.active.reclaim(self, gone)
            return gone

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("locked" if self._locked else "unlocked")
        return f"<SpanMemory nbytes={self.nbytes} {self.backend} {state}>"

    @property
    def data(self) -> memoryview:
        """Writable view of the nbytes, only while locked; released by unlock() and close()."""
        view = self._view
        if view is not None and self._locked and not _released(view):
            return view
        with self.owner.mutex:  # an unlock() in another thread must not come in between
            self._check_locked()
            if self._view is not None and _released(self._view):  # `with mem.data as v:`
                self._view = None
            if self._view is None:
                self._view = self._new_view()
            return self._view

    def _new_view(self) -> memoryview:
        if self._buffer is None:
            self._buffer = self.owner.span_buffer(self)
        with memoryview(self._buffer) as whole:
            return whole[:self.nbytes]

    def _release_views(self) -> None:
        """Release the view handed out; BufferError while it or a slice of it is exported."""
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:
                raise BufferError("an object still holds a buffer of mem.data (a numpy array, "
                                  "a memoryview of it...); release it first") from None
            self._view = None
        if self._buffer is not None and self._buffer.exports:
            raise BufferError(f"{self._buffer.exports} view(s) of mem.data (slices, arrays...) "
                              "are still alive; release them first")
        self._buffer = None  # a span's buffer is valid for one lock (simulated: a copy)

    def _range(self, offset: int, size: int) -> tuple[int, int]:
        if size < 0 and 0 <= offset <= self.nbytes:
            size = self.nbytes - offset
        if offset < 0 or size < 0 or offset + size > self.nbytes:
            raise ValueError(f"range [{offset}, {offset}+{size}) is outside the "
                             f"{self.nbytes} bytes of the memory")
        return offset, size

    def read(self, offset: int = 0, size: int = -1) -> bytes:
        """Copy bytes out (locked only)."""
        self._check_locked()
        offset, size = self._range(offset, size)
        if tracing.active is not None: tracing.active.access(self, offset, size, False)
        return bytes(self.data[offset:offset + size])

    def readinto(self, buffer: Any, offset: int = 0) -> int:
        """Copy into a writable buffer as many bytes as fit (locked only); returns the count."""
        self._check_locked()
        with memoryview(buffer) as target, target.cast("B") as target:
            size = min(target.nbytes, max(self.nbytes - offset, 0))
            offset, size = self._range(offset, size)
            if tracing.active is not None: tracing.active.access(self, offset, size, False)
            target[:size] = self.data[offset:offset + size]
        return size

    def write(self, data: Any, offset: int = 0) -> int:
        """Copy bytes in (locked only); returns the count."""
        self._check_locked()
        with memoryview(data) as source, source.cast("B") as source:
            offset, size = self._range(offset, source.nbytes)
            if tracing.active is not None: tracing.active.access(self, offset, size, True)
            self.data[offset:offset + size] = source
        return size




class SoleSpan:
    """The owner of a segment holding one span: discache.allocate on a segment backend."""

    def __init__(self, backend: str, segment: Any) -> None:
        self.backend = backend
        self.segment = segment
        self.mutex = threading.RLock()

    @classmethod
    def allocate(cls, backend: str, new_segment: Any, nbytes: int) -> SpanMemory:
        """nbytes of new memory, returned locked: a segment of one span."""
        nbytes = validate.size(nbytes, "nbytes", _core.physical_memory())
        npages = -(-nbytes // _core.page_size())
        segment = new_segment(npages)
        segment.claim_span(0, npages)
        return SpanMemory(cls(backend, segment), segment, 0, npages, nbytes)

    def lock_span(self, mem: SpanMemory) -> int:
        """Lock the segment's pages; how many were lost."""
        return self.segment.lock_span(0, mem.npages)

    def unlock_span(self, mem: SpanMemory) -> None:
        """Unlock the segment's pages."""
        self.segment.unlock_span(0, mem.npages)

    def close_span(self, mem: SpanMemory) -> None:
        """Unmap the segment."""
        self.segment.close()

    def purge_span(self, mem: SpanMemory) -> int:
        """Discard the pages now."""
        self.segment.discard_span(0, mem.npages)
        if tracing.active is not None: tracing.active.purge(mem)
        return mem.npages

    def reclaim_span(self, mem: SpanMemory) -> int:
        """Have the kernel reclaim the pages now."""
        return self.segment.reclaim_span(0, mem.npages)

    def span_buffer(self, mem: SpanMemory) -> Any:
        """The buffer of the locked pages."""
        return self.segment.span_buffer(0, mem.nbytes)
