"""A job's training rows for the dashboard: its index rebuilt through the job's location checks, thumbnails.

The index is the one the job built: the same `data` fields of its stored spec, read by the same
`core.index.build_index` through the same `Access` (settings.access()). Nothing in a request names a
location: a request gives a job id and a row number, and only rows of that index are ever read.

Only torch-free modules are used here (core.index, core.decoding, core.io): the API process never imports
torch (tests/test_ui_api.py serves a thumbnail in a fresh process and checks).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any

from api.job_data import Lru
from core.decoding import load_image
from core.index import PairIndex, build_index
from core.io import Access

THUMB_CACHE_BYTES = 32 * 1024**2


class Indexes:
    """The training index of the last few jobs asked about (building one reads the CSV or every shard's headers)."""

    def __init__(self, size: int = 4):
        self._lru = Lru(size)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, job_id: str, spec: dict[str, Any], access: Access) -> PairIndex:
        hit = self._lru.get(job_id)
        if hit is not None:
            return hit
        with self._guard:
            lock = self._locks.setdefault(job_id, threading.Lock())
        with lock:  # concurrent thumbnails of one job build its index once
            hit = self._lru.get(job_id)
            if hit is None:
                hit = self._lru.put(job_id, build_job_index(spec, access))
        with self._guard:
            self._locks.pop(job_id, None)
        return hit


def build_job_index(spec: dict[str, Any], access: Access) -> PairIndex:
    d = spec["data"]
    # the stored spec is resolved (every field filled in); a field a later version added takes its default
    options = {k: d[k] for k in ("csv_img_key", "csv_caption_key", "csv_separator", "max_caption_chars") if k in d}
    return build_index(d["train"], access=access, param="data.train", **options)


def render_thumbnail(index: PairIndex, row: int, access: Access, size: int) -> bytes:
    """The row's image scaled to fit size x size, as JPEG; core.decoding.BadSample when it cannot be read."""
    image = load_image(index, row, access, draft_size=2 * size)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


class ThumbnailCache:
    """Rendered thumbnails by (job, row, size), least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int = THUMB_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int, int], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= len(old) if old is not None else 0
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    @property
    def size_bytes(self) -> int:
        return self._bytes
