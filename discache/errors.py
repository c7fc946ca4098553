"""Exceptions raised by discache."""


class DiscacheError(Exception):
    """Base class of discache's own exceptions."""


class PurgedError(DiscacheError):
    """Locked memory turned out to have been purged; its contents are gone and must be rebuilt."""


class PurgedPageError(PurgedError):
    """A purged page was touched while still volatile (the SIGBUS of the volatile-ranges design)."""

    def __init__(self, address: int, message: str = "") -> None:
        self.address = address
        super().__init__(message or f"page at address {address:#x} was purged")


class BackendUnavailableError(DiscacheError):
    """The chosen memory backend cannot run on this machine; the message says why."""


class PinnedError(DiscacheError, RuntimeError):
    """A pinned cache entry cannot be deleted or replaced: its memory may be in use by a view."""
