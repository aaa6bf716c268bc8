"""Exact mining's dense path for small N: every (query, candidate) score computed directly, no bounds.

Below `core.mining.exact.DENSE_MAX_ROWS` valid rows the tiled miner's extra work (a k-means candidate
pass, bounds, emitted pairs and their sort) costs more than it saves: a whole [N, N] product takes
milliseconds. This path is the plain brute-force loop with HELIP's filters and the tie rule added
at almost no cost: blocks of query rows against all N columns (a block stays in cache, so the few
elementwise passes cost little next to the products), the filters applied only to the rows whose
largest cosine is above min(same, dup) (no other row can be filtered), a top-k window per row and
one sort of the window on (score descending, column ascending).
"""

from __future__ import annotations

import math

import torch

from core.mining.scores import Filters, Progress, _topk_lowest_index, dup_count, tile_scores

# Query rows a block: a block's fp32 cosines (2 x rows x N x 4 bytes) stay in a core's L2 cache at the
# N this path is chosen for; at least MIN_ROWS rows so that the products still run at full speed.
BLOCK_BYTES = 4 * 1024**2
MIN_ROWS = 256


def rank_window(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order rows of a top-k window (values already descending) by (score desc, column asc); keep k.

    Equal values form runs; the key run-number x n_cols + column is unique, so one row-wise sort gives
    the tie rule. -0.0 and 0.0 compare equal and share a run (as they do in the tiled path).
    """
    if vals.shape[1] == 0:
        return vals, idx
    step = torch.ones_like(idx)
    step[:, 1:] = (vals[:, 1:] != vals[:, :-1]).long()
    run = torch.cumsum(step, dim=1)
    key = run * (int(idx.max()) + 2 if idx.numel() else 1) + idx
    order = torch.sort(key, dim=1).indices[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def mine_dense(t: torch.Tensor, v: torch.Tensor, k: int, f: Filters, counts: list[int],
               progress: Progress = None, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] columns (-1 pads) and fp32 scores (NaN pads) of every row against all others, best first.

    counts[0] / counts[1] get the ordered pairs dropped as the same caption / zeroed as duplicates.
    """
    n = t.shape[0]
    dev = t.device
    rows = rows or max(MIN_ROWS, BLOCK_BYTES // (8 * max(n, 1)))
    low = min(f.same, f.dup)
    kk = min(k, n)
    idx_out = torch.full((n, k), -1, dtype=torch.int64, device=dev)
    val_out = torch.full((n, k), float("nan"), dtype=torch.float32, device=dev)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        r = torch.arange(b - a, device=dev)
        ct, cv = t[a:b] @ t.T, v[a:b] @ v.T
        # The pair itself: -inf cosines are neither same caption nor duplicate; its score is set below.
        ct[r, r + a] = -math.inf
        cv[r, r + a] = -math.inf
        hit = (torch.maximum(ct.amax(dim=1), cv.amax(dim=1)) > low).nonzero().squeeze(1)
        if hit.numel():
            fixed, same, dup = tile_scores(ct[hit], cv[hit], f)
            counts[0] += int(torch.count_nonzero(same))
            counts[1] += int(dup_count(same, dup, f))
        s = ct.float() if ct.dtype != torch.float32 else ct
        c2 = cv.float() if cv.dtype != torch.float32 else cv
        if f.clamp:
            s.clamp_(min=0)
            c2.clamp_(min=0)
        s = s.mul_(c2)
        if hit.numel():
            s[hit] = fixed
        s[r, r + a] = -math.inf
        vals, pos = _topk_lowest_index(s, kk)
        vals, pos = rank_window(vals, pos, kk)
        dead = ~torch.isfinite(vals)
        idx_out[a:b, :kk] = torch.where(dead, -1, pos)
        val_out[a:b, :kk] = torch.where(dead, float("nan"), vals)
        if progress is not None:
            progress(b, n)
    return idx_out, val_out
