"""discache: discardable memory for Python, with exact purge detection."""
from __future__ import annotations

from ._core import PageTable
from .errors import BackendUnavailableError, DiscacheError, PurgedError, PurgedPageError

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DiscacheError",
    "PageTable",
    "PurgedError",
    "PurgedPageError",
    "__version__",
]
