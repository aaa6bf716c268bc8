"""Fast hard pair mining: ANN candidates over [t; v], re-ranked by the exact filtered score."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from core.errors import SpecError
from core.mining.exact import _exact_rows, _rows_per_block
from core.mining.scores import MinedPairs, Progress, _check_top_k, _filter_scores, _finish_rows, _prepare


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
    for f, e in zip(fast_idx, exact_idx):
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


