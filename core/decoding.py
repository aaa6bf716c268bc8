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
               param: str = "data.train", data: bytes | None = None) -> Image.Image:
    """The RGB image of `row`; BadSample when the row is bad or its bytes are missing or not an image.
    `data`: the row's bytes when the caller already read them (load_images' grouped reads)."""
    if row in index.bad:
        raise BadSample(row, index.bad[row])
    if data is None:
        data = _read(index, row, access, param)
    try:
        return decode_image(data, draft_size=draft_size)
    except ValueError as exc:
        raise BadSample(row, str(exc)) from None


def _read(index: PairIndex, row: int, access: dio.Access, param: str) -> bytes:
    src, off, size = index.sources[row], int(index.offsets[row]), int(index.sizes[row])
    try:
        if off >= 0:
            if size > MAX_IMAGE_BYTES:
                raise BadSample(row, "image too large")
            data = dio.read_range(src, off, size, access, param=param)
            if len(data) != size:
                raise BadSample(row, "truncated image")
            return data
        return dio.read_bytes(src, access, max_bytes=MAX_IMAGE_BYTES, param=param)
    except LocationError as exc:
        raise BadSample(row, "missing image" if "not found" in exc.message else "unreadable image") from None
    except DataError:
        raise BadSample(row, "image too large") from None


# Grouped reads: members of one shard whose byte ranges lie within GROUP_GAP of each other are read as one
# range of at most GROUP_SPAN bytes (one GET instead of one per sample on an object store).
GROUP_GAP = 1 << 20
GROUP_SPAN = 32 << 20


def group_ranges(index: PairIndex, rows: list[int]) -> list[list[int]]:
    """The rows to read together: each group is rows of one shard, by offset, close enough to share a read;
    rows outside a shard (one file each) and rows already known bad are groups of one."""
    by_source: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for r in rows:
        if int(index.offsets[r]) >= 0 and r not in index.bad and int(index.sizes[r]) <= MAX_IMAGE_BYTES:
            by_source.setdefault(index.sources[r], []).append(r)
        else:
            groups.append([r])
    for members in by_source.values():
        members.sort(key=lambda r: int(index.offsets[r]))
        cur = [members[0]]
        start = int(index.offsets[members[0]])
        end = start + int(index.sizes[members[0]])
        for r in members[1:]:
            off, size = int(index.offsets[r]), int(index.sizes[r])
            if off - end <= GROUP_GAP and max(end, off + size) - start <= GROUP_SPAN:
                cur.append(r)
                end = max(end, off + size)
            else:
                groups.append(cur)
                cur, start, end = [r], off, off + size
        groups.append(cur)
    return groups


def read_grouped(index: PairIndex, rows: list[int], access: dio.Access, *,
                 param: str = "data.train") -> dict[int, bytes | BadSample]:
    """Each row's bytes (or its BadSample), reading each group of group_ranges with one range request; a
    group whose read fails is read again row by row, so one bad member never spoils the others."""
    out: dict[int, bytes | BadSample] = {}
    for group in group_ranges(index, rows):
        if len(group) > 1:
            start = int(index.offsets[group[0]])
            end = max(int(index.offsets[m]) + int(index.sizes[m]) for m in group)
            try:
                blob = dio.read_range(index.sources[group[0]], start, end - start, access, param=param)
            except (LocationError, DataError):
                blob = b""
            if len(blob) == end - start:
                for m in group:
                    a = int(index.offsets[m]) - start
                    out[m] = blob[a:a + int(index.sizes[m])]
                continue
        for m in group:
            if m in index.bad:
                out[m] = BadSample(m, index.bad[m])
                continue
            try:
                out[m] = _read(index, m, access, param)
            except BadSample as exc:
                out[m] = exc
    return out


# JPEGs larger than this go to the workers' decoder (one image at a time per worker, within MAX_IMAGE_PIXELS):
# a batch of device-decoded images near that limit would need all their pixels on the device at once.
DEVICE_MAX_PIXELS = 4096 * 4096


def jpeg_or_none(data: bytes) -> bytes | None:
    """`data` when it is a JPEG the device decodes as the CPU would (RGB or greyscale, at most
    DEVICE_MAX_PIXELS); None sends it to the CPU decoder (PNG, CMYK JPEG, a huge or odd image: that path
    applies its own limits and says what is wrong)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:  # the header only
            w, h = im.size
            ok = im.mode in ("RGB", "L") and 0 < w * h <= min(MAX_IMAGE_PIXELS, DEVICE_MAX_PIXELS)
    except Exception:
        return None
    return data if ok else None
