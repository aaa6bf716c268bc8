"""Mining's shared pieces: the mined table type, input checks, HELIP's filtered score, the top-k tie rule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from core.errors import DataError, SpecError

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


@dataclass(frozen=True)
class Filters:
    """HELIP's filters: a text cosine above `same` is the same caption (never hard); a cosine above `dup`
    is set to 0 (a probable duplicate); with `clamp` each cosine is clamped at 0 before the product."""

    same: float = 0.995
    dup: float = 0.98
    clamp: bool = True


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
    bad = ~(torch.isfinite(t).all(dim=1) & torch.isfinite(v).all(dim=1))
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)[:5].tolist()
        raise DataError(f"{int(bad.sum())} rows of the embeddings hold NaN or infinite values (first rows: {rows})")
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


def tile_scores(ct: torch.Tensor, cv: torch.Tensor, f: Filters) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 scores of a tile of cosines with HELIP's filters (-inf: the same caption), and two masks:
    `same` (dropped as the same caption) and `dup` (a cosine zeroed as a probable duplicate, not same).

    Few passes, in place where the input is not needed again; validity and the pair itself are the
    caller's business (the exact miner mines the valid rows only and masks the diagonal itself).
    """
    same = ct > f.same
    t_dup = ct > f.dup
    v_dup = cv > f.dup
    t = ct.masked_fill(t_dup, 0).float()
    v = cv.masked_fill(v_dup, 0).float()
    if f.clamp:
        t.clamp_(min=0)
        v.clamp_(min=0)
    scores = t.mul_(v).masked_fill_(same, -math.inf)
    dup = t_dup.logical_or_(v_dup)
    if f.same < f.dup:  # otherwise every same-caption pair is also a text duplicate: counted apart below
        dup.logical_and_(~same)
    return scores, same, dup


def dup_count(same: torch.Tensor, dup: torch.Tensor, f: Filters) -> torch.Tensor:
    """Pairs zeroed as duplicates but not dropped as the same caption, from tile_scores' masks."""
    if f.same < f.dup:
        return dup.sum()
    return dup.sum() - same.sum()
