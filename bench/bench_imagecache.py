"""ImageCache reads of a 256x256 RGBA bitmap against their floors, measured in the same run.

Floors (the report of `discache bench --only image` gives each ratio and whether it is met):
- ImageCache.view_image: at most 1.5x Image.frombuffer over a bytearray of the same pixels;
- ImageCache.get: at most 1.2x Image.copy() of the same image.
A cachetools.LRUCache of PIL images (a lookup that returns the shared image) is there to compare.
"""
import cachetools
import pytest
from PIL import Image

from discache.demo import draw_image, image_cache_class
from discache.manager import DiscardableMemoryManager

ImageCache = image_cache_class()  # the checkout's, or the installed one

GROUP = "image read, 256x256 RGBA"
SOURCE = draw_image(1, 256)  # seed 1: RGBA
assert SOURCE.mode == "RGBA"
PIXELS = bytearray(SOURCE.tobytes())
# op -> the baseline its floor is a multiple of, and the floor (read by discache.benchreport)
FLOORS = {"image-view": ("Image.frombuffer(bytearray)", 1.5), "image-get": ("Image.copy()", 1.2)}


def make(backend):
    cache = ImageCache(64 << 20, manager=DiscardableMemoryManager(64 << 20, backend))
    cache.put("k", SOURCE)
    return cache


def mark(benchmark, op, impl):
    benchmark.group = GROUP
    benchmark.extra_info.update(op=op, impl=impl)
    if op in FLOORS:
        benchmark.extra_info.update(baseline=FLOORS[op][0], floor=FLOORS[op][1])


def bench_frombuffer(benchmark):
    """The floor of view_image: Pillow mapping pixels held in a bytearray."""
    mark(benchmark, "image-view", "Image.frombuffer(bytearray)")
    image = benchmark(Image.frombuffer, "RGBA", (256, 256), PIXELS, "raw", "RGBA", 0, 1)
    assert image.tobytes() == PIXELS


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_imagecache_view_image(benchmark, backend):
    """Zero-copy: pin, check the stored header, map the pixels, unmap, unpin."""
    mark(benchmark, "image-view", f"ImageCache.view_image[{backend}]")
    cache = make(backend)

    def view():
        with cache.view_image("k") as image:
            return image.size

    assert benchmark(view) == SOURCE.size
    with cache.view_image("k") as image:
        assert image.tobytes() == PIXELS
    cache.close()


def bench_image_copy(benchmark):
    """The floor of get: a copy of a decoded image Pillow owns."""
    mark(benchmark, "image-get", "Image.copy()")
    assert benchmark(SOURCE.copy).tobytes() == PIXELS


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_imagecache_get(benchmark, backend):
    """A copy of the pixels into an image the caller owns."""
    mark(benchmark, "image-get", f"ImageCache.get[{backend}]")
    cache = make(backend)
    image = benchmark(cache.get, "k")
    assert image.tobytes() == PIXELS and not image.readonly
    cache.close()


def bench_lrucache_of_images(benchmark):
    """For comparison: cachetools.LRUCache of decoded images, the shared image returned (no copy,
    nothing the kernel can reclaim)."""
    mark(benchmark, "image-lookup", "cachetools.LRUCache[key]")
    images = cachetools.LRUCache(maxsize=16)
    images["k"] = SOURCE.copy()
    assert benchmark(images.__getitem__, "k").size == SOURCE.size


def bench_cache_view_alone(benchmark):
    """What view_image and get spend in DiscardableCache.view(key) (enter and exit) for the same
    entry: the part of their cost the image cache does not control."""
    mark(benchmark, "image-part", "DiscardableCache.view(key) alone[madvfree]")
    cache = make("madvfree")

    def view():
        with cache.cache.view("k") as data:
            return data.nbytes

    assert benchmark(view) == 64 + len(PIXELS)
    cache.close()
