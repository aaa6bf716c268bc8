"""The mined table on disk: hard_pairs.parquet (row, key, neighbors, scores), written and read back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.errors import DataError
from core.mining.scores import MinedPairs


def write_hard_pairs(path: str | Path, mined: MinedPairs, keys: Sequence[str]) -> None:
    """One row per valid training pair: row, key, neighbors (pads removed), scores; N and k in the metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = mined.neighbors.shape
    if len(keys) != n:
        raise DataError(f"{len(keys)} keys for {n} mined rows")
    rows = np.flatnonzero(mined.valid_rows())
    nb = mined.neighbors[rows]
    kept = nb >= 0  # pads only ever trail a list, so row-major order keeps each list best first
    offsets = np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype(np.int32 if kept.sum() < 2**31 else np.int64)
    list_type = pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray
    table = pa.table({
        "row": pa.array(rows.astype(np.int64)),
        "key": pa.array([str(keys[int(i)]) for i in rows], type=pa.string()),
        "neighbors": list_type.from_arrays(pa.array(offsets), pa.array(nb[kept].astype(np.int64))),
        "scores": list_type.from_arrays(pa.array(offsets), pa.array(mined.scores[rows][kept].astype(np.float32))),
    })
    meta = {"helip.rows": str(n), "helip.top_k": str(k), "helip.report": json.dumps(mined.report, default=str)}
    pq.write_table(table.replace_schema_metadata(meta), str(path), compression="zstd")


def read_hard_pairs(path: str | Path) -> tuple[MinedPairs, list[str]]:
    """The inverse of write_hard_pairs: padded [N, k] arrays, the valid mask, and keys ("" for rows not mined)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read hard pairs from {path}: {exc}") from exc
    meta = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    rows = table.column("row").to_numpy().astype(np.int64)
    nb_col = table.column("neighbors").combine_chunks()
    sc_col = table.column("scores").combine_chunks()
    lengths = np.diff(nb_col.offsets.to_numpy()) if len(rows) else np.zeros(0, dtype=np.int64)
    n = int(meta.get("helip.rows", int(rows.max()) + 1 if len(rows) else 0))
    k = int(meta.get("helip.top_k", int(lengths.max()) if len(lengths) else 0))
    neighbors = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), np.nan, dtype=np.float32)
    row_of = np.repeat(rows, lengths)
    pos = np.arange(int(lengths.sum())) - np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    neighbors[row_of, pos] = nb_col.flatten().to_numpy()
    scores[row_of, pos] = sc_col.flatten().to_numpy()
    valid = np.zeros(n, dtype=bool)
    valid[rows] = True
    keys = [""] * n
    for row, key in zip(rows.tolist(), table.column("key").to_pylist(), strict=True):
        keys[row] = key
    report = json.loads(meta["helip.report"]) if "helip.report" in meta else {}
    return MinedPairs(neighbors=neighbors, scores=scores, report=report, valid=valid), keys
