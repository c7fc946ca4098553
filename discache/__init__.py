"""discache: discardable memory for Python, with exact purge detection."""
from __future__ import annotations

from . import backends
from ._core import DiscardableSharedMemory, LockResult, PageTable
from .errors import BackendUnavailableError, DiscacheError, PurgedError, PurgedPageError
from .memory import DiscardableMemory, DiscardableMemoryAllocator, allocate, force_reclaim

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DiscacheError",
    "DiscardableMemory",
    "DiscardableMemoryAllocator",
    "DiscardableSharedMemory",
    "LockResult",
    "PageTable",
    "PurgedError",
    "PurgedPageError",
    "__version__",
    "allocate",
    "backends",
    "force_reclaim",
]
