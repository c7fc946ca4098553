"""discache.allocate and DiscardableMemoryAllocator: memory from a backend chosen by name in the
registry (discache.backends)."""
from __future__ import annotations

import weakref
from typing import Any

from . import _core, backends
from .memory import DiscardableMemory


def allocate(nbytes: int, backend: str = "auto", *, sigbus: bool = False) -> DiscardableMemory:
    """New discardable memory of nbytes, returned locked."""
    return backends.get(backend, sigbus=sigbus).allocate(nbytes)


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
