"""ImageCache reads of a 256x256 RGBA bitmap beside a dict of PIL images and a PNG decode."""
import io

import pytest
from PIL import Image

from discache.demo import draw_image
from discache.manager import DiscardableMemoryManager
from integrations.imagecache import ImageCache

SOURCE = draw_image(1, 256)  # seed 1: RGBA
PNG = io.BytesIO()
SOURCE.save(PNG, "PNG")


def make(backend):
    cache = ImageCache(64 << 20, manager=DiscardableMemoryManager(64 << 20, backend))
    cache.put("k", SOURCE)
    return cache


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_imagecache_get(benchmark, backend):
    """A copy of the pixels into an image the caller owns."""
    benchmark.group = "image read, 256x256 RGBA"
    benchmark.extra_info.update(op="image-get", impl=f"ImageCache.get[{backend}]")
    cache = make(backend)
    assert benchmark(cache.get, "k").size == SOURCE.size


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def bench_imagecache_view_image(benchmark, backend):
    """Zero-copy: pin, map the pixels, read one, unpin."""
    benchmark.group = "image read, 256x256 RGBA"
    benchmark.extra_info.update(op="image-view", impl=f"ImageCache.view_image[{backend}]")
    cache = make(backend)

    def view():
        with cache.view_image("k") as image:
            return image.getpixel((10, 10))

    assert benchmark(view) == SOURCE.getpixel((10, 10))


def bench_dict_of_images_copy(benchmark):
    """The baseline a plain cache offers: a dict of decoded images, copied out."""
    benchmark.group = "image read, 256x256 RGBA"
    benchmark.extra_info.update(op="image-get", impl="dict[key].copy()")
    images = {"k": SOURCE.copy()}
    assert benchmark(lambda: images["k"].copy()).size == SOURCE.size


def bench_png_decode(benchmark):
    """What a miss costs: decoding the PNG again."""
    benchmark.group = "image read, 256x256 RGBA"
    benchmark.extra_info.update(op="image-decode", impl="PNG decode")

    def decode():
        PNG.seek(0)
        with Image.open(PNG) as image:
            image.load()
            return image

    assert benchmark(decode).size == SOURCE.size
