"""An image cache on DiscardableCache and Pillow: bitmaps the kernel may reclaim while idle."""
from .cache import ImageCache
from .codec import ZERO_COPY_MODES, BitmapFormatError

__all__ = ["BitmapFormatError", "ImageCache", "ZERO_COPY_MODES"]
