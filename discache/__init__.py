"""discache: discardable memory for Python, with exact purge detection."""
from __future__ import annotations

from . import backends
from ._core import DiscardableSharedMemory, LockResult
from .sim._sim import PageTable
from .errors import (BackendUnavailableError, DiscacheError, PinnedError, PurgedError,
                     PurgedPageError)
from .memory import DiscardableMemory, force_reclaim
from .allocation import DiscardableMemoryAllocator, allocate
from .manager import DiscardableMemoryManager, default_manager
from .cache import DiscardableCache, cached
from .sharedcache import SharedCache
from .tracing import record_trace, start_from_environment as _start_from_environment

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DiscardableCache",
    "DiscardableMemoryManager",
    "DiscacheError",
    "DiscardableMemory",
    "DiscardableMemoryAllocator",
    "DiscardableSharedMemory",
    "LockResult",
    "PageTable",
    "PinnedError",
    "PurgedError",
    "PurgedPageError",
    "SharedCache",
    "__version__",
    "allocate",
    "backends",
    "cached",
    "default_manager",
    "force_reclaim",
    "record_trace",
]

_start_from_environment()  # DISCACHE_TRACE=path records the whole program
