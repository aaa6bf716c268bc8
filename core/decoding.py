"""Image bytes to an RGB image, safely: a bounded set of decoders, size limits, and one reason per bad sample."""

from __future__ import annotations

import io

from PIL import Image

from core import io as dio
from core.errors import DataError, LocationError
from core.index import PairIndex

MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default: anything larger is treated as a decompression bomb
# Only these decoders run on user bytes: PIL's EPS plugin, for one, would start Ghostscript.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "PPM")


class BadSample(Exception):
    """A sample that cannot be used; it keeps its row and says why."""

    def __init__(self, row: int, reason: str):
        super().__init__(f"row {row}: {reason}")
        self.row, self.reason = row, reason



def decode_image(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode bytes into an RGB image; ValueError("reason") when they are not a usable image."""
    try:
        im: Image.Image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError:
        raise ValueError("image too large") from None
    except Exception:  # PIL raises UnidentifiedImageError and assorted parsing errors
        raise ValueError("not an image") from None
    w, h = im.size
    if w <= 0 or h <= 0 or w * h > MAX_IMAGE_PIXELS:
        raise ValueError("image too large")
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))  # DCT scaling: a big JPEG decodes at a fraction of the cost
    try:
        im.load()
    except Exception:
        raise ValueError("corrupt image") from None
    if im.mode == "RGB":
        return im  # convert() would copy the pixels once more for nothing
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_image(index: PairIndex, row: int, access: dio.Access, *, draft_size: int | None = None,
               param: str = "data.train") -> Image.Image:
    """The RGB image of `row`; BadSample when the row is bad or its bytes are missing or not an image."""
    if row in index.bad:
        raise BadSample(row, index.bad[row])
    src, off, size = index.sources[row], int(index.offsets[row]), int(index.sizes[row])
    try:
        if off >= 0:
            if size > MAX_IMAGE_BYTES:
                raise BadSample(row, "image too large")
            data = dio.read_range(src, off, size, access, param=param)
            if len(data) != size:
                raise BadSample(row, "truncated image")
        else:
            data = dio.read_bytes(src, access, max_bytes=MAX_IMAGE_BYTES, param=param)
    except LocationError as exc:
        raise BadSample(row, "missing image" if "not found" in exc.message else "unreadable image") from None
    except DataError:
        raise BadSample(row, "image too large") from None
    try:
        return decode_image(data, draft_size=draft_size)
    except ValueError as exc:
        raise BadSample(row, str(exc)) from None
