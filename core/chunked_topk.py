"""Exact mining's selection for large N: top-k through chunk maxima instead of a full-row top-k.

A full `torch.topk` over [rows, N] scores dominates exact mining at N in the millions (it reads the
row several times), and so does writing the fp32 score matrix. Here one fused pass over the two
cosine blocks yields only each chunk's best filtered score ([rows, N / chunk]); the k + 8 best chunks
of a row hold its top k (a chunk without a top-k element has a maximum below the k-th score), so the
exact filtered scores are recomputed on those few columns only. A row whose selection cannot be
proven exact (a chunk left out may tie the k-th score) is redone by the caller on the full row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

CHUNK = 1024
EXTRA_CHUNKS = 8


def worthwhile(n: int, top_k: int, chunk: int = CHUNK) -> bool:
    """Only when the chunks to keep are a small part of the row."""
    return n >= 8 * chunk * (top_k + EXTRA_CHUNKS)


def chunk_maxima(scores_fn: Callable, ct: torch.Tensor, cv: torch.Tensor, col_valid: torch.Tensor,
                 queries: torch.Tensor, same_thr: float, dup_thr: float, clamp: bool,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the best filtered score of each run of `chunk` columns; plus the filter counts."""
    scores, same, dup = scores_fn(ct, cv, col_valid, queries, same_thr, dup_thr, clamp)
    b, n = scores.shape
    full = n // chunk
    cm = scores[:, : full * chunk].reshape(b, full, chunk).amax(-1)
    if n > full * chunk:
        cm = torch.cat([cm, scores[:, full * chunk:].amax(-1, keepdim=True)], dim=1)
    return cm, same, dup


_compiled: Callable | None = None
_compile_failed = False


def run_chunk_maxima(dev: torch.device, scores_fn: Callable, *args) -> tuple[torch.Tensor, ...]:
    """On CUDA the filter and the chunk reduction fuse into one kernel: the score matrix is never written."""
    global _compiled, _compile_failed
    if dev.type != "cuda" or _compile_failed:
        return chunk_maxima(scores_fn, *args)
    if _compiled is None:
        _compiled = torch.compile(chunk_maxima, dynamic=False)
    try:
        return _compiled(scores_fn, *args)
    except Exception as exc:  # no compiler at hand: eager is slower, never wrong
        log.warning("torch.compile of the chunked mining pass failed (%s); using eager kernels", exc)
        _compile_failed = True
        return chunk_maxima(scores_fn, *args)


def select(cm: torch.Tensor, ct: torch.Tensor, cv: torch.Tensor, col_valid: torch.Tensor, queries: torch.Tensor,
           *, top_k: int, chunk: int, filter_fn: Callable, topk_fn: Callable, same_thr: float, dup_thr: float,
           clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, column indices, redo mask): the row's top candidates from its best chunks.

    Candidate columns stay in increasing order, so `topk_fn`'s lower-position tie rule is the
    lower-column rule. redo[i] is True when a chunk left out could hold a score equal to the k-th.
    """
    b, n = ct.shape
    n_chunks = cm.shape[1]
    kc = min(n_chunks, top_k + EXTRA_CHUNKS)
    best = torch.topk(cm, kc, dim=1)
    chunks = torch.sort(best.indices, dim=1).values
    cols = (chunks[:, :, None] * chunk + torch.arange(chunk, device=ct.device)).reshape(b, kc * chunk)
    inside = cols < n
    cols = cols.clamp_max(n - 1)
    keep = col_valid[cols] & (cols != queries[:, None]) & inside
    scores, _, _ = filter_fn(ct.gather(1, cols), cv.gather(1, cols), keep, same_thr, dup_thr, clamp)
    vals, pos = topk_fn(scores, top_k)
    idx = cols.gather(1, pos)
    kth = vals[:, min(top_k, vals.shape[1]) - 1]
    cut = best.values[:, -1]  # every chunk left out has a maximum <= cut
    exact = (cut < kth) | (cut == -math.inf) | torch.tensor(kc == n_chunks, device=ct.device)
    return vals, idx, ~exact
