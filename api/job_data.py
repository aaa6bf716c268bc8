"""What the dashboard reads of a job's stored files: its mined table by row, and rows of its embeddings."""

from __future__ import annotations

import json
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StorageError
from helip.store import Store

# Stored files fetched from an S3 store are kept on disk under the data directory, up to this many bytes.
CACHE_BYTES = 2 * 1024**3
# Per-target filter counts compare the target with every row: done when both matrices fit this many values.
FULL_SCAN_VALUES = 64 * 1024**2


def key_crc(key: str) -> int:
    """A 32-bit fingerprint of a sample key: the index the API rebuilds is checked against the job's table."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass"))


class Lru:
    """A small thread-safe LRU of named objects."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: Any, value: Any) -> Any:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class LocalCopies:
    """A stored file as a local path: the file itself for a file:// store, else a bounded on-disk copy."""

    def __init__(self, root: Path, max_bytes: int = CACHE_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}  # file name -> when this process last used it (a counter)
        self._clock = 0

    def _touch(self, name: str) -> None:
        self._clock += 1
        self._used[name] = self._clock

    def path(self, store: Store, key: str, sha256: str, size: int) -> Path | None:
        """None when the file is larger than the whole cache (the caller says what it cannot show)."""
        local = store.local_path(key)
        if local is not None:
            if not local.is_file():
                raise StorageError(f"stored file {key!r} is missing")
            return local
        if size > self.max_bytes:
            return None
        dest = self.root / f"{sha256}{Path(key).suffix}"
        with self._lock:  # one download at a time: two requests for the same file fetch it once
            if dest.is_file() and dest.stat().st_size == size:
                self._touch(dest.name)
                return dest
            self.root.mkdir(parents=True, exist_ok=True)
            self._make_room(size)
            tmp = dest.with_suffix(dest.suffix + ".part")
            store.get_file(key, tmp)
            tmp.replace(dest)
            self._touch(dest.name)
            return dest

    def _make_room(self, size: int) -> None:
        # least recently used first; files left by an earlier process (never used here) before any other
        files = sorted((p for p in self.root.iterdir() if p.is_file()),
                       key=lambda p: (self._used.get(p.name, 0), p.stat().st_mtime))
        total = sum(p.stat().st_size for p in files)
        while files and total + size > self.max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            self._used.pop(oldest.name, None)


class MinedTable:
    """hard_pairs.parquet, read once: its mined rows, each row's best score and key fingerprint, its metadata."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        pf = pq.ParquetFile(path)
        meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
        self.report: dict[str, Any] = json.loads(meta.get("helip.report", "{}"))
        rows, best, crcs = [], [], []
        for batch in pf.iter_batches(columns=["row", "key", "scores"], batch_size=65536):
            rows.append(batch.column("row").to_numpy(zero_copy_only=False).astype(np.int64))
            scores = batch.column("scores")
            offsets = scores.offsets.to_numpy()
            values = np.asarray(scores.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
            has = offsets[1:] > offsets[:-1]  # lists are best first: the first score is the row's best
            first = np.full(len(has), np.nan)
            first[has] = values[offsets[:-1][has] - offsets[0]]
            best.append(first)
            crcs.append(np.fromiter((key_crc(k or "") for k in batch.column("key").to_pylist()), dtype=np.uint32))
        self.rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self.best = np.concatenate(best) if best else np.zeros(0)
        self.crcs = np.concatenate(crcs) if crcs else np.zeros(0, dtype=np.uint32)
        order = np.argsort(self.rows, kind="stable")  # written sorted; made sure of here
        self.rows, self.best, self.crcs = self.rows[order], self.best[order], self.crcs[order]
        self.num_rows = int(meta.get("helip.rows", int(self.rows.max()) + 1 if len(self.rows) else 0))
        self.top_k = int(meta.get("helip.top_k", 0))

    def position(self, row: int) -> int | None:
        i = int(np.searchsorted(self.rows, row))
        return i if i < len(self.rows) and self.rows[i] == row else None

    def record(self, row: int) -> dict[str, Any] | None:
        """{row, key, neighbors, scores} of a mined row, else None."""
        import pyarrow.parquet as pq

        if self.position(row) is None:
            return None
        table = pq.read_table(self.path, columns=["row", "key", "neighbors", "scores"], filters=[("row", "==", row)])
        recs = table.to_pylist()
        return recs[0] if recs else None

    def pick(self, order: str, limit: int, offset: int = 0, seed: int | None = None) -> list[tuple[int, float | None]]:
        """(row, best score) by best score (highest / lowest; rows without a neighbour last) or at random."""
        if order == "random":
            rng = np.random.default_rng(seed)
            idx = rng.choice(len(self.rows), size=min(limit, len(self.rows)), replace=False)
        else:
            known = np.flatnonzero(~np.isnan(self.best))
            ranked = known[np.argsort(-self.best[known] if order == "highest" else self.best[known], kind="stable")]
            idx = np.concatenate([ranked, np.flatnonzero(np.isnan(self.best))])[offset:offset + limit]
        return [(int(self.rows[i]), None if np.isnan(self.best[i]) else float(self.best[i])) for i in idx]


def _npz_member(path: Path, name: str) -> tuple[np.dtype, tuple[int, ...], int, bool]:
    """(dtype, shape, byte offset, fortran order) of an array stored uncompressed in an .npz file (np.savez)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError("not a zip local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy version {version}")
        return dtype, shape, f.tell(), fortran


@dataclass
class Embeddings:
    """The job's normalised text and image embeddings, memory-mapped: rows are read without loading N x d."""

    text: np.ndarray
    image: np.ndarray
    valid: np.ndarray

    @classmethod
    def open(cls, path: Path) -> Embeddings:
        arrays = {}
        for name in ("text", "image", "valid"):
            dtype, shape, offset, fortran = _npz_member(path, f"{name}.npy")
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                     order="F" if fortran else "C")
        return cls(arrays["text"], arrays["image"], np.asarray(arrays["valid"], dtype=bool))

    def cosines(self, row: int, others: list[int]) -> tuple[list[float], list[float]]:
        """Text and image cosines of `row` with each of `others` (fp64 dot products of the stored vectors)."""
        t = np.asarray(self.text[row], dtype=np.float64)
        v = np.asarray(self.image[row], dtype=np.float64)
        idx = np.asarray(others, dtype=np.int64)
        ct = np.asarray(self.text[idx], dtype=np.float64) @ t if len(idx) else np.zeros(0)
        cv = np.asarray(self.image[idx], dtype=np.float64) @ v if len(idx) else np.zeros(0)
        return [float(x) for x in ct], [float(x) for x in cv]

    def filter_counts(self, row: int, *, same_caption_threshold: float, duplicate_threshold: float,
                      chunk: int = 65536) -> dict[str, int] | None:
        """Over every other valid row: how many mining dropped as the same caption, and how many it zeroed as a
        probable duplicate (a cosine above duplicate_threshold). None when N x d is too large to scan here."""
        n, d = self.text.shape
        if n * d > FULL_SCAN_VALUES:
            return None
        t = np.asarray(self.text[row], dtype=np.float32)
        v = np.asarray(self.image[row], dtype=np.float32)
        same = dup = candidates = 0
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            keep = self.valid[start:stop].copy()
            if start <= row < stop:
                keep[row - start] = False
            ct = np.asarray(self.text[start:stop], dtype=np.float32) @ t
            cv = np.asarray(self.image[start:stop], dtype=np.float32) @ v
            is_same = (ct > same_caption_threshold) & keep
            is_dup = ((ct > duplicate_threshold) | (cv > duplicate_threshold)) & keep & ~is_same
            same += int(is_same.sum())
            dup += int(is_dup.sum())
            candidates += int(keep.sum())
        return {"candidates": candidates, "same_caption": same, "duplicate": dup}


class JobData:
    """Per API process: the mined tables and embeddings it has opened, by stored sha256 (a few at a time)."""

    def __init__(self, cache_dir: Path):
        self.copies = LocalCopies(cache_dir)
        self._tables = Lru(4)
        self._embeddings = Lru(4)
        self._lock = threading.Lock()

    def table(self, store: Store, key: str, sha256: str, size: int) -> MinedTable:
        hit = self._tables.get(sha256)
        if hit is not None and hit.path.is_file():  # a copy dropped from the disk cache is fetched again
            return hit
        path = self.copies.path(store, key, sha256, size)
        if path is None:
            raise StorageError(f"the mined table ({size} bytes) is larger than the dashboard's cache")
        with self._lock:
            return self._tables.put(sha256, MinedTable(path))

    def embeddings(self, store: Store, key: str, sha256: str, size: int) -> Embeddings | None:
        """None when the file is too large to fetch or not in np.savez's uncompressed layout."""
        hit = self._embeddings.get(sha256)
        if hit is not None:
            return hit
        path = self.copies.path(store, key, sha256, size)
        if path is None:
            return None
        try:
            emb = Embeddings.open(path)
        except (ValueError, KeyError, OSError):
            return None
        return self._embeddings.put(sha256, emb)
