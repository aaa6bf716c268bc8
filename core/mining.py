"""Hard pair mining (HELIP section 1): top-k pairs by cos_t * cos_v, exact (blocked) or fast (faiss), and its parquet table."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core import chunked_topk
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


def pair_scores_reference(
    text: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    *,
    same_caption_threshold: float = 0.995,
    duplicate_threshold: float = 0.98,
    clamp_negative: bool = True,
) -> np.ndarray:
    """[N, N] float64 scores with loops over pairs, straight from HELIP.md (tests only).

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


# ---------------------------------------------------------------------------------------------
# shared pieces: input checks, the filtered score of a block, the top-k with its tie rule


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


# ---------------------------------------------------------------------------------------------
# fast: ANN candidates over [t; v] (inner product = cos_t + cos_v), re-ranked by the exact score


def _rerank(t: torch.Tensor, v: torch.Tensor, queries: np.ndarray, cand: np.ndarray, *, top_k: int,
            same_thr: float, dup_thr: float, clamp: bool, counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Exact product scores of each query's candidates (global rows, -1 = none), filtered, top_k kept."""
    dev = t.device
    d = t.shape[1]
    c = cand.shape[1]
    rows = max(1, (256 * 1024**2) // max(1, c * d * 4))  # bound the [rows, C, d] gathers to ~256 MB
    out_val = np.full((len(queries), top_k), np.nan, dtype=np.float32)
    out_idx = np.full((len(queries), top_k), -1, dtype=np.int64)
    n_same = n_dup = 0
    for start in range(0, len(queries), rows):
        q = torch.from_numpy(queries[start:start + rows]).to(dev)
        cd = torch.from_numpy(cand[start:start + rows]).to(dev)
        # Sorting candidates by row first makes the stable sort by score below break ties by lower row.
        cd, _ = torch.sort(cd, dim=1)
        safe = cd.clamp_min(0)
        ct = torch.einsum("qd,qcd->qc", t[q], t[safe])
        cv = torch.einsum("qd,qcd->qc", v[q], v[safe])
        keep = (cd >= 0) & (cd != q[:, None])
        scores, same, dup = _filter_scores(ct, cv, keep, same_thr, dup_thr, clamp)
        n_same += int(same)
        n_dup += int(dup)
        order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :top_k]
        vals = scores.float().gather(1, order).cpu().numpy()
        idx = cd.gather(1, order).cpu().numpy()
        vals, idx = _finish_rows(vals, idx, top_k)
        out_val[start:start + len(q)] = vals
        out_idx[start:start + len(q)] = idx
    counts["same_caption_filtered"] = counts.get("same_caption_filtered", 0) + n_same
    counts["duplicate_filtered"] = counts.get("duplicate_filtered", 0) + n_dup
    return out_val, out_idx


class _Candidates:
    """Top-C search of the reference rows by inner product over [t; v]: faiss (flat or IVF) or torch on GPU."""

    def __init__(self, t: torch.Tensor, v: torch.Tensor, reference: np.ndarray, *, flat_max: int,
                 nlist: int | None, rng: np.random.Generator):
        self.reference = reference
        self.dev = t.device
        self.nprobe: int | None = None
        self.nlist = 0
        joint = torch.cat([t[torch.from_numpy(reference).to(t.device)], v[torch.from_numpy(reference).to(v.device)]], 1)
        self.t, self.v = t, v
        import faiss  # imported here: the rest of core must not pay for it

        gpu_faiss = self.dev.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self.dev.type == "cuda" and not gpu_faiss:
            # faiss-cpu on a GPU machine: a blocked torch search is faster than a CPU index.
            self.kind = "torch-flat"
            self.joint = joint
            return
        data = np.ascontiguousarray(joint.float().cpu().numpy())
        dim = data.shape[1]
        m = data.shape[0]
        if m <= flat_max:
            index = faiss.IndexFlatIP(dim)
            self.kind = "flat"
        else:
            # ~4 sqrt(M) lists, but faiss wants at least ~39 training points per centroid.
            self.nlist = max(1, min(nlist or int(4 * math.sqrt(m)), m // 39))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            train = data[np.sort(rng.choice(m, size=min(m, 64 * self.nlist), replace=False))]
            index.train(train)
            self.kind = f"ivf{self.nlist}"
        if gpu_faiss:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, self.dev.index or 0, index)
            self.kind = "gpu-" + self.kind
        index.add(data)
        self.index = index

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = nprobe
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = nprobe
        else:  # a GPU IVF index
            import faiss

            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)

    def search(self, queries: np.ndarray, c: int) -> np.ndarray:
        """Global row indices [Q, c] of the candidates (-1 where the index found fewer)."""
        q = torch.from_numpy(queries).to(self.dev)
        if self.kind == "torch-flat":
            out = []
            rows = max(1, (2 * 1024**3) // max(1, self.joint.shape[0] * 8))
            for start in range(0, len(q), rows):
                qb = q[start:start + rows]
                sims = torch.cat([self.t[qb], self.v[qb]], 1) @ self.joint.T
                out.append(torch.topk(sims, c, dim=1).indices.cpu().numpy())
            local = np.concatenate(out) if out else np.zeros((0, c), dtype=np.int64)
        else:
            xq = np.ascontiguousarray(torch.cat([self.t[q], self.v[q]], 1).float().cpu().numpy())
            _, local = self.index.search(xq, c)
        return np.where(local >= 0, self.reference[np.clip(local, 0, None)], -1).astype(np.int64)


def _recall(fast_idx: np.ndarray, exact_idx: np.ndarray) -> tuple[float, int]:
    """Mean |fast top_k ∩ exact top_k| / |exact top_k| over queries whose exact list is not empty."""
    overlaps = []
    for f, e in zip(fast_idx, exact_idx, strict=True):
        e_set = set(e[e >= 0].tolist())
        if e_set:
            overlaps.append(len(e_set & set(f[f >= 0].tolist())) / len(e_set))
    return (float(np.mean(overlaps)) if overlaps else 0.0), len(overlaps)


def mine_fast(
    text: torch.Tensor,
    image: torch.Tensor,
    *,
    top_k: int,
    candidates: int | None = None,
    reference_size: int = 3_000_000,
    valid: np.ndarray | None = None,
    same_caption_threshold: float = 0.995,
    duplicate_threshold: float = 0.98,
    clamp_negative: bool = True,
    recall_sample: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress = None,
    flat_max: int = 200_000,
    nlist: int | None = None,
    nprobe: int | None = None,
    target_recall: float = 0.95,
    search_rows: int = 16384,
) -> MinedPairs:
    """Approximate top_k: ANN candidates (faiss over [t; v]) re-ranked by the exact filtered score.

    Candidates come from a random reference subset of reference_size valid rows (all of them when
    fewer). Up to flat_max reference rows use an exact flat index, more an IVF index whose nprobe,
    unless given, doubles from 8 until the recall sample reaches target_recall (or stops improving).
    report["recall_at_k"] is measured against exact mining on recall_sample random valid queries
    (absent when recall_sample is 0). Filter counts are over the retrieved candidates only.
    """
    _check_top_k(top_k)
    t0 = time.perf_counter()
    t, v, valid_np, dev = _prepare(text, image, valid, device)
    n = t.shape[0]
    rng = np.random.default_rng(seed)
    queries = np.flatnonzero(valid_np).astype(np.int64)
    reference = queries if len(queries) <= reference_size else np.sort(
        rng.choice(queries, size=reference_size, replace=False))
    c = candidates if candidates is not None else 4 * top_k
    if c < top_k:
        raise SpecError(f"mining.candidates ({c}) must be at least mining.top_k ({top_k})", param="mining.candidates")
    c = max(1, min(c, len(reference)))
    neighbors = np.full((n, top_k), -1, dtype=np.int64)
    scores = np.full((n, top_k), np.nan, dtype=np.float32)
    report: dict[str, float | int | str] = {"method": "fast", "rows": n, "valid_rows": len(queries), "top_k": top_k}
    if len(queries) == 0:
        report.update(same_caption_filtered=0, duplicate_filtered=0, self_skipped=0, short_lists=0, candidates=c,
                      index="none", recall_queries=0, seconds=round(time.perf_counter() - t0, 3))
        return MinedPairs(neighbors=neighbors, scores=scores, report=report, valid=valid_np)
    filters = dict(same_thr=same_caption_threshold, dup_thr=duplicate_threshold, clamp=clamp_negative)
    with torch.no_grad():
        search = _Candidates(t, v, reference, flat_max=flat_max, nlist=nlist, rng=rng)
        sample = np.sort(rng.choice(queries, size=min(recall_sample, len(queries)), replace=False))
        exact_sample = None
        if len(sample):
            exact_sample = _exact_rows(t, v, sample, torch.from_numpy(valid_np).to(dev), top_k=top_k,
                                       rows=_rows_per_block(4096, n, dev, t.dtype), progress=None, counts={},
                                       **filters)[1]
        if search.nlist:
            if nprobe is not None or exact_sample is None:
                search.set_nprobe(min(nprobe or 16, search.nlist))
            else:
                probe, best = min(8, search.nlist), -1.0
                while True:
                    search.set_nprobe(probe)
                    got = _rerank(t, v, sample, search.search(sample, c), top_k=top_k, counts={}, **filters)[1]
                    recall = _recall(got, exact_sample)[0]
                    if recall >= target_recall or probe >= search.nlist or recall <= best + 0.005:
                        break
                    best, probe = recall, min(2 * probe, search.nlist)
        counts: dict[str, int] = {}
        for start in range(0, len(queries), search_rows):
            qb = queries[start:start + search_rows]
            vals, idx = _rerank(t, v, qb, search.search(qb, c), top_k=top_k, counts=counts, **filters)
            neighbors[qb] = idx
            scores[qb] = vals
            if progress is not None:
                progress(min(start + search_rows, len(queries)), len(queries))
    report.update(counts)
    report.update(
        counted_over="candidates", self_skipped=len(queries), candidates=c, index=search.kind,
        reference_rows=len(reference), short_lists=int((neighbors[queries, -1] == -1).sum()),
    )
    if search.nprobe is not None:
        report["nprobe"] = search.nprobe
    if exact_sample is not None:
        recall, used = _recall(neighbors[sample], exact_sample)
        report.update(recall_at_k=round(recall, 4), recall_queries=used)
    else:
        report["recall_queries"] = 0
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return MinedPairs(neighbors=neighbors, scores=scores, report=report, valid=valid_np)


# ---------------------------------------------------------------------------------------------
# hard_pairs.parquet


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
        "key": pa.array([str(keys[i]) for i in rows], type=pa.string()),
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
