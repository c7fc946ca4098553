"""SharedCache: one discardable cache in /dev/shm shared by every process of the host.

See docs/shared-cache.md for the layout, the protocols and the guarantees.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, Callable, Iterator, Optional, Union

from . import validate
from ._sharedcache import MAX_KEY_BYTES, SharedCacheCore
from .errors import PinnedError

SHM_DIR = "/dev/shm"
PREFIX = "discache-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,200}")
MAX_MAXSIZE = 1 << 40  # 1 TiB: the index alone would then take 64 GiB of address space
DEFAULT_IDLE_UNLOCK = 1.0

Key = Union[str, bytes]
_MISSING = object()


def shm_path(name: str) -> str:
    """The file of the cache called name (after checking the name)."""
    if not isinstance(name, str):
        raise TypeError(f"a SharedCache name must be a str, got {type(name).__name__}")
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"bad SharedCache name {name!r}: use 1 to 200 of A-Z a-z 0-9 _ . - "
                         "(no '/', not '.' or '..')")
    return os.path.join(SHM_DIR, PREFIX + name)


class SharedCache(SharedCacheCore, MutableMapping):
    """A mapping of str/bytes keys to bytes that every process opening the same name shares.

    The entries live once on the host, in /dev/shm/discache-<name>; get() copies a value out
    with no lock and no system call; set, del and purges serialize on a lock the kernel drops
    when its holder dies.  Entries idle for idle_unlock seconds are unlocked: memory pressure
    (watch_pressure()) purges them; the byte limit purges the least recently used.
    """

    metrics_layer = "shared"

    def __init__(self, name: str, maxsize: int, *, create: bool = True, verify: bool = False,
                 idle_unlock: Optional[float] = None) -> None:
        path = shm_path(name)
        maxsize = validate.size(maxsize, "maxsize", MAX_MAXSIZE)
        if not isinstance(create, bool) or not isinstance(verify, bool):
            raise TypeError("create and verify must be bools")
        idle = DEFAULT_IDLE_UNLOCK if idle_unlock is None else validate.duration(
            idle_unlock, "idle_unlock", zero=True)
        if idle > 1e6:
            raise ValueError(f"idle_unlock must be at most 1e6 seconds, got {idle_unlock!r}")
        self.name = name
        self._monitor: Any = None
        try:
            self._attach(path, maxsize, create, verify, idle)
        except FileNotFoundError:
            raise FileNotFoundError(f"no SharedCache named {name!r} ({path}); "
                                    "pass create=True to make it") from None
        except BaseException:
            self._close()
            raise
        if idle_unlock is not None and abs(self._counters()["idle_unlock"] - idle) > 1e-9:
            found = self._counters()["idle_unlock"]
            self._close()
            raise ValueError(f"the shared cache {name!r} exists with idle_unlock={found}, "
                             f"not {idle_unlock}")

    @staticmethod
    def unlink(name: str) -> None:
        """Remove the cache's file: processes attached keep their mapping (and its memory) until
        they close; the next open of the name makes a new, empty cache."""
        os.unlink(shm_path(name))

    # ---------------------------------------------------------------- mapping protocol

    def __delitem__(self, key: Key) -> None:
        if self._delete(key, False) is None:
            raise KeyError(key)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys_snapshot())

    def __setitem__(self, key: Key, value: Any) -> None:
        SharedCacheCore.__setitem__(self, key, value)

    def items(self) -> list[tuple[Key, bytes]]:  # type: ignore[override]
        """(key, value) of the live entries now; an entry purged meanwhile is left out."""
        pairs = []
        for key in self.keys_snapshot():
            value = self.get(key)
            if value is not None:
                pairs.append((key, value))
        return pairs

    def values(self) -> list[bytes]:  # type: ignore[override]
        """The values of the live entries now."""
        return [value for _, value in self.items()]

    def set(self, key: Key, value: Any) -> None:
        """cache[key] = value."""
        SharedCacheCore.__setitem__(self, key, value)

    def pop(self, key: Key, default: Any = _MISSING) -> Any:
        """Remove key and return its value; default (or KeyError) when absent or purged."""
        value = self._delete(key, True)
        if value is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def get_or_create(self, key: Key, factory: Callable[[], Any]) -> bytes:
        """The value of key, made by factory() and stored when absent or purged.  Processes that
        miss at the same moment may each call factory (there is no cross-process single flight)."""
        value = self.get(key)
        if value is not None:
            return value
        made = factory()
        self[key] = made
        return bytes(made)

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        if self.closed:
            return f"SharedCache({self.name!r}, closed)"
        return f"SharedCache({self.name!r}, maxsize={self.maxsize}, entries={len(self)})"

    def __reduce__(self) -> Any:
        raise TypeError("a SharedCache cannot be pickled: open it by name in the other process")

    # ---------------------------------------------------------------- views

    @contextlib.contextmanager
    def view(self, key: Key) -> Iterator[memoryview]:
        """Zero-copy read-only access: `with cache.view(key) as mv:`; KeyError if absent or
        purged.  While the block runs no process can purge, evict, replace or delete the entry
        (an OFD read lock: the kernel drops it if this process dies)."""
        pinned = self._pin(key)
        if pinned is None:
            raise KeyError(key)
        first_page, length, holds_pin = pinned
        mv = memoryview(self._view_buffer(first_page, length))
        try:
            yield mv
        finally:
            mv.release()
            if holds_pin:
                self._unpin(first_page)

    # ---------------------------------------------------------------- purging

    def on_memory_pressure(self, level: str) -> int:
        """Moderate: purge the unlocked (idle) entries; critical: every unpinned entry.  Bytes
        purged, host-wide."""
        if level not in ("moderate", "critical"):
            raise ValueError(f"level must be 'moderate' or 'critical', got {level!r}")
        self._count_pressure(0 if level == "moderate" else 1)
        if level == "moderate":
            return self.purge(self._counters()["idle_unlock"])
        return self.purge()

    def purge(self, older_than: Optional[float] = None) -> int:  # type: ignore[override]
        """Purge every unpinned entry idle for older_than seconds (None: every unpinned entry),
        host-wide; bytes purged."""
        if older_than is not None:
            older_than = validate.duration(older_than, "older_than", zero=True)
        return SharedCacheCore.purge(self, older_than)

    def watch_pressure(self, **monitor_options: Any) -> Any:
        """Purge on this process's memory-pressure events (discache.pressure.PressureMonitor);
        every process's entries are purged, so one watching process per host is enough."""
        from .pressure import PressureMonitor

        if self._monitor is not None and self._monitor.running:
            raise RuntimeError("this SharedCache already watches memory pressure")
        self._monitor = PressureMonitor(self.on_memory_pressure, **monitor_options).start()
        return self._monitor

    def _force_reclaim(self) -> int:
        """discache.force_reclaim(cache): purge every unpinned entry now; pages discarded."""
        return SharedCacheCore.purge(self, None) // os.sysconf("SC_PAGE_SIZE")

    # ---------------------------------------------------------------- reporting

    def stats(self) -> dict[str, Any]:
        """Host-wide bytes and counts, and this process's hits, misses and purges detected."""
        numbers = self._counters()
        evictions = numbers.pop("evictions")
        numbers.update({f"evictions_{reason}": n for reason, n in evictions.items()})
        numbers.pop("pressure_events")
        return numbers

    def metrics_snapshot(self) -> dict[str, Any]:
        """discache.metrics' numbers: host-wide, the same whichever process is asked."""
        numbers = self._counters()
        return {
            "allocated_bytes": numbers["allocated_bytes"],
            "locked_bytes": numbers["locked_bytes"],
            "unlocked_bytes": numbers["unlocked_bytes"],
            "purged_bytes": numbers["purged_bytes"],
            "evictions": numbers["evictions"],
            "hits": numbers["host_hits"],
            "misses": numbers["host_misses"],
            "pressure_events": numbers["pressure_events"],
        }

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Detach: unmap and close (safe twice; BufferError while a view is alive).  The
        entries stay for the other processes."""
        monitor, self._monitor = getattr(self, "_monitor", None), None
        if monitor is not None:
            monitor.stop()
        self._close()

    def __enter__(self) -> "SharedCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["MAX_KEY_BYTES", "PinnedError", "SharedCache", "shm_path"]
