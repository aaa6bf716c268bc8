"""Mining's shared pieces: the mined table type, input checks, HELIP's filtered score, the top-k tie rule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from core.errors import DataError, SpecError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None] | None


@dataclass
class MinedPairs:
    """The mined table: for each training row its top_k hard pairs, best first (-1 / NaN pad short lists)."""

    neighbors: np.ndarray  # int64 [N, k]
    scores: np.ndarray  # float32 [N, k]
    report: dict[str, float | int | str] = field(default_factory=dict)
    valid: np.ndarray | None = None  # bool [N]: rows that took part (None: all of them)

    def valid_rows(self) -> np.ndarray:
        if self.valid is None:
            return np.ones(self.neighbors.shape[0], dtype=bool)
        return self.valid


def _prepare(text, image, valid, device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.device]:
    dev = torch.device(device)
    t = torch.as_tensor(text)
    v = torch.as_tensor(image)
    if t.ndim != 2 or t.shape != v.shape:
        raise DataError(f"text and image embeddings must both be [N, d]; got {tuple(t.shape)} and {tuple(v.shape)}")
    # On CPU the products are fp32 (half precision matmuls are slow and lossy there); on GPU the
    # input dtype is kept so that the N x N products run on tensor cores.
    dtype = t.dtype if dev.type == "cuda" and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    t = t.to(device=dev, dtype=dtype).contiguous()
    v = v.to(device=dev, dtype=dtype).contiguous()
    n = t.shape[0]
    if valid is None:
        valid_np = np.ones(n, dtype=bool)
    else:
        valid_np = np.asarray(valid, dtype=bool)
        if valid_np.shape != (n,):
            raise DataError(f"valid must be a bool vector of length {n}, got shape {valid_np.shape}")
    return t, v, valid_np, dev


def _check_top_k(top_k: int) -> None:
    if int(top_k) < 1:
        raise SpecError(f"mining.top_k must be at least 1, got {top_k}", param="mining.top_k")


def _filter_scores(ct: torch.Tensor, cv: torch.Tensor, keep: torch.Tensor, same_thr: float, dup_thr: float,
                   clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores from text and image cosines with HELIP's filters; -inf where a pair can never be hard.

    keep: candidates allowed at all (valid and not the query itself). Returns the scores and, over the
    kept pairs, how many were dropped as the same caption and how many zeroed as probable duplicates.
    """
    same = (ct > same_thr) & keep
    t_dup = ct > dup_thr
    v_dup = cv > dup_thr
    dup = (t_dup | v_dup) & keep & ~same
    zero = torch.zeros((), dtype=ct.dtype, device=ct.device)
    t = torch.where(t_dup, zero, ct)
    v = torch.where(v_dup, zero, cv)
    if clamp:
        t = torch.clamp_min(t, 0)
        v = torch.clamp_min(v, 0)
    # The score itself in fp32 even from half-precision cosines: fp16 products make so many exact ties
    # that ranking them (and the tie rule) would cost more than the matmul, and lose order information.
    scores = torch.where(keep & ~same, t.float() * v.float(), torch.full((), -math.inf, device=ct.device))
    return scores, same.sum(), dup.sum()


def _block_scores(ct: torch.Tensor, cv: torch.Tensor, col_valid: torch.Tensor, queries: torch.Tensor,
                  same_thr: float, dup_thr: float, clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact mining's block: queries (rows of the training set) against every column."""
    cols = torch.arange(ct.shape[1], device=ct.device)
    keep = col_valid[None, :] & (cols[None, :] != queries[:, None])
    return _filter_scores(ct, cv, keep, same_thr, dup_thr, clamp)


_compiled_block_scores: Callable | None = None
_compile_failed = False


def _block_scores_fn(dev: torch.device) -> Callable:
    """On CUDA, the block's elementwise work fused into one kernel (torch.compile); eager elsewhere.

    Eager, each of the ~10 elementwise steps reads and writes the whole [rows, N] block: at N = 3.3M
    that memory traffic, not the matmul, would dominate.
    """
    global _compiled_block_scores
    if dev.type != "cuda" or _compile_failed:
        return _block_scores
    if _compiled_block_scores is None:
        _compiled_block_scores = torch.compile(_block_scores, dynamic=False)
    return _compiled_block_scores


def _run_block_scores(dev: torch.device, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    global _compile_failed
    fn = _block_scores_fn(dev)
    if fn is _block_scores:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # a missing compiler or triton must not stop mining: fall back to eager
        log.warning("torch.compile of the mining block failed (%s); using eager kernels", exc)
        _compile_failed = True
        return _block_scores(*args)


def _topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise candidates that contain the top k with equal scores ranked by lower column index.

    torch.topk does not promise which of several equal values it keeps at the cut. So it takes a few
    more than k (a window); when the window's last value is below the k-th, every tie of the k-th is
    inside and the caller's sort (score down, index up) over the window is exact. Rows whose ties
    spill past the window are redone: all larger values plus the lowest-index ties (extra slots -inf).
    """
    n = scores.shape[1]
    k = min(k, n)
    window = min(n, k + max(16, k // 2))
    vals, idx = torch.topk(scores, window, dim=1, largest=True, sorted=True)
    if window == n:
        return vals, idx
    kth = vals[:, k - 1:k]
    spill = ((vals[:, -1:] == kth) & torch.isfinite(kth)).squeeze(1)
    fix = spill.nonzero().squeeze(1)
    if fix.numel():
        sub_kth = kth[fix]
        cols = torch.arange(n, 0, -1, device=scores.device, dtype=torch.int32)  # larger key = lower column
        key = torch.where(scores[fix] == sub_kth, cols, torch.zeros((), dtype=torch.int32, device=cols.device))
        tie_idx = torch.topk(key, k, dim=1).indices
        n_greater = (vals[fix] > sub_kth).sum(dim=1, keepdim=True)  # < k: the k-th itself is a tie
        pos = torch.arange(window, device=scores.device)[None, :]
        from_ties = tie_idx.gather(1, (pos - n_greater).clamp(0, k - 1))
        idx[fix] = torch.where(pos < n_greater, idx[fix], from_ties)
        dead = torch.full((), -math.inf, dtype=vals.dtype, device=vals.device)
        vals[fix] = torch.where(pos < n_greater, vals[fix], torch.where(pos < k, sub_kth, dead))
    return vals, idx


def _finish_rows(vals: np.ndarray, idx: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (score desc, index asc), keep top_k, turn -inf into -1 / NaN, pad to top_k."""
    order = np.lexsort((idx, -vals), axis=-1)[:, :top_k]
    vals = np.take_along_axis(vals, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    dead = ~np.isfinite(vals)
    idx = np.where(dead, -1, idx).astype(np.int64)
    vals = np.where(dead, np.nan, vals).astype(np.float32)
    if idx.shape[1] < top_k:
        pad = top_k - idx.shape[1]
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=np.nan)
    return vals, idx


