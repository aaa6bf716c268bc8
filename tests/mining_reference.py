"""Slow, obvious references for mining tests: HELIP's score by loops over pairs, and brute-force top-k lists."""

from __future__ import annotations

import numpy as np
import torch


def pair_scores_reference(
    text: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    *,
    same_caption_threshold: float = 0.995,
    duplicate_threshold: float = 0.98,
    clamp_negative: bool = True,
) -> np.ndarray:
    """[N, N] float64 scores with loops over pairs, as docs/spec.md ("The method's decisions") defines them (tests only).

    -1 marks an entry that can never be a hard pair: the same caption, or the pair itself.
    """
    t = np.asarray(torch.as_tensor(text).double().cpu())
    v = np.asarray(torch.as_tensor(image).double().cpu())
    n = t.shape[0]
    out = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            cos_t = float(np.dot(t[i], t[j]))
            cos_v = float(np.dot(v[i], v[j]))
            if i == j or cos_t > same_caption_threshold:
                out[i, j] = -1.0
                continue
            if cos_t > duplicate_threshold:
                cos_t = 0.0
            if cos_v > duplicate_threshold:
                cos_v = 0.0
            if clamp_negative:
                cos_t, cos_v = max(cos_t, 0.0), max(cos_v, 0.0)
            out[i, j] = cos_t * cos_v
    return out


def brute_force(text, image, valid, top_k: int, **filters) -> tuple[np.ndarray, np.ndarray]:
    """Every valid row's top_k (score desc, lower index first on ties) from the loop scores; -1 / NaN pads."""
    s = pair_scores_reference(text, image, **filters)
    valid = np.ones(s.shape[0], dtype=bool) if valid is None else np.asarray(valid)
    out = np.full((len(valid), top_k), -1, dtype=np.int64)
    vals = np.full((len(valid), top_k), np.nan)
    for i in np.flatnonzero(valid):
        cands = [j for j in np.flatnonzero(valid) if s[i, j] != -1.0]
        cands.sort(key=lambda j: (-s[i, j], j))
        m = min(top_k, len(cands))
        out[i, :m] = cands[:top_k]
        vals[i, :m] = [s[i, j] for j in cands[:top_k]]
    return out, vals
