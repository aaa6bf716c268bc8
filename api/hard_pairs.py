"""A readable sample of a mined hard-pair table: the first rows with their keys and their neighbours' keys."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from core.errors import StorageError
from helip.store import Store

SAMPLE_ROWS = 20
_cache: dict[tuple[str, str], dict[str, Any]] = {}
_lock = threading.Lock()


def _read_sample(path: Path, rows: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    head = next(pf.iter_batches(batch_size=rows), None)
    records = head.to_pylist()[:rows] if head is not None else []
    wanted = sorted({int(n) for r in records for n in (r.get("neighbors") or [])})
    keys: dict[int, str | None] = {}
    if wanted:
        # Only the rows the sample names, column-pruned: the table can hold millions of rows.
        table = pq.read_table(path, columns=["row", "key"])
        table = table.filter(pc.is_in(table["row"], value_set=pa.array(wanted, type=table["row"].type)))
        keys = dict(zip(table["row"].to_pylist(), table["key"].to_pylist(), strict=True))
    sample = [
        {
            "row": int(r["row"]), "key": r.get("key"),
            "neighbors": [int(n) for n in r.get("neighbors") or []],
            "neighbor_keys": [keys.get(int(n)) for n in r.get("neighbors") or []],
            "scores": [float(s) for s in r.get("scores") or []],
        }
        for r in records
    ]
    return {"num_rows": pf.metadata.num_rows, "sample": sample}


def hard_pairs_sample(store: Store, key: str, sha256: str, rows: int = SAMPLE_ROWS) -> dict[str, Any]:
    """{num_rows, sample}; cached per (key, sha256) so an s3 table is downloaded once per API process."""
    with _lock:
        hit = _cache.get((key, sha256))
    if hit is not None:
        return hit
    local = store.local_path(key)
    if local is not None:
        if not local.is_file():
            raise StorageError(f"stored file {key!r} is missing")
        out = _read_sample(local, rows)
    else:
        with tempfile.TemporaryDirectory(prefix="helip-hp-") as tmp:
            out = _read_sample(store.get_file(key, Path(tmp) / "hard_pairs.parquet"), rows)
    with _lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[(key, sha256)] = out
    return out
