"""DiscardableMemory (Chromium's base::DiscardableMemory, Python-shaped), its allocator, reclaim."""
from __future__ import annotations

import abc
import threading
import weakref
from typing import Any

from . import _core, backends, validate
from ._core import LockResult
from .errors import PurgedError


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

    def __enter__(self) -> memoryview:
        if not self.lock():
            raise PurgedError(
                f"{self.purged_pages} of {self.npages} pages were purged; the memory is locked "
                "with undefined contents: refill mem.data, then unlock() or close()")
        return self.data

    def __exit__(self, *exc_info: Any) -> None:
        if self.is_locked:
            self.unlock()


DiscardableMemory.register(_core.MappedMemory)  # MadvFreeMemory, AshmemMemory


def _released(view: memoryview) -> bool:
    """True once the caller released the view."""
    try:
        view.nbytes
    except ValueError:
        return True
    return False


class CopyingAccessors(DiscardableMemory):
    """`data` and read/readinto/write on top of it, for the memories written in Python."""

    _view: "memoryview | None" = None  # handed out by .data during this lock

    def __copy__(self) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be copied: the copy would share the "
                        "memory and its lock state; allocate new memory and write into it")

    def __deepcopy__(self, memo: Any) -> Any:
        return self.__copy__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    @abc.abstractmethod
    def _check_locked(self) -> None:
        """Raise unless open and locked."""

    @abc.abstractmethod
    def _new_view(self) -> memoryview:
        """A fresh writable view of the nbytes, for this lock."""

    @property
    def data(self) -> memoryview:
        """Writable view of the nbytes, only while locked; released by unlock() and close()."""
        self._check_locked()
        if self._view is not None and _released(self._view):  # e.g. `with mem.data as v:`
            self._view = None
        if self._view is None:
            self._view = self._new_view()
        return self._view

    def _release_views(self) -> None:
        """Release the view handed out; BufferError (nothing changed) while it is exported."""
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:
                raise BufferError("an object still holds a buffer of mem.data (a numpy array, "
                                  "a memoryview of it...); release it first") from None
            self._view = None

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
        return bytes(self.data[offset:offset + size])

    def readinto(self, buffer: Any, offset: int = 0) -> int:
        """Copy into a writable buffer as many bytes as fit (locked only); returns the count."""
        self._check_locked()
        with memoryview(buffer) as target, target.cast("B") as target:
            size = min(target.nbytes, max(self.nbytes - offset, 0))
            offset, size = self._range(offset, size)
            target[:size] = self.data[offset:offset + size]
        return size

    def write(self, data: Any, offset: int = 0) -> int:
        """Copy bytes in (locked only); returns the count."""
        self._check_locked()
        with memoryview(data) as source, source.cast("B") as source:
            offset, size = self._range(offset, source.nbytes)
            self.data[offset:offset + size] = source
        return size


class MemfdMemory(CopyingAccessors):
    """Private discardable memory on a memfd segment; purged by policy, not by the kernel."""

    def __init__(self, nbytes: int) -> None:
        self._shm = _core.DiscardableSharedMemory.create(validate.size(nbytes))
        # One call at a time: a reclaim from another thread holds the segment's shared lock
        # word while it punches the hole, and lock() must wait for it, not fail.
        self._mutex = threading.RLock()
        self._locked = True
        self.nbytes = self._shm.nbytes
        self.npages = self._shm.npages
        self.purged_pages = 0

    backend = "memfd"  # type: ignore[assignment]

    @property
    def is_locked(self) -> bool:
        """True while locked."""
        return self._locked

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._shm.closed

    def _check_open(self) -> None:
        if self._shm.closed:
            raise ValueError("discardable memory is closed")

    def _check_locked(self) -> None:
        self._check_open()
        if not self._locked:
            raise RuntimeError("discardable memory is unlocked: lock() it first")

    def _release_views(self) -> None:
        super()._release_views()
        if self._shm.exports:
            raise BufferError(f"{self._shm.exports} buffer(s) of the memory are still alive "
                              "(slices of mem.data); release them first")

    def lock(self) -> bool:
        """Lock; True if intact, False if purged (the pages read as zeros: refill)."""
        with self._mutex:
            return self._lock()

    def _lock(self) -> bool:
        self._check_open()
        if self._locked:
            raise RuntimeError("discardable memory is already locked (locks do not nest)")
        result = self._shm.lock()
        if result == LockResult.FAILED:  # purged since last seen: the next attempt says PURGED
            result = self._shm.lock()
        if result == LockResult.FAILED:
            raise RuntimeError("the memfd segment is locked by another process")
        self._locked = True
        self.purged_pages = self.npages if result == LockResult.PURGED else 0
        return result == LockResult.SUCCESS

    def unlock(self) -> None:
        """Unlock: a purge (release_free_memory, force_reclaim) may now free the pages."""
        with self._mutex:
            self._unlock()

    def _unlock(self) -> None:
        self._check_open()
        if not self._locked:
            raise RuntimeError("discardable memory is not locked")
        self._release_views()
        self._shm.unlock()
        self._locked = False

    def close(self) -> None:
        """Free the memory; calling it again does nothing."""
        with self._mutex:
            if self._shm.closed:
                return
            self._release_views()
            self._shm.close()
            self._locked = False

    def _new_view(self) -> memoryview:
        return self._shm.data

    def _purge(self) -> int:
        """Free the pages now if unlocked; returns how many were freed."""
        with self._mutex:
            self._check_open()
            return 0 if self._locked else self._shm._force_reclaim()

    def _force_reclaim(self) -> int:
        """Free the pages now if unlocked (MADV_PAGEOUT cannot drop shmem without swap)."""
        return self._purge()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("locked" if self._locked else "unlocked")
        return f"<MemfdMemory nbytes={self.nbytes} {state}>"


def allocate(nbytes: int, backend: str = "auto", *, sigbus: bool = False) -> DiscardableMemory:
    """New discardable memory of nbytes, returned locked."""
    return backends.get(backend, sigbus=sigbus).allocate(nbytes)


def force_reclaim(mem: Any) -> int:
    """Make the system discard mem's unlocked pages now; returns how many pages were discarded."""
    try:
        reclaim = mem._force_reclaim
    except AttributeError:
        raise TypeError(f"cannot reclaim a {type(mem).__name__}") from None
    return reclaim()


class DiscardableMemoryAllocator:
    """Allocates discardable memory from one backend and keeps count of it."""

    def __init__(self, backend: str = "auto", *, sigbus: bool = False) -> None:
        self._backend = backends.get(backend, sigbus=sigbus)
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def backend(self) -> str:
        """The backend's name."""
        return self._backend.name

    def allocate(self, nbytes: int) -> DiscardableMemory:
        """New discardable memory of nbytes, returned locked."""
        mem = self._backend.allocate(nbytes)
        self._live.add(mem)
        return mem

    @property
    def bytes_allocated(self) -> int:
        """Bytes of the memory allocated here that is not closed yet."""
        return sum(mem.nbytes for mem in list(self._live) if not mem.closed)

    def metrics_snapshot(self) -> dict[str, Any]:
        """The numbers discache.metrics exports for this allocator's live allocations."""
        live = [mem for mem in list(self._live) if not mem.closed]
        locked = sum(mem.nbytes for mem in live if mem.is_locked)
        allocated = sum(mem.nbytes for mem in live)
        return {"allocated_bytes": allocated, "locked_bytes": locked,
                "unlocked_bytes": allocated - locked}

    def release_free_memory(self) -> int:
        """Discard every unlocked allocation now; returns the bytes released (page-rounded)."""
        page = _core.page_size()
        return sum(mem._purge() * page for mem in list(self._live) if not mem.closed)
