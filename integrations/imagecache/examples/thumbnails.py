"""Thumbnails of image files in an ImageCache: built once, served from discardable memory,
rebuilt only when the kernel reclaimed them.

    python integrations/imagecache/examples/thumbnails.py [IMAGE ...]

Without arguments it draws a few images in a temporary directory first.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

from PIL import Image, ImageDraw

SOURCE_TREE = pathlib.Path(__file__).resolve().parents[3]
if (SOURCE_TREE / "discache").is_dir() and (SOURCE_TREE / "integrations").is_dir():
    # Run from a source checkout (built in place): use it rather than an installed discache.
    sys.path.insert(0, str(SOURCE_TREE))
    from integrations.imagecache import ImageCache
else:  # copied elsewhere: discache installed (pip install -e '.[image]' in its checkout)
    from discache.integrations.imagecache import ImageCache

import discache  # noqa: E402

THUMBNAIL = (64, 64)


def thumbnail(path: pathlib.Path) -> Image.Image:
    """Decode the file and shrink it to fit THUMBNAIL (what the cache saves us from redoing)."""
    with Image.open(path) as image:
        image.thumbnail(THUMBNAIL)
        return image.copy()


def sample_images(directory: pathlib.Path, count: int = 6) -> list[pathlib.Path]:
    """A few 640x480 drawings saved as PNG."""
    paths = []
    for i in range(count):
        image = Image.new("RGB", (640, 480), (40 * i % 256, 90, 200 - 30 * i % 200))
        draw = ImageDraw.Draw(image)
        draw.ellipse((50 + 20 * i, 40, 400 + 30 * i, 420), fill=(255, 220 - 30 * i, 30))
        draw.text((20, 20), f"picture {i}", fill="white")
        path = directory / f"picture{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [pathlib.Path(p) for p in argv] or sample_images(pathlib.Path(tmp))
        cache = ImageCache(maxsize=16 << 20)
        for path in paths:  # first pass: every thumbnail is built
            cache.get_or_create(str(path), lambda path=path: thumbnail(path))
        for path in paths:  # second pass: served from discardable memory
            thumb = cache.get_or_create(str(path), lambda path=path: thumbnail(path))
            print(f"{path.name}: {thumb.size[0]}x{thumb.size[1]} {thumb.mode}")
        # Pretend the machine ran short of memory: the kernel takes every idle thumbnail.
        pages = discache.force_reclaim(cache)
        rebuilt = [cache.get_or_create(str(p), lambda p=p: thumbnail(p)) for p in paths]
        assert all(t.tobytes() == thumbnail(p).tobytes() for t, p in zip(rebuilt, paths))
        stats = cache.stats()
        print(f"kernel reclaimed {pages} pages; hits {stats['hits']}, misses {stats['misses']}, "
              f"purges detected {stats['purges_detected']}, "
              f"regenerations {stats['regenerations']}")
        cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
