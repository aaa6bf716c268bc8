"""Exact hard pair mining: every valid row's top_k by cos_t * cos_v, blocked over queries."""

from __future__ import annotations

import time

import numpy as np
import torch

from core import chunked_topk
from core.mining.scores import (MinedPairs, Progress, _block_scores, _check_top_k, _filter_scores, _finish_rows,
                                _prepare, _run_block_scores, _topk_lowest_index)


def _rows_per_block(block_size: int, n: int, dev: torch.device, dtype: torch.dtype) -> int:
    """block_size is an upper bound: a block also has to fit the memory at hand ([rows, N] temporaries)."""
    esize = torch.finfo(dtype).bits // 8
    per_row = n * (2 * esize + 24)  # two cosine blocks, fp32 scores, topk workspace, tie keys and masks
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = free // 2
    else:
        budget = 2 * 1024**3
    return int(max(1, min(block_size, budget // max(per_row, 1))))


def _exact_rows(t: torch.Tensor, v: torch.Tensor, queries: np.ndarray, col_valid: torch.Tensor, *, top_k: int,
                rows: int, same_thr: float, dup_thr: float, clamp: bool, progress: Progress,
                counts: dict[str, int], chunk: int | None = None,
                force_chunks: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top_k for the given query rows against all valid columns, `rows` queries at a time."""
    dev = t.device
    out_idx = np.full((len(queries), top_k), -1, dtype=np.int64)
    out_val = np.full((len(queries), top_k), np.nan, dtype=np.float32)
    n_same = torch.zeros((), dtype=torch.int64, device=dev)
    n_dup = torch.zeros((), dtype=torch.int64, device=dev)
    n = t.shape[0]
    chunk = chunk or chunked_topk.CHUNK
    use_chunks = force_chunks or chunked_topk.worthwhile(n, top_k, chunk)
    for start in range(0, len(queries), rows):
        q = torch.from_numpy(queries[start:start + rows]).to(dev)
        ct = t[q] @ t.T
        cv = v[q] @ v.T
        if use_chunks:
            cm, same, dup = chunked_topk.run_chunk_maxima(dev, _block_scores, ct, cv, col_valid, q, same_thr,
                                                          dup_thr, clamp, chunk)
            vals, idx, redo = chunked_topk.select(cm, ct, cv, col_valid, q, top_k=top_k, chunk=chunk,
                                                  filter_fn=_filter_scores, topk_fn=_topk_lowest_index,
                                                  same_thr=same_thr, dup_thr=dup_thr, clamp=clamp)
            del cm
            fix = redo.nonzero().squeeze(1)
            if fix.numel():  # a left-out chunk may tie the k-th score: those rows the full way
                counts["rows_redone"] = counts.get("rows_redone", 0) + int(fix.numel())
                scores, _, _ = _run_block_scores(dev, ct[fix], cv[fix], col_valid, q[fix], same_thr, dup_thr, clamp)
                vals[fix], idx[fix] = _topk_lowest_index(scores, top_k)
                del scores
            del ct, cv
        else:
            scores, same, dup = _run_block_scores(dev, ct, cv, col_valid, q, same_thr, dup_thr, clamp)
            del ct, cv
            vals, idx = _topk_lowest_index(scores, top_k)
            del scores
        n_same += same
        n_dup += dup
        vals_np, idx_np = _finish_rows(vals.float().cpu().numpy(), idx.cpu().numpy(), top_k)
        out_val[start:start + len(q)] = vals_np
        out_idx[start:start + len(q)] = idx_np
        if progress is not None:
            progress(min(start + rows, len(queries)), len(queries))
    counts["same_caption_filtered"] = counts.get("same_caption_filtered", 0) + int(n_same)
    counts["duplicate_filtered"] = counts.get("duplicate_filtered", 0) + int(n_dup)
    return out_val, out_idx


def mine_exact(
    text: torch.Tensor,
    image: torch.Tensor,
    *,
    top_k: int,
    valid: np.ndarray | None = None,
    block_size: int = 4096,
    same_caption_threshold: float = 0.995,
    duplicate_threshold: float = 0.98,
    clamp_negative: bool = True,
    device: str | torch.device = "cpu",
    progress: Progress = None,
    chunk: int | None = None,
    force_chunks: bool = False,
) -> MinedPairs:
    """Exact top_k hard pairs of every valid row, blocked over queries (never an N x N matrix).

    For large N the selection goes through chunk maxima (core.chunked_topk); `chunk` and
    `force_chunks` exist for tests, which compare both selections.

    Report counts are over all ordered (query, candidate) pairs of valid rows, the pair itself excluded:
    same_caption_filtered (dropped), duplicate_filtered (a cosine zeroed), self_skipped (one per query).
    """
    _check_top_k(top_k)
    t0 = time.perf_counter()
    t, v, valid_np, dev = _prepare(text, image, valid, device)
    n = t.shape[0]
    queries = np.flatnonzero(valid_np).astype(np.int64)
    col_valid = torch.from_numpy(valid_np).to(dev)
    rows = _rows_per_block(block_size, n, dev, t.dtype)
    counts: dict[str, int] = {}
    neighbors = np.full((n, top_k), -1, dtype=np.int64)
    scores = np.full((n, top_k), np.nan, dtype=np.float32)
    with torch.no_grad():
        vals, idx = _exact_rows(t, v, queries, col_valid, top_k=top_k, rows=rows, same_thr=same_caption_threshold,
                                dup_thr=duplicate_threshold, clamp=clamp_negative, progress=progress, counts=counts,
                                chunk=chunk, force_chunks=force_chunks)
    neighbors[queries] = idx
    scores[queries] = vals
    report = {
        "method": "exact", "rows": n, "valid_rows": len(queries), "top_k": top_k, "block_rows": rows,
        "counted_over": "all_pairs", **counts, "self_skipped": len(queries),
        "short_lists": int((idx[:, -1] == -1).sum()) if len(queries) else 0,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return MinedPairs(neighbors=neighbors, scores=scores, report=report, valid=valid_np)


