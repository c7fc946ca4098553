"""ImageCache: decoded PIL images in discardable memory, rebuilt when the kernel took them."""
from __future__ import annotations

import itertools
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Hashable, Optional, Union

from PIL import Image

from discache import force_reclaim
from discache.cache import DiscardableCache
from discache.errors import PinnedError
from discache.manager import DiscardableMemoryManager

from .codec import BitmapFormatError, Parsed, _new_object, encode, parse

_map_buffer = Image.core.map_buffer
Source = Union[str, bytes, "os.PathLike[str]", Callable[[], Image.Image]]
COUNTS = ("hits", "misses", "views", "puts", "regenerations", "corrupt_entries")
PURGED_KEYS_KEPT = 4096  # keys remembered as purged, to count their regeneration


class ImageCache:
    """A cache of PIL images whose idle bitmaps the kernel may reclaim; never returns a lost one.

    Each image is stored as a small header (mode, size, palette) followed by its raw pixels in a
    DiscardableCache entry.  `get` returns an image that owns a copy of the pixels; `view_image`
    maps them zero-copy (modes in ZERO_COPY_MODES) for the duration of a with block only.  The
    header is parsed and checked once per stored bitmap and kept beside the entry; a read only
    compares the stored prefix with it.  Only DiscardableCache's public API is used.
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
        if not isinstance(maxsize, int) or maxsize <= 0:
            raise ValueError(f"maxsize must be a positive number of bytes, got {maxsize!r}")
        self._lock = threading.Lock()
        # Keys whose bitmap was lost, until stored again (oldest first; only to count
        # regenerations, so bounded).
        self._purged: dict[Hashable, None] = {}
        self._purged_kept = PURGED_KEYS_KEPT
        # The parsed header of each stored bitmap (a hint checked against the stored prefix).
        self._parsed: dict[Hashable, Parsed] = {}
        self._counts = dict.fromkeys(COUNTS, 0)
        # The reads' counts: next() on an itertools.count is one C call the GIL makes atomic,
        # cheaper on the hot path than a lock around a dict's count.
        self._hits, self._views = itertools.count(), itertools.count()
        # Keys being copied by a get, once per get in flight (see get and _store).
        self._reading: list[Hashable] = []
        self.cache = DiscardableCache(maxsize, backend, verify=verify, on_evict=self._on_evict,
                                      manager=manager, idle_unlock=idle_unlock)
        self._view = self.cache.view

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
        parsed = parse(memoryview(data))
        while True:
            try:
                self.cache[key] = data
                break
            except PinnedError:
                if key not in self._reading:
                    raise  # viewed or pinned
                # A get pins the entry while it copies: wait for the copy, not fail on its pin.
                time.sleep(0)
        # Two puts of the key racing may leave the other's header here: a read compares it
        # with the stored prefix and parses again.
        self._parsed[key] = parsed
        with self._lock:
            was_purged = self._purged.pop(key, _MISSING) is not _MISSING
            self._counts["puts"] += 1
        return was_purged

    def get(self, key: Hashable, default: Any = None) -> Any:
        """An image owning a copy of the bitmap, or default when missing or purged."""
        # The hot path.  The view pins the entry (locked: never unlocked, reclaimed, replaced
        # or deleted) while Pillow copies with the GIL released; the key is listed in _reading
        # meanwhile so that a put of the same key waits for the copy instead of failing on
        # that pin (list.append and list.remove are atomic: no lock of our own).
        reading = self._reading
        reading.append(key)
        try:
            try:
                viewing = self._view(key)
                data = viewing.__enter__()
            except KeyError:
                self._count("misses")
                return default
            try:
                parsed = self._parsed.get(key)
                if (parsed is not None and parsed.owned is not None
                        and data.nbytes == parsed.nbytes
                        and data[:parsed.prefix_len].tobytes() == parsed.prefix):
                    # Parsed.copy inlined for a bitmap Pillow maps: one memcpy per line, the
                    # mapping gone with the expression, then the image built by the recipe.
                    core = _map_buffer(data, *parsed.map_args).copy()
                    cls, state, holder = parsed.owned
                    image = _new_object(cls)
                    attributes = state.copy()
                    attributes[holder] = core
                    attributes["info"] = {}
                    image.__dict__ = attributes
                else:
                    image = None if parsed is None else parsed.copy(data)
                    if image is None:
                        image = self._reparsed(key, data).copy(data)
            except BitmapFormatError:
                image = None
            finally:
                viewing.__exit__(None, None, None)
        finally:
            reading.remove(key)
        if image is None:
            self._drop_corrupt(key)
            self._count("misses")
            return default
        next(self._hits)
        return image

    def _parsed_of(self, key: Hashable, data: memoryview) -> Parsed:
        """The key's parsed header if the stored bytes still match it, else parsed again."""
        parsed = self._parsed.get(key)
        if parsed is None or not parsed.matches(data):
            parsed = self._reparsed(key, data)
        return parsed

    def _reparsed(self, key: Hashable, data: memoryview) -> Parsed:
        """The stored bytes parsed again (a bitmap stored behind this cache's back) and kept;
        BitmapFormatError if they are no bitmap."""
        parsed = self._parsed[key] = parse(data)
        return parsed

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

    def view_image(self, key: Hashable) -> "_ImageView":
        """A read-only image mapping the bitmap zero-copy (a copy for other modes), usable only
        inside the with block, which keeps the entry pinned; KeyError if missing or purged."""
        return _ImageView(self, key)

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
                      stacklevel=3)

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
        self._parsed.clear()

    def _force_reclaim(self) -> int:
        """discache.force_reclaim(image_cache): the kernel discards every unpinned bitmap now."""
        return force_reclaim(self.cache)

    def stats(self) -> dict[str, int]:
        """Hits, misses, views, purges, regenerations, evictions and sizes."""
        base = self.cache.stats()
        counts = self._read_counts()
        return {
            **counts,
            **{name: n for name, n in base.items() if name not in COUNTS},
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """The cache's numbers for discache.metrics, with this cache's hits, misses and
        regenerations (views count as hits)."""
        snapshot = self.cache.metrics_snapshot()
        counts = self._read_counts()
        snapshot["hits"] = counts["hits"] + counts["views"]
        snapshot["misses"] = counts["misses"]
        snapshot["regenerations"] = counts["regenerations"]
        return snapshot

    # ------------------------------------------------------------------ bookkeeping

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _read_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        counts["hits"] = _count_of(self._hits)
        counts["views"] = _count_of(self._views)
        return counts

    def _on_evict(self, key: Hashable, reason: str) -> None:
        self._parsed.pop(key, None)
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


class _ImageView:
    """view_image's context manager (a class: cheaper than a generator on this hot path)."""

    __slots__ = ("owner", "key", "viewing", "image", "pixels")

    def __init__(self, owner: ImageCache, key: Hashable) -> None:
        self.owner, self.key = owner, key

    def __enter__(self) -> Image.Image:
        owner, key = self.owner, self.key
        self.viewing = owner._view(key)
        data = self.viewing.__enter__()  # KeyError if missing or purged
        try:
            self.image, self.pixels = owner._parsed_of(key, data).map(data)
        except BitmapFormatError:
            self.viewing.__exit__(None, None, None)
            owner._drop_corrupt(key)
            raise KeyError(key) from None
        except BaseException:
            self.viewing.__exit__(None, None, None)
            raise
        next(owner._views)
        return self.image

    def __exit__(self, *exc: Any) -> None:
        try:
            self.image.close()
            self.image = None
            if self.pixels is not None:
                self.owner._detach(self.key, self.pixels)
                self.pixels = None
        finally:
            self.viewing.__exit__(None, None, None)


def _load(source: Source) -> Image.Image:
    if callable(source):
        image = source()
        if not isinstance(image, Image.Image):
            raise TypeError(f"the source callable returned {type(image).__name__}, not a PIL Image")
        return image
    with Image.open(source) as image:
        image.load()
    return image


def _count_of(counter: "itertools.count[int]") -> int:
    """The next value an itertools.count gives (how many times next() was called on it), read
    from its repr without advancing it."""
    return int(repr(counter)[len("count("):-1])


_MISSING: Any = object()

__all__ = ["ImageCache"]
