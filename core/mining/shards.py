"""Exact mining split into row-range shards, so that several workers (machines) mine one job.

A shard is the rows [a, b) of the valid pairs (in their order), each mined against every valid row with
the same score, filters and tie rule as `mine_exact` (core.mining.scores.tile_scores, then
core.mining.select.TopK: score descending, the lower row first on ties). Shards are independent; their
lists are concatenated in row order and their report counters summed, so the merged table is the
unsharded one. Who mines which shard is a `ShardBackend`'s business: `LocalShards` mines them one after
the other in this process (the CLI, tests); the service's backend (worker/shards.py) spreads them over
Celery workers through the database and the object store.

Unlike `mine_exact`, a shard cannot use the symmetry of the score (its rows' pairs with other shards'
rows are scored by both shards), so all shards together do up to twice the products of one unsharded
run (0.57x mine_exact's speed on one CPU worker, docs/benchmarks.md section 6): sharding pays with
several idle workers. Every shard holds all valid rows' embeddings (the columns).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from core.errors import DataError
from core.mining.scores import Filters, MinedPairs, _check_top_k, _prepare, dup_count, tile_scores
from core.mining.select import TopK

# mining.shards = null (automatic): one shard below AUTO_MIN_ROWS valid rows, else one per
# AUTO_ROWS_PER_SHARD rows, more when a shard's kept lists would not fit the per-worker memory budget.
AUTO_MIN_ROWS = 200_000
AUTO_ROWS_PER_SHARD = 250_000
MEMORY_BUDGET = 8 << 30  # bytes a worker may spend on one shard's lists (Settings.shard_memory_bytes in the service)
KEPT_BYTES_PER_PAIR = 48  # a kept (row, column, score) triple while cutting (12 bytes, x2 buffer, x2 sort)
CPU_TILE = (256, 4096)  # rows x columns of a tile: CPU tiles stay in cache
GPU_TILE = (4096, 16384)

Tick = Callable[[int], None] | None


@dataclass
class ShardResult:
    """One shard's lists: rows [a, b) of the valid rows, neighbours as valid-row positions (-1 pads)."""

    index: int
    a: int
    b: int
    neighbors: np.ndarray  # int [b - a, k]
    scores: np.ndarray  # float32 [b - a, k]
    same_caption: int  # ordered pairs (a row of the shard, any other valid row) dropped as the same caption
    duplicate: int  # ordered pairs with a cosine zeroed as a probable duplicate
    seconds: float = 0.0
    worker: str = "local"


@dataclass
class ShardPlan:
    """What every shard needs: the valid rows' embeddings, the ranges, the options, and a fingerprint of all of
    them (a stored shard is reused only by a plan with the same fingerprint)."""

    text: np.ndarray  # [nv, d] the valid rows only, in their order
    image: np.ndarray
    ranges: list[tuple[int, int]]
    top_k: int
    filters: Filters
    block_size: int = 4096
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = plan_fingerprint(self.text, self.image, self.ranges, self.top_k, self.filters)


class ShardBackend(Protocol):
    """Mines every shard of a plan (here or elsewhere) and returns the results in shard order."""

    def run(self, plan: ShardPlan, *, device: torch.device, on_done: Callable[[ShardResult], None],
            should_cancel: Callable[[], bool]) -> list[ShardResult]:
        """Call `on_done` once per shard as it is found finished; raise core.errors.JobCancelled when
        `should_cancel()` turns True."""


def plan_fingerprint(text: np.ndarray, image: np.ndarray, ranges: list[tuple[int, int]], top_k: int,
                     f: Filters) -> str:
    """blake2b over the embeddings' bytes, shapes and dtypes, the ranges and every option that changes a result."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps({"shape": list(text.shape), "dtype": str(text.dtype), "ranges": ranges, "k": top_k,
                         "same": f.same, "dup": f.dup, "clamp": f.clamp}).encode())
    for x in (text, image):
        for i in range(0, len(x), 1 << 16):  # in slices: no second copy of the whole array
            h.update(np.ascontiguousarray(x[i:i + (1 << 16)]).tobytes())
    return h.hexdigest()


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous ranges covering [0, n), sizes differing by at most one (never an empty one)."""
    s = max(1, min(int(shards), n))
    bounds = [n * i // s for i in range(s + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(s)] if n else []


def auto_shards(n: int, d: int, k: int, budget: int = MEMORY_BUDGET) -> int:
    """mining.shards = null: 1 below AUTO_MIN_ROWS valid rows; else one shard per AUTO_ROWS_PER_SHARD rows,
    or more when a shard's kept lists (KEPT_BYTES_PER_PAIR per pair while cutting) would exceed `budget`.
    Every shard also holds all rows' embeddings (the columns, 2 x n x d values): sharding does not shrink them."""
    if n < AUTO_MIN_ROWS:
        return 1
    shards = max(math.ceil(n / AUTO_ROWS_PER_SHARD), math.ceil(n * k * KEPT_BYTES_PER_PAIR / budget))
    return min(shards, n)


def _tile(device: torch.device, block_size: int) -> tuple[int, int]:
    rows, cols = GPU_TILE if device.type == "cuda" else CPU_TILE
    return max(1, min(rows, block_size)), cols


def _count(ct: torch.Tensor, cv: torch.Tensor, f: Filters, own: torch.Tensor | None) -> tuple[int, int]:
    """Same-caption and duplicate pairs of a tile, the pair of a row with itself left out. With the defaults
    (same >= dup) only tiles holding a cosine above the duplicate threshold have any: the rest cost a max."""
    if f.same >= f.dup:
        if own is None and max(float(ct.max()), float(cv.max())) <= f.dup:
            return 0, 0
        hit = torch.maximum(ct, cv) > f.dup
    else:
        hit = (ct > f.same) | (ct > f.dup) | (cv > f.dup)
    if own is not None:
        hit.logical_and_(~own)
    i, j = hit.nonzero().unbind(1)
    _, same, dup = tile_scores(ct[i, j], cv[i, j], f)
    return int(same.sum()), int(dup_count(same, dup, f))


def mine_rows(t: torch.Tensor, v: torch.Tensor, a: int, b: int, k: int, f: Filters, *, block_size: int = 4096,
              tick: Tick = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Rows [a, b) of prepared, valid-only embeddings against all rows: [b - a, k] columns (-1 pads) and
    fp32 scores (NaN pads), and the same-caption and duplicate counts of those rows' ordered pairs.

    Each pair is scored once, from its tile's products. The first column tile of a block of rows is
    scored in full and its k-th best score per row becomes the row's threshold (a lower bound of the
    final k-th: a subset's k-th best); later tiles look at the pairs whose plain product reaches it (a
    filtered score is that product, 0 or -inf) and a TopK keeps each row's k best with the tie rule, so
    the lists and their order are mine_exact's. `tick(rows_done)` runs after each block of rows.
    """
    n, dev = t.shape[0], t.device
    rows, cols = _tile(dev, block_size)
    sel = TopK(b - a, k, dev, col_ordered=True)  # per row, columns come tile after tile in increasing order
    same_n = dup_n = 0
    with torch.no_grad():
        for r0 in range(a, b, rows):
            r1 = min(b, r0 + rows)
            tq, vq = t[r0:r1], v[r0:r1]
            thr = sel.threshold[r0 - a:r1 - a]  # a view: cuts raise it in place
            for c0 in range(0, n, cols):
                c1 = min(n, c0 + cols)
                ct, cv = tq @ t[c0:c1].T, vq @ v[c0:c1].T
                own = None
                if c0 < r1 and r0 < c1:  # the tile holds the pair of a row with itself: never a pair
                    own = torch.arange(c0, c1, device=dev)[None, :] == torch.arange(r0, r1, device=dev)[:, None]
                same, dup = _count(ct, cv, f, own)
                same_n, dup_n = same_n + same, dup_n + dup
                if c0 == 0:
                    s, _, _ = tile_scores(ct, cv, f)
                    if own is not None:
                        s.masked_fill_(own, -math.inf)
                    if s.shape[1] >= k:
                        kth = torch.topk(s, k, dim=1, sorted=True).values[:, k - 1]
                        thr.copy_(torch.where(torch.isfinite(kth), torch.maximum(thr, kth), thr))
                    i, j = (s >= thr[:, None]).nonzero().unbind(1)
                    sel.add(i + (r0 - a), j + c0, s[i, j])
                    continue
                lim = torch.where(thr > 0, thr, -math.inf)  # no positive bound yet: every pair is looked at
                i, j = (ct.float() * cv.float() >= lim[:, None]).nonzero().unbind(1)
                s, _, _ = tile_scores(ct[i, j], cv[i, j], f)
                if own is not None:
                    s.masked_fill_(own[i, j], -math.inf)
                keep = s >= thr[i]
                sel.add(i[keep] + (r0 - a), j[keep] + c0, s[keep])
            if tick is not None:
                tick(r1 - a)
        idx, val = sel.result()
    return idx, val, same_n, dup_n


def prepare(text: np.ndarray, image: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's embeddings on `device` in the dtype mine_exact uses there (fp32 on CPU)."""
    t, v, _, _ = _prepare(torch.as_tensor(text), torch.as_tensor(image), None, device)
    return t, v


def mine_shard(plan: ShardPlan, index: int, t: torch.Tensor, v: torch.Tensor, *, worker: str = "local",
               tick: Tick = None) -> ShardResult:
    """One shard of `plan` from its prepared embeddings `t`, `v` (see `prepare`)."""
    a, b = plan.ranges[index]
    t0 = time.perf_counter()
    idx, val, same, dup = mine_rows(t, v, a, b, plan.top_k, plan.filters, block_size=plan.block_size, tick=tick)
    dtype = np.int32 if t.shape[0] < 2**31 else np.int64
    return ShardResult(index, a, b, idx.cpu().numpy().astype(dtype), val.cpu().numpy(), same, dup,
                       round(time.perf_counter() - t0, 3), worker)


class LocalShards:
    """Every shard in this process, one after the other."""

    def run(self, plan: ShardPlan, *, device: torch.device, on_done: Callable[[ShardResult], None],
            should_cancel: Callable[[], bool]) -> list[ShardResult]:
        from core.errors import JobCancelled

        t, v = prepare(plan.text, plan.image, device)
        out = []
        for i in range(len(plan.ranges)):
            if should_cancel():
                raise JobCancelled("cancelled while mining shards")
            out.append(mine_shard(plan, i, t, v))
            on_done(out[-1])
        return out


def merge(results: list[ShardResult], valid: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """[N, k] neighbours (the caller's row numbers, -1 pads) and scores (NaN pads) from the shards' lists,
    and the summed same-caption and duplicate counts."""
    rows_of = np.flatnonzero(valid)
    n_all = len(valid)
    neighbors = np.full((n_all, top_k), -1, dtype=np.int64)
    scores = np.full((n_all, top_k), np.nan, dtype=np.float32)
    covered = 0
    for r in sorted(results, key=lambda r: r.a):
        if r.a != covered:
            raise ValueError(f"shard {r.index} starts at row {r.a}, expected {covered}")
        nb = np.asarray(r.neighbors, dtype=np.int64)
        neighbors[rows_of[r.a:r.b]] = np.where(nb >= 0, rows_of[np.clip(nb, 0, None)], -1)
        scores[rows_of[r.a:r.b]] = r.scores
        covered = r.b
    if covered != len(rows_of):
        raise ValueError(f"the shards cover {covered} of {len(rows_of)} valid rows")
    return (neighbors, scores, sum(r.same_caption for r in results), sum(r.duplicate for r in results))


def _check_inputs(text, image, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy views of the inputs (their dtype kept: a GPU worker mines fp16 as fp16), checked like mine_exact's."""
    t, v = np.asarray(torch.as_tensor(text).cpu()), np.asarray(torch.as_tensor(image).cpu())
    if t.ndim != 2 or t.shape != v.shape:
        raise DataError(f"text and image embeddings must both be [N, d]; got {tuple(t.shape)} and {tuple(v.shape)}")
    bad = ~(np.isfinite(t).all(axis=1) & np.isfinite(v).all(axis=1))
    if bad.any():
        raise DataError(f"{int(bad.sum())} rows of the embeddings hold NaN or infinite values "
                        f"(first rows: {np.flatnonzero(bad)[:5].tolist()})")
    valid_np = np.ones(len(t), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if valid_np.shape != (len(t),):
        raise DataError(f"valid must be a bool vector of length {len(t)}, got shape {valid_np.shape}")
    return t, v, valid_np


def mine_sharded(text, image, *, top_k: int, shards: int, valid: np.ndarray | None = None,
                 same_caption_threshold: float = 0.995, duplicate_threshold: float = 0.98,
                 clamp_negative: bool = True, block_size: int = 4096, device: str | torch.device = "cpu",
                 backend: ShardBackend | None = None, on_done: Callable[[ShardResult], None] | None = None,
                 should_cancel: Callable[[], bool] = lambda: False) -> tuple[MinedPairs, list[ShardResult]]:
    """mine_exact's table (same rows, neighbours, scores, tie order, counters) from `shards` row-range shards."""
    _check_top_k(top_k)
    t0 = time.perf_counter()
    text_np, image_np, valid_np = _check_inputs(text, image, valid)
    dev = torch.device(device)
    rows_of = np.flatnonzero(valid_np)
    f = Filters(same_caption_threshold, duplicate_threshold, clamp_negative)
    plan = ShardPlan(text_np[rows_of], image_np[rows_of], shard_ranges(len(rows_of), shards), top_k, f,
                     block_size=block_size)
    results = (backend or LocalShards()).run(plan, device=dev, on_done=on_done or (lambda r: None),
                                             should_cancel=should_cancel)
    neighbors, scores, same, dup = merge(results, valid_np, top_k)
    nv = len(rows_of)
    report: dict[str, Any] = {
        "method": "exact", "rows": len(valid_np), "valid_rows": nv, "top_k": top_k, "counted_over": "all_pairs",
        "shards": len(plan.ranges), "shard_plan": plan.fingerprint,
        "shard_seconds_max": max((r.seconds for r in results), default=0.0),
        "shard_seconds_sum": round(sum(r.seconds for r in results), 3),
        "same_caption_filtered": same, "duplicate_filtered": dup, "self_skipped": nv,
        "short_lists": int((neighbors[valid_np, -1] == -1).sum()) if nv else 0,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return MinedPairs(neighbors=neighbors, scores=scores, report=report, valid=valid_np), results
