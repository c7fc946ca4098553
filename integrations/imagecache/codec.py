"""The layout of a bitmap in discardable memory: a fixed header, the palette, then raw pixels."""
from __future__ import annotations

import functools
import struct
from typing import Any, NamedTuple, Optional

from PIL import Image, ImagePalette

# Modes whose raw bytes are Pillow's own in-memory layout, so Image.frombuffer maps them instead
# of copying (Pillow's _MAPMODES).  RGB is not one: Pillow keeps 4 bytes per RGB pixel.
ZERO_COPY_MODES = ("L", "P", "RGBA", "RGBX", "CMYK", "I;16", "I;16L", "I;16B")
MAGIC = b"DCBM"
VERSION = 1
# magic, version, mode, width, height, palette mode and length, pixel offset and length
HEADER = struct.Struct("<4sH10sII8sIIQ")
ALIGN = 64  # pixels start on a cache line
# Attribute values an image made by a Recipe may share with the probe it was learnt from.
IMMUTABLE = (type(None), bool, int, float, str, bytes, tuple)
_new_object = object.__new__


class BitmapFormatError(ValueError):
    """Stored bytes that are not a bitmap this module wrote (a corrupt or foreign entry)."""


class Layout(NamedTuple):
    """What the header says: mode, size, palette and where the pixels are."""

    mode: str
    size: tuple[int, int]
    palette_mode: str
    palette: bytes
    offset: int
    length: int


class Parsed:
    """A stored bitmap's header parsed and checked once, kept beside its entry: reads compare
    the stored bytes' prefix (header, palette, padding) with it instead of parsing again, and
    wrap the pixels as worked out here."""

    __slots__ = ("spec", "prefix", "prefix_len", "nbytes", "zero_copy", "template", "args",
                 "map_args", "owned", "read_only")

    def __init__(self, spec: Layout, prefix: bytes, data: memoryview) -> None:
        self.spec, self.prefix, self.nbytes = spec, prefix, data.nbytes
        self.prefix_len = len(prefix)
        self.zero_copy = spec.length > 0 and spec.mode in ZERO_COPY_MODES
        # Image._new of a 0x0 image of the mode wraps a mapped core as Image.frombuffer does,
        # without its argument checks (done once, here).
        self.template = Image.new(spec.mode, (0, 0)) if self.zero_copy else None
        self.args = (spec.mode, 0, 1)
        self.map_args = (spec.size, "raw", spec.offset, self.args)  # after the buffer
        # How to wrap a core as an image the caller owns, and as a read-only one (None: with
        # Image._new); learnt from images Pillow wraps around a core mapped on data, gone
        # before returning, so the caller's view of data outlives no export.
        self.owned: Optional[Recipe] = None
        self.read_only: Optional[Recipe] = None
        if self.zero_copy and not spec.palette_mode:  # a palette is an object of its own
            core = probe = None
            try:
                core = Image.core.map_buffer(data, *self.map_args)
                self.owned = recipe(self.template._new(core), core)
                probe = self.template._new(core)
                probe.readonly = 1
                self.read_only = recipe(probe, core)
            except Exception:  # reads fall back to Image._new, which will say what is wrong
                self.owned = self.read_only = None
            finally:
                core = probe = None

    def matches(self, data: memoryview) -> bool:
        """True if data is still the bitmap this header was parsed from (size and prefix)."""
        return data.nbytes == self.nbytes and data[:self.prefix_len].tobytes() == self.prefix

    def copy(self, data: memoryview) -> Optional[Image.Image]:
        """An Image owning a copy of the pixels (one memcpy per line for mapped modes), or None
        if data is no longer the bitmap this header was parsed from."""
        if data.nbytes != self.nbytes or data[:self.prefix_len].tobytes() != self.prefix:
            return None
        spec = self.spec
        if not self.zero_copy:
            return decode(data, spec)
        # The temporary mapping goes with this expression, before the caller's view of data.
        core = Image.core.map_buffer(data, *self.map_args).copy()
        if self.owned is None:
            image = self.template._new(core)
        else:  # Recipe.wrap inlined: this is ImageCache.get's hot path
            cls, state, holder = self.owned
            image = _new_object(cls)
            attributes = state.copy()
            attributes[holder] = core
            attributes["info"] = {}
            image.__dict__ = attributes
        if spec.palette_mode:
            _apply_palette(image, spec)
        return image

    def map(self, data: memoryview) -> tuple[Image.Image, Optional[memoryview]]:
        """A read-only Image mapping the pixels (a copy for other modes), and the view of data
        it holds (None for a copy)."""
        spec = self.spec
        if not self.zero_copy:
            image = decode(data, spec)
            image.readonly = 1
            return image, None
        pixels = data[spec.offset:]
        image = None
        try:
            core = Image.core.map_buffer(pixels, spec.size, "raw", 0, self.args)
            if self.read_only is None:
                image = self.template._new(core)
                image.readonly = 1
            else:
                image = self.read_only.wrap(core)
            del core
            if spec.palette_mode:
                _apply_palette(image, spec)
        except BaseException:
            core = image = None
            pixels.release()  # no export may outlive the caller's pin
            raise
        return image, pixels


class Recipe(NamedTuple):
    """How Pillow wraps a core of one mode and size in an Image, to do it without
    Image.__init__ and Image._new: a new instance given a copy of `state` (the attributes, all
    immutable values but a fresh info dict), the core in attribute `holder`."""

    cls: type
    state: dict[str, Any]
    holder: str

    def wrap(self, core: Any) -> Image.Image:
        """An image of core, as the probe the recipe was learnt from is of its own."""
        image = _new_object(self.cls)
        attributes = self.state.copy()
        attributes[self.holder] = core
        attributes["info"] = {}
        image.__dict__ = attributes
        return image


def recipe(probe: Image.Image, core: Any) -> Optional[Recipe]:
    """The Recipe of probe, which Pillow made around core; None (use Image._new) unless the
    core is in one attribute and every other is an immutable value or the empty info dict, as
    in Pillow 9 to 13 for modes without a palette, and an image made by it is like probe."""
    try:
        state = dict(vars(probe))
    except TypeError:  # no instance dict
        return None
    holders = [name for name, value in state.items() if value is core]
    shared = [name for name, value in state.items()
              if value is not core and type(value) not in IMMUTABLE]
    if len(holders) != 1 or shared != ["info"] or state["info"] != {}:
        return None
    state[holders[0]] = None  # the probe's core is not kept
    found = Recipe(type(probe), state, holders[0])
    made = None
    try:
        made = found.wrap(core)
        alike = (made.im is core and made.mode == probe.mode and made.size == probe.size
                 and made.readonly == probe.readonly and vars(made).keys() == state.keys())
    except (TypeError, AttributeError, ValueError):
        return None
    finally:
        made = None
    return found if alike else None


def parse(data: memoryview) -> Parsed:
    """layout() of stored bytes, kept with what reads need; BitmapFormatError if not a bitmap."""
    spec = layout(data)
    return Parsed(spec, bytes(data[:spec.offset]), data)


def encode(image: Image.Image) -> bytes:
    """The bytes to store for image: header, palette, padding, raw pixels in the image's mode."""
    image.load()
    pixels = image.tobytes()
    palette_mode, palette = "", b""
    if image.mode in ("P", "PA") and image.palette is not None:
        palette_mode = image.palette.mode
        palette = bytes(image.getpalette(palette_mode) or b"")
    offset = _aligned(HEADER.size + len(palette))
    header = HEADER.pack(MAGIC, VERSION, image.mode.encode("ascii"), image.width, image.height,
                         palette_mode.encode("ascii"), len(palette), offset, len(pixels))
    padding = bytes(offset - HEADER.size - len(palette))
    return b"".join((header, palette, padding, pixels))


def layout(data: memoryview) -> Layout:
    """Parse and check the header of stored bytes; BitmapFormatError if they are not a bitmap."""
    if data.nbytes < HEADER.size:
        raise BitmapFormatError(f"{data.nbytes} bytes are too few for a bitmap header")
    magic, version, mode, width, height, palette_mode, palette_len, offset, length = \
        HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise BitmapFormatError(f"not a stored bitmap (magic {magic!r}, version {version})")
    try:
        mode_name = mode.rstrip(b"\0").decode("ascii")
        palette_name = palette_mode.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise BitmapFormatError("the bitmap header names no valid mode") from None
    if offset < HEADER.size + palette_len or offset + length != data.nbytes:
        raise BitmapFormatError(f"the bitmap header does not match its {data.nbytes} bytes")
    if length != _row_bytes(mode_name, width) * height:
        raise BitmapFormatError(f"{length} bytes of pixels are not a {width}x{height} "
                                f"{mode_name} image")
    palette = bytes(data[HEADER.size:HEADER.size + palette_len])
    return Layout(mode_name, (width, height), palette_name, palette, offset, length)


def decode(data: memoryview, spec: Optional[Layout] = None) -> Image.Image:
    """An Image owning a copy of the stored bitmap (its layout parsed when not given)."""
    spec = layout(data) if spec is None else spec
    if spec.length == 0:
        image = Image.new(spec.mode, spec.size)
    elif spec.mode in ZERO_COPY_MODES:
        # Mapping then copying is one memcpy per line, faster than frombytes' raw decoder.
        with data[spec.offset:] as pixels:
            mapped = Image.frombuffer(spec.mode, spec.size, pixels, "raw", spec.mode, 0, 1)
            image = mapped.copy()
            mapped.close()
            del mapped
    else:
        with data[spec.offset:] as pixels:
            image = Image.frombytes(spec.mode, spec.size, pixels)
    _apply_palette(image, spec)
    return image


def map_image(data: memoryview) -> tuple[Image.Image, Optional[memoryview]]:
    """A read-only Image mapping the stored pixels where the mode allows, and the view of `data`
    it holds (None when the mode made a copy necessary)."""
    return parse(data).map(data)


def _apply_palette(image: Image.Image, spec: Layout) -> None:
    if not spec.palette_mode:
        return
    # Through ImagePalette and load(), not putpalette(): putpalette copies a read-only image.
    image.palette = ImagePalette.raw(spec.palette_mode, spec.palette)
    image.load()


@functools.lru_cache(maxsize=256)
def _row_bytes(mode: str, width: int) -> int:
    """Bytes of one row of raw pixels; BitmapFormatError for a mode Pillow does not know."""
    try:
        return len(Image.new(mode, (width, 1)).tobytes())
    except (ValueError, KeyError):
        raise BitmapFormatError(f"{mode!r} is not a Pillow image mode") from None


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN

