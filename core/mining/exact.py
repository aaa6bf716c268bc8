"""Exact hard pair mining: every valid row's top_k by HELIP's filtered cos_t * cos_v, never an N x N matrix.

How (issue 11): the score is symmetric, so each tile of pairs (rows i < j) is computed once and
serves both rows. A cheap candidate pass first gives every row a lower bound of its k-th score
(rows grouped by k-means on [t; v], each against a window of its group: the k-th best exact score
among any valid candidates is a valid bound); a tile then emits only the pairs at or above the
bound of their row (core.mining.select), bounds rise as the kept lists fill, and one final sort on
the device applies the tie rule (score descending, lower index first). On CUDA with Triton the two
products, the filters, the clamp, the product and the threshold test are one kernel per tile
(core.mining.exact_triton), so no [rows, N] block is ever written; elsewhere the same steps run
as torch operations on tiles small enough to stay in cache.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from core.mining.cluster import default_lists, kmeans
from core.mining.dense import mine_dense
from core.mining.scores import Filters, MinedPairs, Progress, _check_top_k, _prepare, _topk_lowest_index, dup_count, tile_scores
from core.mining.select import LOWEST, TopK

log = logging.getLogger(__name__)

# Tile shapes: CPU tiles stay in cache; GPU tiles are large enough to fill the device.
CPU_TILE = (256, 1024)
GPU_TILE = (8192, 65536)
# At most this many valid rows: the dense path (core.mining.dense: all N x N scores, in blocks of query
# rows, no candidate pass, no bounds); above it the tiled path. Measured crossover on one CPU thread:
# docs/benchmarks.md section 2. Same scores, filters, counts and tie rule either way.
DENSE_MAX_ROWS = 4096


def score_tolerance(dtype: torch.dtype) -> float:
    """How far two computations of one pair's score (different tilings of the products) may differ."""
    return 16 * torch.finfo(dtype).eps


def candidate_bounds(t: torch.Tensor, v: torch.Tensor, k: int, f: Filters, *, window: int,
                     rows: int | None = None, seed: int = 0) -> torch.Tensor:
    """Per row a lower bound of its k-th best score: the k-th best among `window` rows of its k-means
    neighbourhood (rows sorted by cluster), minus the score tolerance of the dtype; LOWEST if the window
    holds fewer than k valid candidates."""
    n = t.shape[0]
    bound = torch.full((n,), LOWEST, device=t.device)
    window = min(window, n)
    if window - 1 < k:
        return bound
    _, assign = kmeans(t, v, default_lists(n, max(1, window // 2)), iters=6, seed=seed)
    order = torch.sort(assign, stable=True).indices
    tol = score_tolerance(t.dtype)
    rows = rows or max(1, window // 4)  # each query sits well inside its window
    for a in range(0, n, rows):
        q = order[a:a + rows]
        lo = min(max(0, a + len(q) // 2 - window // 2), n - window)
        c = order[lo:lo + window]
        s, _, _ = tile_scores(t[q] @ t[c].T, v[q] @ v[c].T, f)
        s.masked_fill_(q[:, None] == c[None, :], -math.inf)
        kth = torch.topk(s, k, dim=1, sorted=True).values[:, k - 1]
        bound[q] = torch.where(torch.isfinite(kth), kth - tol, torch.full_like(kth, LOWEST))
    return bound


def _emit(sel: TopK, p: torch.Tensor, ct: torch.Tensor, cv: torch.Tensor, f: Filters, a: int, c0: int,
          diag: bool, counts: list) -> None:
    """Pairs of a tile (rows a.., columns c0..) at or above their row's bound, in both directions.

    A filtered score is cos_t * cos_v, 0 or -inf, so against a positive bound only pairs whose plain
    product p passes can pass: p is compared once with the lower of the two bounds and the filters are
    applied to those few pairs. Rows (or columns) whose bound is not positive get their filtered
    scores in full. Per row, pairs come out in increasing column order (TopK relies on it).
    """
    thr_r, thr_c = sel.threshold[a:a + p.shape[0]], sel.threshold[c0:c0 + p.shape[1]]
    pos_r, pos_c = thr_r > 0, thr_c > 0
    sp_r, sp_c = torch.where(pos_r, thr_r, math.inf), torch.where(pos_c, thr_c, math.inf)
    hit = (p >= torch.minimum(sp_r[:, None], sp_c[None, :])).nonzero()
    if diag:  # the tile holds the diagonal: only pairs j > i (each unordered pair once)
        hit = hit[hit[:, 1] + c0 > hit[:, 0] + a]
    i, j = hit[:, 0], hit[:, 1]
    s, _, _ = tile_scores(ct[i, j], cv[i, j], f)
    # Columns first: in the diagonal tile a row's pairs with earlier rows must precede those with later ones.
    for side, thr, sp, pos in ((1, thr_c, sp_c, pos_c), (0, thr_r, sp_r, pos_r)):
        line = i if side == 0 else j
        keep = s >= sp[line]
        si, sj, ss = i[keep], j[keep], s[keep]
        lines = (~pos).nonzero().squeeze(1)
        if lines.numel():  # no positive bound: these rows (columns) scored in full
            counts[2] += int(lines.numel())
            if side == 0:
                sub, _, _ = tile_scores(ct[lines], cv[lines], f)
                h = (sub >= thr[lines][:, None]).nonzero()
                di, dj = lines[h[:, 0]], h[:, 1]
            else:
                sub, _, _ = tile_scores(ct[:, lines], cv[:, lines], f)
                h = (sub >= thr[lines][None, :]).nonzero()
                di, dj = h[:, 0], lines[h[:, 1]]
            ds = sub[h[:, 0], h[:, 1]]
            if diag:
                upper = dj + c0 > di + a
                di, dj, ds = di[upper], dj[upper], ds[upper]
            si, sj, ss = torch.cat([si, di]), torch.cat([sj, dj]), torch.cat([ss, ds])
        if side == 0:
            sel.add(si + a, sj + c0, ss)
        else:  # column-major order: each column's pairs by increasing row
            order = torch.sort(sj * p.shape[0] + si).indices
            sel.add(sj[order] + c0, si[order] + a, ss[order])


def _count(ct: torch.Tensor, cv: torch.Tensor, f: Filters, a: int, c0: int, diag: bool, counts: list) -> None:
    """Same-caption and duplicate counts of a tile. When same >= dup (always, with the defaults) every
    same-caption pair also has a cosine above the duplicate threshold: a tile whose largest cosines are
    below it has none, else only its few pairs above it are looked at."""
    if f.same >= f.dup:
        if max(float(ct.max()), float(cv.max())) <= f.dup:
            return
        hit = (torch.maximum(ct, cv) > f.dup).nonzero()
    else:
        hit = ((ct > f.same) | (ct > f.dup) | (cv > f.dup)).nonzero()
    if diag:
        hit = hit[hit[:, 1] + c0 > hit[:, 0] + a]
    _, same, dup = tile_scores(ct[hit[:, 0], hit[:, 1]], cv[hit[:, 0], hit[:, 1]], f)
    counts[0] += int(torch.count_nonzero(same))
    counts[1] += int(dup_count(same, dup, f))


def _stripe_torch(t: torch.Tensor, v: torch.Tensor, a: int, b: int, f: Filters, sel: TopK, cols: int,
                  counts: list) -> None:
    """Rows [a, b) against every column j > i, `cols` columns a tile, in torch operations."""
    n = t.shape[0]
    tq, vq = t[a:b], v[a:b]
    for c0 in range(a, n, cols):
        c1 = min(n, c0 + cols)
        ct, cv = tq @ t[c0:c1].T, vq @ v[c0:c1].T
        diag = c0 < b
        _count(ct, cv, f, a, c0, diag, counts)
        _emit(sel, ct.float() * cv.float(), ct, cv, f, a, c0, diag, counts)
        counts[3] += 1


def _tile_shape(block_size: int, n: int, dev: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    rows, cols = GPU_TILE if dev.type == "cuda" else CPU_TILE
    rows = max(1, min(block_size, rows))
    if dev.type == "cuda":  # a tile's temporaries (~16 bytes a pair in torch) within a quarter of free memory
        free, _ = torch.cuda.mem_get_info(dev)
        cols = int(max(1024, min(cols, free // 4 // (16 * rows))))
    return rows, max(1, min(cols, n))


def _use_triton(dev: torch.device, kernel: str) -> bool:
    if kernel == "torch" or dev.type != "cuda":
        return False
    from core.mining import exact_triton

    return exact_triton.available()


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
    kernel: str = "auto",
    window: int | None = None,
    seed: int = 0,
    tile_cols: int | None = None,
    buffer: int | None = None,
) -> MinedPairs:
    """Exact top_k hard pairs of every valid row (score descending, lower row index first on ties).

    Up to DENSE_MAX_ROWS valid rows the dense path runs (core.mining.dense: every pair scored
    directly; not when kernel="triton" is asked for), above it the tiled path of the module's docstring;
    report["path"] says which.
    block_size bounds the rows of a tile. kernel: "auto" (Triton on CUDA when available), "torch" or
    "triton". window: rows of the candidate pass per query (default from N and top_k); tile_cols
    (tests) overrides the columns of a tile, buffer (tests) the pairs held before a cut.
    Report counts are over all ordered (query, candidate) pairs of valid rows, the pair itself excluded:
    same_caption_filtered (dropped), duplicate_filtered (a cosine zeroed), self_skipped (one per query).
    """
    _check_top_k(top_k)
    t0 = time.perf_counter()
    t, v, valid_np, dev = _prepare(text, image, valid, device)
    n_all = t.shape[0]
    f = Filters(same_caption_threshold, duplicate_threshold, clamp_negative)
    rows_of = torch.from_numpy(np.flatnonzero(valid_np)).to(dev)
    nv = int(rows_of.numel())
    rows, cols = _tile_shape(block_size, max(nv, 1), dev, t.dtype)
    cols = tile_cols or cols
    triton = _use_triton(dev, kernel) or kernel == "triton"
    report: dict = {"method": "exact", "rows": n_all, "valid_rows": nv, "top_k": top_k, "block_rows": rows,
                    "tile_cols": cols, "kernel": "triton" if triton else "torch", "counted_over": "all_pairs"}
    # same-caption pairs, duplicate pairs (unordered), lines of tiles scored in full (no positive bound), tiles
    counts = [0, 0, 0, 0]
    per_pair = 2
    idx = val = None
    with torch.no_grad():
        if nv < n_all:
            t, v = t[rows_of], v[rows_of]  # only valid rows take part; their order (the tie rule) is kept
        if nv and nv <= DENSE_MAX_ROWS and kernel != "triton":  # a kernel asked for by name is the tiled path's
            idx, val = mine_dense(t, v, top_k, f, counts, progress)
            report.update(path="dense", kernel="torch")
            per_pair = 1  # the dense path counts ordered pairs, the tiled one each unordered pair once
        elif nv:
            report["path"] = "tiled"
            w = window or max(4 * top_k, min(4096, nv // 16))
            bound = candidate_bounds(t, v, top_k, f, window=w, seed=seed)
            sel = TopK(nv, top_k, dev, bound=bound, col_ordered=not triton, buffer=buffer)
            report.update(candidate_window=min(w, nv), bounded_rows=int((bound > 0).sum()))
            total, done = nv * (nv - 1) // 2, 0
            for a in range(0, nv, rows):
                b = min(nv, a + rows)
                if triton:
                    from core.mining import exact_triton

                    exact_triton.stripe(t, v, a, b, f, sel, counts)
                else:
                    _stripe_torch(t, v, a, b, f, sel, cols, counts)
                done += (b - a) * (nv - a) - (b - a) * (b - a + 1) // 2
                if progress is not None:
                    progress(round(nv * done / total) if total else nv, nv)
            idx, val = sel.result()
            report.update(emitted=sel.emitted, cuts=sel.cuts, dense_lines=counts[2], tiles=counts[3])
        neighbors = np.full((n_all, top_k), -1, dtype=np.int64)
        scores = np.full((n_all, top_k), np.nan, dtype=np.float32)
        if idx is not None and val is not None:
            idx = torch.where(idx >= 0, rows_of[idx.clamp_min(0)], -1)  # back to the caller's row numbers
            neighbors[rows_of.cpu().numpy()] = idx.cpu().numpy()
            scores[rows_of.cpu().numpy()] = val.cpu().numpy()
    if progress is not None and not nv:
        progress(0, 0)
    report.update(same_caption_filtered=per_pair * counts[0], duplicate_filtered=per_pair * counts[1], self_skipped=nv,
                  short_lists=int((neighbors[valid_np, -1] == -1).sum()), seconds=round(time.perf_counter() - t0, 3))
    return MinedPairs(neighbors=neighbors, scores=scores, report=report, valid=valid_np)


def exact_rows(t: torch.Tensor, v: torch.Tensor, queries: torch.Tensor, k: int, f: Filters, *,
               col_valid: torch.Tensor | None = None, rows: int = 256, cols: int = 65536) -> torch.Tensor:
    """Exact top-k columns [Q, k] (-1 pads) of some query rows against all rows: the fast miner's recall
    yardstick. Same score and tie rule as mine_exact; queries against every column, blocked."""
    n = t.shape[0]
    out = torch.full((len(queries), k), -1, dtype=torch.int64, device=t.device)
    for s0 in range(0, len(queries), rows):
        q = queries[s0:s0 + rows]
        sel = TopK(len(q), k, t.device)
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            s, _, _ = tile_scores(t[q] @ t[c0:c1].T, v[q] @ v[c0:c1].T, f)
            s.masked_fill_(torch.arange(c0, c1, device=t.device)[None, :] == q[:, None], -math.inf)
            if col_valid is not None:
                s.masked_fill_(~col_valid[None, c0:c1], -math.inf)
            kk = min(k, c1 - c0)
            vals, pos = _topk_lowest_index(s, kk)
            r = torch.arange(len(q), device=t.device)[:, None].expand_as(pos)
            ok = torch.isfinite(vals)
            sel.add(r[ok], pos[ok] + c0, vals[ok])
        out[s0:s0 + len(q)] = sel.result()[0]
    return out

