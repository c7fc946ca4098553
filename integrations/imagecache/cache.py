"""ImageCache: decoded PIL images in discardable memory, rebuilt when the kernel took them."""
from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Optional, Union

from PIL import Image

from discache.cache import PURGED_KEYS_KEPT, DiscardableCache
from discache.errors import PinnedError
from discache.manager import DiscardableMemoryManager

from .codec import BitmapFormatError, decode, encode, map_image

Source = Union[str, bytes, "os.PathLike[str]", Callable[[], Image.Image]]
STRIPES = 64  # locks that order a get's copy and a put of the same key


class ImageCache:
    """A cache of PIL images whose idle bitmaps the kernel may reclaim; never returns a lost one.

    Each image is stored as a small header (mode, size, palette) followed by its raw pixels in a
    DiscardableCache entry.  `get` returns an image that owns a copy of the pixels; `view_image`
    maps them zero-copy (modes in ZERO_COPY_MODES) for the duration of a with block only.
    """

    def __init__(
        self,
        maxsize: int,
        backend: str = "auto",
        manager: Optional[DiscardableMemoryManager] = None,
        verify: bool = False,
        *,
        idle_unlock: float = 1.0,
    ) -> None:
        self._lock = threading.Lock()
        # Keys whose bitmap was lost, until stored again (oldest first; only to count
        # regenerations, so bounded like the cache's own record).
        self._purged: dict[Hashable, None] = {}
        self._purged_kept = PURGED_KEYS_KEPT
        self._counts: Counter = Counter()
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self.cache = DiscardableCache(maxsize, backend, verify=verify, on_evict=self._on_evict,
                                      manager=manager, idle_unlock=idle_unlock)

    # ------------------------------------------------------------------ sizes

    @property
    def maxsize(self) -> int:
        """Byte limit of the stored bitmaps (headers, palettes and pixels)."""
        return self.cache.maxsize

    @property
    def currsize(self) -> int:
        """Bytes of the stored bitmaps."""
        return self.cache.currsize

    @property
    def manager(self) -> DiscardableMemoryManager:
        """The manager the bitmaps are allocated from."""
        return self.cache.manager

    def __len__(self) -> int:
        return len(self.cache)

    def __contains__(self, key: object) -> bool:
        """True if the key has a bitmap (it may still turn out purged when read)."""
        return key in self.cache

    def __repr__(self) -> str:
        return (f"ImageCache(maxsize={self.maxsize}, currsize={self.currsize}, "
                f"images={len(self)}, backend={self.manager.backend!r})")

    # ------------------------------------------------------------------ storing and reading

    def put(self, key: Hashable, image: Image.Image) -> None:
        """Store a copy of the image's pixels, mode, size and palette (not its info dict);
        PinnedError while the key is viewed or pinned."""
        self._store(key, image)

    def _store(self, key: Hashable, image: Image.Image) -> bool:
        """put(); True if the key's previous bitmap had been purged."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL Image, got {type(image).__name__}")
        data = encode(image)
        # A get pins the entry while it copies: wait for it rather than fail on its pin.
        with self._stripe(key):
            self.cache[key] = data
        with self._lock:
            was_purged = self._purged.pop(key, _MISSING) is not _MISSING
            self._counts["puts"] += 1
        return was_purged

    def get(self, key: Hashable, default: Any = None) -> Any:
        """An image owning a copy of the bitmap, or default when missing or purged."""
        with self._stripe(key):
            try:
                with self.cache.view(key) as data:
                    image = decode(data)
            except KeyError:
                self._count("misses")
                return default
            except BitmapFormatError:
                self._drop_corrupt(key)
                self._count("misses")
                return default
        self._count("hits")
        return image

    def get_or_create(self, key: Hashable, source: Source) -> Image.Image:
        """The cached image, or the source's (an image file's path, or a callable returning an
        Image) stored and returned when missing or purged."""
        if not (callable(source) or isinstance(source, (str, bytes, os.PathLike))):
            raise TypeError(f"source must be a path or a callable, got {type(source).__name__}")
        image = self.get(key)
        if image is not None:
            return image
        image = _load(source)
        try:
            if self._store(key, image):
                self._count("regenerations")
        except PinnedError:
            pass  # another thread stored the key meanwhile and views it: keep its bitmap
        return image

    @contextmanager
    def view_image(self, key: Hashable) -> Iterator[Image.Image]:
        """A read-only image mapping the bitmap zero-copy (a copy for other modes), usable only
        inside the with block, which keeps the entry pinned; KeyError if missing or purged."""
        with self.cache.view(key) as data:
            try:
                image, pixels = map_image(data)
            except BitmapFormatError:
                corrupt = True
            else:
                corrupt = False
                self._count("views")
                try:
                    yield image
                finally:
                    image.close()
                    del image
                    if pixels is not None:
                        self._detach(key, pixels)
                        del pixels
        if corrupt:
            self._drop_corrupt(key)
            raise KeyError(key)

    def _detach(self, key: Hashable, pixels: memoryview) -> None:
        """Release the view a closed image mapped; if something still holds it (the image's
        core kept through getdata()...), keep the entry pinned until that object is collected,
        so the memory is never unlocked under it."""
        try:
            pixels.release()
            return
        except BufferError:
            pass
        self.cache.pin(key)
        weakref.finalize(pixels, self._unpin_quietly, key)
        warnings.warn(f"a view of image {key!r} outlived its with block; the entry stays pinned "
                      "until the object holding its pixels is collected", ResourceWarning,
                      stacklevel=5)

    def _unpin_quietly(self, key: Hashable) -> None:
        try:
            self.cache.unpin(key)
        except (KeyError, ValueError):  # the cache was closed meanwhile
            pass

    # ------------------------------------------------------------------ the rest of a cache

    def delete(self, key: Hashable) -> None:
        """Drop the key's bitmap; KeyError if missing, PinnedError while it is viewed."""
        del self.cache[key]

    def pin(self, key: Hashable) -> None:
        """Keep the bitmap locked (never reclaimed) until unpin; KeyError if missing or purged."""
        self.cache.pin(key)

    def unpin(self, key: Hashable) -> None:
        """Undo one pin."""
        self.cache.unpin(key)

    def sweep(self, idle: Optional[float] = None) -> int:
        """Unlock bitmaps idle for `idle` seconds (0: all unpinned); returns how many."""
        return self.cache.sweep(idle)

    def clear(self) -> None:
        """Drop every bitmap but the pinned ones."""
        self.cache.clear()

    def close(self) -> None:
        """Free every bitmap's memory."""
        self.cache.close()

    def _force_reclaim(self) -> int:
        """discache.force_reclaim(image_cache): the kernel discards every unpinned bitmap now."""
        return self.cache._force_reclaim()

    def stats(self) -> dict[str, int]:
        """Hits, misses, views, purges, regenerations, evictions and sizes."""
        base = self.cache.stats()
        with self._lock:
            counts = dict(self._counts)
        ours = ("hits", "misses", "views", "puts", "regenerations", "corrupt_entries")
        return {
            **{name: counts.get(name, 0) for name in ours},
            **{name: n for name, n in base.items() if name not in ours},
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """The cache's numbers for discache.metrics, with this cache's hits, misses and
        regenerations (views count as hits)."""
        snapshot = self.cache.metrics_snapshot()
        with self._lock:
            snapshot["hits"] = self._counts["hits"] + self._counts["views"]
            snapshot["misses"] = self._counts["misses"]
            snapshot["regenerations"] = self._counts["regenerations"]
        return snapshot

    # ------------------------------------------------------------------ bookkeeping

    def _stripe(self, key: Hashable) -> threading.Lock:
        return self._stripes[hash(key) % STRIPES]

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _on_evict(self, key: Hashable, reason: str) -> None:
        if reason == "purged":
            self._remember_purged(key)

    def _remember_purged(self, key: Hashable) -> None:
        with self._lock:
            self._purged[key] = None
            if len(self._purged) > self._purged_kept:
                del self._purged[next(iter(self._purged))]

    def _drop_corrupt(self, key: Hashable) -> None:
        """An entry that is not a bitmap this cache wrote (partly lost memory): treat as purged."""
        try:
            del self.cache[key]
        except (KeyError, PinnedError):
            return
        self._remember_purged(key)
        self._count("corrupt_entries")


def _load(source: Source) -> Image.Image:
    if callable(source):
        image = source()
        if not isinstance(image, Image.Image):
            raise TypeError(f"the source callable returned {type(image).__name__}, not a PIL Image")
        return image
    with Image.open(source) as image:
        image.load()
    return image


_MISSING: Any = object()

__all__ = ["ImageCache"]
