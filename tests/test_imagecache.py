"""ImageCache on the real kernel: round trips, purges and regeneration, zero-copy view lifetimes."""
import ctypes
import gc
import pathlib
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image, ImageDraw

from discache import PinnedError, force_reclaim
from discache.manager import PAGE, DiscardableMemoryManager
from integrations.imagecache import ZERO_COPY_MODES, ImageCache
from integrations.imagecache.codec import encode, layout, recipe

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKENDS = ["madvfree", "memfd"]
OWN_SLAB = (160, 120)  # RGB and RGBA bitmaps of this size are over 32 KiB: a slab of their own
MODES = ["RGB", "RGBA", "L", "P", "PA", "LA", "1", "I", "F", "I;16", "I;16B", "CMYK", "RGBX",
         "YCbCr"]
# Modes whose stored pixels Pillow maps and whose images have no palette: get and view_image
# build their images with a recipe learnt from Pillow (the hot path).
RECIPE_MODES = [mode for mode in ZERO_COPY_MODES if mode != "P"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def make(backend, maxsize=16 << 20, **kwargs):
    kwargs.setdefault("manager", DiscardableMemoryManager(64 << 20, backend))
    return ImageCache(maxsize, backend, **kwargs)


def picture(seed, size=(37, 23), mode="RGB"):
    """A drawing that differs from seed to seed, in any mode."""
    image = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))
    draw = ImageDraw.Draw(image)
    draw.rectangle((seed % 7, 2, size[0] // 2 + seed % 5, size[1] - 3), fill=(250, seed % 256, 9))
    draw.line((0, size[1] - 1, size[0] - 1, seed % size[1]), fill=(0, 255 - seed % 256, 128))
    if mode in ("P", "PA"):
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).convert(mode)
    return image.convert(mode)


def same(a, b):
    return (a.mode, a.size, a.tobytes(), a.getpalette()) == (b.mode, b.size, b.tobytes(),
                                                              b.getpalette())


def address_of(cache, key):
    """Where the key's stored bytes start (to write behind the cache's back), and their size."""
    import numpy

    with cache.cache.view(key) as data:
        return numpy.frombuffer(data, dtype=numpy.uint8).ctypes.data, data.nbytes


def poke(address, data):
    """Write bytes at a raw address (memory of a cache entry, behind the cache's back)."""
    ctypes.memmove(address, data, len(data))


def peek(address, n):
    return ctypes.string_at(address, n)


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_in_every_mode(backend, mode):
    cache = make(backend)
    source = picture(3, mode=mode)
    cache.put("k", source)
    copy = cache.get("k")
    assert same(copy, source) and not copy.readonly
    with cache.view_image("k") as view:
        assert same(view, source) and view.readonly
    assert cache.stats()["hits"] == 1 and cache.stats()["views"] == 1


def test_get_returns_an_image_that_owns_its_pixels(backend):
    cache = make(backend)
    cache.put("k", picture(1, mode="L"))
    copy = cache.get("k")
    assert force_reclaim(cache) > 0
    assert same(copy, picture(1, mode="L")), "the kernel took the bitmap, not the copy"
    copy.putpixel((0, 0), 7)  # writable, and its own
    assert cache.get("k") is None and cache.get("k", "gone") == "gone"


def test_sizes_are_bytes_and_the_least_recently_used_image_goes(backend):
    cache = make(backend, maxsize=3 * (64 + 100 * 100))
    for i in range(3):
        cache.put(i, picture(i, (100, 100), "L"))
    assert cache.currsize == 3 * (64 + 100 * 100) and len(cache) == 3
    cache.get(0)
    cache.put(3, picture(3, (100, 100), "L"))
    assert cache.stats()["evictions_size"] == 1 and {k for k in range(4) if k in cache} == {0, 2, 3}
    assert cache.get(1) is None and same(cache.get(0), picture(0, (100, 100), "L"))
    with pytest.raises(ValueError, match="too large"):
        cache.put("big", picture(4, (200, 200), "L"))
    assert "big" not in cache and cache.currsize == 3 * (64 + 100 * 100)


def test_purged_bitmaps_are_detected_and_regenerated(backend, tmp_path):
    cache = make(backend)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        # larger than the cache's largest size class (32 KiB): a slab each, lost on its own
        picture(i, OWN_SLAB, "RGBA" if i % 2 else "RGB").save(paths[-1])
    calls = []

    def drawn():
        calls.append(1)
        return picture(9, mode="P")

    first = [cache.get_or_create(i, str(p)) for i, p in enumerate(paths)]
    first.append(cache.get_or_create("drawn", drawn))
    cache.pin(5)
    pages = force_reclaim(cache)
    stored = sum(len(encode(image)) for image in first) - len(encode(first[5]))
    assert pages >= stored // PAGE, "at least the whole pages of the unpinned bitmaps went"
    again = [cache.get_or_create(i, p) for i, p in enumerate(paths)]
    again.append(cache.get_or_create("drawn", drawn))
    cache.unpin(5)
    assert all(same(a, b) for a, b in zip(first, again))
    assert all(same(a, Image.open(p)) for a, p in zip(again, paths))
    assert len(calls) == 2
    stats = cache.stats()
    assert stats["purges_detected"] == stats["regenerations"] == 6
    assert stats["hits"] == 1 and stats["misses"] == 7 + 6
    assert stats["evictions_purged"] == 6 and stats["entries"] == 7


def test_metrics_snapshot_counts_image_reads(backend):
    cache = make(backend)
    cache.get_or_create("k", lambda: picture(1, OWN_SLAB, "RGBA"))
    cache.get("k")
    with cache.view_image("k"):
        pass
    force_reclaim(cache)
    cache.get_or_create("k", lambda: picture(1, OWN_SLAB, "RGBA"))
    snapshot = cache.metrics_snapshot()
    assert (snapshot["hits"], snapshot["misses"], snapshot["regenerations"]) == (2, 2, 1)
    assert snapshot["locks"]["purged"] == 1 and snapshot["evictions"]["purged"] == 1
    pages = -(-len(encode(picture(1, OWN_SLAB, "RGBA"))) // PAGE)
    assert snapshot["allocated_bytes"] == pages * PAGE == snapshot["locked_bytes"]


def test_the_record_of_purged_keys_is_bounded(backend):
    cache = make(backend)
    cache._purged_kept = 2  # PURGED_KEYS_KEPT per shard in real use
    for key in "abc":
        cache.put(key, picture(1))
        cache.sweep(idle=0)
        force_reclaim(cache)
        assert cache.get(key) is None
    for key in "abc":
        cache.get_or_create(key, lambda: picture(1))
    stats = cache.stats()
    assert stats["purges_detected"] == 3 and stats["regenerations"] == 2, "the oldest forgotten"


def test_a_partially_zeroed_bitmap_is_caught_with_verify(backend):
    cache = make(backend, verify=True)
    cache.put("k", picture(2, (128, 64), "RGB"))  # 24 KiB: several pages
    address, _ = address_of(cache, "k")
    cache.sweep(idle=0)
    poke(address + PAGE + 100, bytes(300))  # zero part of a page behind the cache's back
    assert cache.get_or_create("k", lambda: picture(2, (128, 64))).tobytes() == \
        picture(2, (128, 64)).tobytes()
    assert cache.stats()["purges_detected"] == cache.stats()["regenerations"] == 1


def test_a_foreign_or_inconsistent_entry_is_dropped_not_returned(backend):
    cache = make(backend)
    cache.cache["junk"] = b"not a bitmap" * 10
    assert cache.get("junk") is None
    cache.cache["junk"] = b"x" * 100
    with pytest.raises(KeyError):
        with cache.view_image("junk"):
            pass
    good = bytearray(encode(picture(1, (10, 10), "L")))
    for field, value in ((6, b"XYZ\0"), (16, (11).to_bytes(4, "little"))):  # mode, width
        bad = good.copy()
        bad[field:field + len(value)] = value
        cache.cache["bad"] = bytes(bad)
        assert cache.get("bad") is None
    assert cache.stats()["corrupt_entries"] == 4 and "junk" not in cache and "bad" not in cache


def test_view_image_is_zero_copy_where_pillow_maps(backend):
    cache = make(backend)
    for mode in ("L", "P", "RGBA", "CMYK", "I;16B", "RGB", "LA", "1"):
        cache.put(mode, picture(5, mode=mode))
        address, _ = address_of(cache, mode)
        with cache.view_image(mode) as view:
            pixels = address + layout(memoryview(encode(picture(5, mode=mode)))).offset
            first = peek(pixels, 1)[0]
            poke(pixels, bytes([(first + 1) % 256]))  # write behind the cache's back
            changed = view.tobytes()[0] != picture(5, mode=mode).tobytes()[0]
            poke(pixels, bytes([first]))
        assert changed == (mode in ZERO_COPY_MODES), mode


def test_a_viewed_bitmap_stays_locked_and_the_view_dies_with_the_block(backend):
    cache = make(backend)
    cache.put("k", picture(1, OWN_SLAB, "RGBA"))
    cache.put("other", picture(2, OWN_SLAB, "RGBA"))
    with cache.view_image("k") as view:
        assert cache.sweep(idle=0) == 1, "only the other bitmap is unlocked"
        assert force_reclaim(cache) >= 4, "the other bitmap's pages go"
        assert same(view, picture(1, OWN_SLAB, "RGBA"))
        with pytest.raises(PinnedError, match="pinned"):
            cache.delete("k")
        with pytest.raises(PinnedError, match="pinned"):
            cache.put("k", picture(3))
        assert cache.stats()["pinned_entries"] == 1
    with pytest.raises(ValueError, match="closed"):
        view.getpixel((0, 0))
    assert cache.stats()["pinned_entries"] == 0 and cache.sweep(idle=0) == 1
    assert cache.get("other") is None and same(cache.get("k"), picture(1, OWN_SLAB, "RGBA"))


def test_pixels_kept_past_the_block_keep_the_entry_pinned(backend):
    cache = make(backend)
    cache.put("k", picture(1, (64, 64), "L"))
    with pytest.warns(ResourceWarning, match="outlived"):
        with cache.view_image("k") as view:
            core = view.im  # the mapped pixels, kept beyond the block
    assert cache.stats()["pinned_entries"] == 1
    assert cache.sweep(idle=0) == 0 and force_reclaim(cache) == 0
    assert core.getpixel((3, 3)) == picture(1, (64, 64), "L").getpixel((3, 3))
    del core
    gc.collect()
    assert cache.stats()["pinned_entries"] == 0 and cache.sweep(idle=0) == 1


def test_bad_inputs_raise_and_store_nothing(backend, tmp_path):
    cache = make(backend)
    with pytest.raises(TypeError, match="PIL Image"):
        cache.put("k", b"raw bytes")
    with pytest.raises(TypeError, match="path or a callable"):
        cache.get_or_create("k", 42)
    with pytest.raises(TypeError, match="returned bytes"):
        cache.get_or_create("k", lambda: b"not an image")
    with pytest.raises(FileNotFoundError):
        cache.get_or_create("k", str(tmp_path / "missing.png"))
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(OSError):
        cache.get_or_create("k", tmp_path / "text.png")
    with pytest.raises(KeyError):
        with cache.view_image("k"):
            pass
    with pytest.raises(TypeError):
        cache.put(["unhashable"], picture(1))
    assert len(cache) == 0 and cache.currsize == 0 and cache.stats()["puts"] == 0
    with pytest.raises(ValueError, match="maxsize"):
        ImageCache(0, backend)
    with pytest.raises(ValueError, match="differs"):
        ImageCache(1 << 20, "memfd" if backend == "madvfree" else "madvfree",
                   manager=cache.manager)


def test_threads_share_one_cache_while_the_kernel_reclaims(backend):
    cache = make(backend)
    sources = {i: picture(i, (48, 32), ("RGB", "L", "RGBA")[i % 3]) for i in range(24)}
    wrong, errors = [], []

    def worker(offset):
        try:
            for n in range(150):
                key = (n * 7 + offset) % 24
                image = cache.get_or_create(key, lambda key=key: sources[key])
                if not same(image, sources[key]):
                    wrong.append(key)
                if n % 5 == 0:
                    try:
                        with cache.view_image(key) as view:
                            if not same(view, sources[key]):
                                wrong.append(key)
                    except KeyError:  # reclaimed by another thread meanwhile
                        pass
                if n % 50 == 49:
                    force_reclaim(cache)
        except Exception as error:  # reported below: a thread's exception must fail the test
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert errors == [] and wrong == [] and stats["purges_detected"] > 0
    assert stats["regenerations"] <= stats["purges_detected"]
    assert stats["pinned_entries"] == 0


def test_a_key_stored_and_viewed_meanwhile_is_kept(backend):
    """get_or_create racing another thread that stored the key and views it: no error, the
    viewed bitmap stays, the caller gets the image it made."""
    cache = make(backend)
    first, second = picture(1), picture(2)

    def make_second():
        cache.put("k", first)
        cache.pin("k")  # as view_image does
        return second

    assert same(cache.get_or_create("k", make_second), second)
    assert same(cache.get("k"), first)
    with pytest.raises(PinnedError):
        cache.put("k", second)
    cache.unpin("k")
    cache.put("k", second)
    assert same(cache.get("k"), second)


def test_the_thumbnail_example_runs():
    script = ROOT / "integrations" / "imagecache" / "examples" / "thumbnails.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "purges detected 6, regenerations 6" in result.stdout


@pytest.mark.parametrize("mode", RECIPE_MODES + ["P"])
def test_reads_are_built_by_the_recipe_where_pillow_maps_and_own_their_state(backend, mode):
    cache = make(backend)
    source = picture(4, (40, 30), mode)
    cache.put("k", source)
    parsed = cache._parsed["k"]
    assert (parsed.owned is not None) == (mode != "P"), "a palette is an object of its own"
    first, second = cache.get("k"), cache.get("k")
    assert same(first, source) and same(second, source) and first.im is not second.im
    first.info["seen"] = True
    first.putpixel((0, 0), second.getpixel((1, 1)))
    assert second.info == {} and same(second, source) and same(cache.get("k"), source)
    assert not first.readonly and not second.readonly
    with cache.view_image("k") as view:
        assert view.readonly and view.info == {} and same(view, source)
        assert (parsed.read_only is not None) == (mode != "P")


def test_get_reads_the_pixels_in_discardable_memory_each_time(backend):
    """No copy kept aside: a byte changed behind the cache's back is in the next get."""
    cache = make(backend)
    source = picture(6, (64, 64), "RGBA")
    cache.put("k", source)
    address, nbytes = address_of(cache, "k")
    pixels = address + cache._parsed["k"].spec.offset
    before = cache.get("k")
    poke(pixels, bytes([(peek(pixels, 1)[0] + 1) % 256]))
    after = cache.get("k")
    assert after.tobytes()[1:] == before.tobytes()[1:] == source.tobytes()[1:]
    assert after.tobytes()[0] == (source.tobytes()[0] + 1) % 256


def test_the_fallback_when_pillow_images_hold_other_state(backend, monkeypatch):
    """An Image._new whose images carry a mutable attribute (unlike Pillow 9 to 13): no recipe,
    reads go through Image._new, and each image gets its own attribute."""
    made = Image.Image._new

    def new_with_state(self, core):
        image = made(self, core)
        image.annotations = []
        return image

    monkeypatch.setattr(Image.Image, "_new", new_with_state)
    cache = make(backend)
    source = picture(2, (32, 16), "RGBA")
    cache.put("k", source)
    assert cache._parsed["k"].owned is None and cache._parsed["k"].read_only is None
    first, second = cache.get("k"), cache.get("k")
    assert same(first, source) and same(second, source)
    assert first.annotations == [] and first.annotations is not second.annotations
    with cache.view_image("k") as view:
        assert same(view, source) and view.readonly and view.annotations == []
    assert cache.stats()["hits"] == 2 and cache.stats()["views"] == 1


def test_a_recipe_makes_what_pillow_makes():
    core = Image.new("L", (3, 2), 7).im
    probe = Image.new("L", (0, 0))._new(core)
    found = recipe(probe, core)
    assert found is not None and found.state[found.holder] is None, "the probe's core not kept"
    image = found.wrap(core)
    assert type(image) is Image.Image and image.im is core and vars(image).keys() == \
        vars(probe).keys()
    assert (image.mode, image.size, image.info, image.readonly) == ("L", (3, 2), {}, 0)
    assert image.info is not found.wrap(core).info
    probe.extra = {"not": "empty"}
    assert recipe(probe, core) is None
    del probe.extra
    probe.im = Image.new("L", (3, 2)).im  # the core in no attribute
    assert recipe(probe, core) is None


def test_a_purge_before_the_pin_is_a_miss_and_never_a_zero_image(backend):
    cache = make(backend)
    cache.put("k", picture(1, OWN_SLAB, "RGBA"))
    view = cache._view

    def reclaimed_then_viewed(key):
        assert force_reclaim(cache) > 0  # after get was called, before its pin
        return view(key)

    cache._view = reclaimed_then_viewed
    assert cache.get("k", "gone") == "gone" and "k" not in cache
    stats = cache.stats()
    assert stats["misses"] == 1 and stats["hits"] == 0 and stats["purges_detected"] == 1
    assert cache._reading == []


def test_a_reclaim_while_get_copies_leaves_the_pinned_bitmap(backend):
    cache = make(backend)
    source = picture(1, OWN_SLAB, "RGBA")
    cache.put("k", source)
    cache.put("other", picture(2, OWN_SLAB, "RGBA"))
    view = cache._view
    reclaimed = []

    class ReclaimOnPin:
        """cache.view's context, with the kernel made to reclaim once the entry is pinned."""

        def __init__(self, key):
            self.viewing = view(key)

        def __enter__(self):
            data = self.viewing.__enter__()
            cache.sweep(idle=0)
            reclaimed.append(force_reclaim(cache))
            return data

        def __exit__(self, *exc):
            return self.viewing.__exit__(*exc)

    cache._view = ReclaimOnPin
    assert same(cache.get("k"), source)
    assert reclaimed[0] >= 4, "the other bitmap went, the pinned one stayed"
    cache._view = view
    assert cache.get("other") is None and same(cache.get("k"), source)
    assert cache.stats()["pinned_entries"] == 0


def test_gets_racing_the_kernel_return_the_bitmap_or_nothing(backend):
    cache = make(backend)
    source = picture(3, (256, 256), "RGBA")
    stop, wrong = threading.Event(), []

    def reclaim():
        while not stop.is_set():
            force_reclaim(cache)
            time.sleep(0.002)

    reclaimer = threading.Thread(target=reclaim)
    reclaimer.start()
    reads, deadline = 0, time.monotonic() + 20
    try:
        # until both a hit and a purge were seen (the reclaimer's timing is the kernel's)
        while reads < 300 or not (cache.stats()["hits"] and cache.stats()["purges_detected"]):
            image = cache.get("k")
            reads += 1
            if image is None:
                cache.put("k", source)
            elif not same(image, source):
                wrong.append(reads)
            if reads % 8 == 0:
                time.sleep(0.001)  # the reclaimer runs between gets too, not only in copies
            if time.monotonic() > deadline:
                break
    finally:
        stop.set()
        reclaimer.join()
    stats = cache.stats()
    assert wrong == [] and stats["purges_detected"] > 0 and stats["hits"] > 0
    assert stats["hits"] + stats["misses"] == reads and stats["pinned_entries"] == 0


def test_a_put_waits_for_a_get_copying_the_key(backend):
    cache = make(backend)
    old, new = picture(1, OWN_SLAB, "RGBA"), picture(2, OWN_SLAB, "RGBA")
    cache.put("k", old)
    view = cache._view
    outcome = []

    def put_new():
        try:
            cache.put("k", new)
            outcome.append("stored")
        except Exception as error:  # reported below
            outcome.append(error)

    putter = threading.Thread(target=put_new)

    class PutWhilePinned:
        def __init__(self, key):
            self.viewing = view(key)

        def __enter__(self):
            data = self.viewing.__enter__()
            putter.start()
            time.sleep(0.2)
            assert putter.is_alive() and outcome == [], "the put waits for the pin to go"
            return data

        def __exit__(self, *exc):
            return self.viewing.__exit__(*exc)

    cache._view = PutWhilePinned
    assert same(cache.get("k"), old)
    putter.join(10)
    cache._view = view
    assert outcome == ["stored"] and same(cache.get("k"), new) and cache._reading == []
    with cache.view_image("k"):
        with pytest.raises(PinnedError):
            cache.put("k", old)  # a view's pin is not waited for


def test_a_bitmap_parsed_on_a_pinned_view_leaves_no_export(backend):
    """Stored behind the cache's back: parsed again on get's pinned view, which must end."""
    cache = make(backend)
    cache.cache["k"] = encode(picture(5, (30, 20), "L"))
    assert same(cache.get("k"), picture(5, (30, 20), "L"))
    assert cache._parsed["k"].owned is not None
    assert cache.stats()["pinned_entries"] == 0
    cache.delete("k")
    assert "k" not in cache


def test_counts_are_exact_across_threads(backend):
    cache = make(backend)
    cache.put("k", picture(1, (16, 16), "L"))

    def read():
        for _ in range(200):
            assert cache.get("k") is not None
            with cache.view_image("k"):
                pass

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert (stats["hits"], stats["views"], stats["misses"]) == (800, 800, 0)
    assert cache.metrics_snapshot()["hits"] == 1600


def test_bitmaps_read_are_unlocked_by_the_idle_timer_afterwards(backend):
    """A view's last pin going takes the short way out when a tick is pending: the tick must
    still unlock the bitmap."""
    cache = make(backend, idle_unlock=0.05)
    cache.put("k", picture(1, OWN_SLAB, "RGBA"))
    for _ in range(20):
        cache.get("k")
        with cache.view_image("k"):
            pass
    deadline = time.monotonic() + 5
    while cache.stats()["locked_entries"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.stats()["locked_entries"] == 0 and cache.stats()["pinned_entries"] == 0
