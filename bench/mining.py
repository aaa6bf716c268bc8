"""Issue 11: exact and fast mining against the plain brute-force reference, side by side, on CPU.

Data: real embeddings (bench.mining_data: the synthetic world's base CLIP, 5,000 pairs, scaled up
by perturbation; d = 96), or planted clusters of dimension D with `--d D`. Each (method, N) runs in
a fresh process so that its peak memory is its own. Times are the process's CPU time (one thread):
robust to a machine shared with other jobs.

- reference: (T T^T) * (V V^T), self excluded, plain torch.topk, no filters; one [N, N] product
  where it fits, else blocks of rows; with --cap, stopped after that many CPU seconds and the full
  time extrapolated from the steady rate (every block costs the same).
- every method first runs once, untimed, on 1,024 rows (`warm_up`), along the path N takes.
- exact: core.mining.mine_exact (the dense path up to DENSE_MAX_ROWS rows, tiled above); above
  --exact-full rows estimated instead (exact_estimate: the whole candidate pass plus evenly spaced
  stripes of the triangle timed, the per-pair rate applied to all pairs, the final sort scaled likewise).
- fast: core.mining.mine_fast timed without its own recall sample; then, untimed, recall@top_k on
  min(N, 10,000) random queries against exact mining of those rows (nothing was tuned on them).

    python -m bench.mining --sizes 10000 100000 1000000 --cap 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import IMG, RESULTS, current_rss_mib, isolated, machine, write_json
from bench.mining_data import CACHE, scaled_embeddings, synthetic_embeddings, synthetic_embeddings_torch  # noqa: F401
from bench.mining_report import plot, print_report, summarise

FULL_MATRIX_BUDGET = 6 * 1024**3  # bytes: above this the reference runs blocked (three [N, N] fp32 buffers)
RECALL_QUERIES = 10_000


def load_embeddings(n: int, d: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The world's scaled embeddings (d None), or planted clusters of dimension d, cached as .npz."""
    if d is None:
        return scaled_embeddings(n, seed=seed)
    path = CACHE / f"emb_{n}_{d}_{seed}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["t"], z["v"]
    t, v = synthetic_embeddings(n, d, seed=seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, t=t, v=v)
    os.replace(tmp, path)
    return t, v


def brute_force_topk(t: torch.Tensor, v: torch.Tensor, top_k: int, *, block: int = 4096,
                     budget: int = FULL_MATRIX_BUDGET) -> tuple[np.ndarray, str]:
    """The reference: scores = (T T^T) * (V V^T), self excluded, plain torch.topk; no filters, no tie rule."""
    n = t.shape[0]
    with torch.no_grad():
        if 3 * n * n * t.element_size() <= budget:
            s = (t @ t.T) * (v @ v.T)
            s.fill_diagonal_(-math.inf)
            return torch.topk(s, top_k, dim=1).indices.cpu().numpy(), "full [N, N]"
        out = np.empty((n, top_k), dtype=np.int64)
        for start in range(0, n, block):
            stop = min(n, start + block)
            s = (t[start:stop] @ t.T) * (v[start:stop] @ v.T)
            s[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf
            out[start:stop] = torch.topk(s, top_k, dim=1).indices.cpu().numpy()
        return out, f"blocked ({block} rows; N x N does not fit in {budget / 2**30:.0f} GiB)"


class _Deadline(Exception):
    """Raised from a progress callback to stop a run that has used up its time cap."""


class _Clock:
    """Steady rate of a blocked loop: the first block (compilation, allocator warm-up) is left out."""

    def __init__(self, cap_s: float, device: torch.device):
        self.cap_s, self.device = cap_s, device
        # GPU: wall time after a sync; CPU: this process's CPU time (robust to a shared machine's load).
        self.now = time.perf_counter if device.type == "cuda" else time.process_time
        self.t0 = self.now()
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] = (0.0, 0)

    def tick(self, done: int, total: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.now() - self.t0
        if self.first is None:
            self.first = (now, done)
        self.last = (now, done)
        if done < total and now > self.cap_s:
            raise _Deadline()

    def result(self, total: int) -> dict[str, Any]:
        (t1, d1), (t2, d2) = self.first or (0.0, 0), self.last
        rate = (d2 - d1) / (t2 - t1) if t2 > t1 and d2 > d1 else (d2 / t2 if t2 > 0 else float("nan"))
        complete = d2 >= total
        return {"queries_done": d2, "queries_total": total, "complete": complete, "seconds_run": t2,
                "queries_per_s_steady": rate, "first_block_s": t1,
                "seconds_full": t2 if complete else t1 + (total - d1) / rate,
                "seconds_full_steady": total / rate if rate == rate and rate > 0 else float("nan"),
                "full_is_extrapolated": not complete}


def blocked_brute_force(t: torch.Tensor, v: torch.Tensor, top_k: int, *, rows: int, cap_s: float = float("inf"),
                        single_product: bool = False) -> dict[str, Any]:
    """The reference loop on any device: per block of `rows` queries, (T_q T^T) * (V_q V^T) (or only
    T_q T^T, the anchor's single product), self excluded, torch.topk, indices to the host; no filters.
    Stops after cap_s and extrapolates linearly (every block costs the same)."""
    n = t.shape[0]
    clock = _Clock(cap_s, t.device)
    with torch.no_grad():
        try:
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                s = t[start:stop] @ t.T
                if not single_product:
                    s = s * (v[start:stop] @ v.T)
                s[torch.arange(stop - start, device=s.device), torch.arange(start, stop, device=s.device)] = -math.inf
                torch.topk(s, top_k, dim=1).indices.cpu()
                del s
                clock.tick(stop, n)
        except _Deadline:
            pass
    return {**clock.result(n), "rows_per_block": rows, "single_product": single_product}


def exact_capped(t: torch.Tensor, v: torch.Tensor, top_k: int, *, cap_s: float = float("inf"),
                 block_size: int = 4096) -> dict[str, Any]:
    """core.mining.mine_exact with a time cap: its progress counts pairs done (as rows), so past the cap
    the full time is extrapolated linearly."""
    from core.mining import mine_exact

    clock = _Clock(cap_s, t.device)
    report: dict[str, Any] = {}
    try:
        report = mine_exact(t, v, top_k=top_k, block_size=block_size, device=t.device, progress=clock.tick).report
    except _Deadline:
        pass
    return {**clock.result(t.shape[0]), "report": report}


def exact_estimate(t: torch.Tensor, v: torch.Tensor, top_k: int, *, stripes: int = 12) -> dict[str, Any]:
    """Exact mining's CPU time at large N from a timed part: the whole candidate pass, `stripes` evenly
    spaced stripes of the triangle (their pairs' rate applied to all N(N-1)/2 pairs) and the final
    sort of what they emitted (scaled by the same factor)."""
    from core.mining.exact import _stripe_torch, _tile_shape, candidate_bounds
    from core.mining.scores import Filters
    from core.mining.select import TopK

    n = t.shape[0]
    f = Filters()
    rows, cols = _tile_shape(4096, n, t.device, t.dtype)
    c0 = time.process_time()
    bound = candidate_bounds(t, v, top_k, f, window=max(4 * top_k, min(4096, n // 16)))
    cand_s = time.process_time() - c0
    sel = TopK(n, top_k, t.device, bound=bound, col_ordered=True)
    counts = [0, 0, 0, 0]
    pairs, main_s = 0, 0.0
    for i in range(stripes):
        a = (int(i * n / stripes) // rows) * rows
        b = min(n, a + rows)
        c0 = time.process_time()
        _stripe_torch(t, v, a, b, f, sel, cols, counts)
        main_s += time.process_time() - c0
        pairs += (b - a) * (n - a) - (b - a) * (b - a + 1) // 2
    total = n * (n - 1) // 2
    c0 = time.process_time()
    sel.result()
    cut_s = time.process_time() - c0
    scale = total / pairs
    return {"seconds_full": cand_s + main_s * scale + cut_s * scale, "candidate_pass_s": cand_s,
            "stripes_timed": stripes, "rows_per_stripe": rows, "pairs_timed": pairs, "pairs_total": total,
            "fraction_timed": pairs / total, "main_pass_s_est": main_s * scale, "final_sort_s_est": cut_s * scale,
            "emitted_in_sample": sel.emitted, "full_is_extrapolated": True}


def _neighbors_path(method: str, n: int, d: int | None, seed: int) -> Path:
    return CACHE / f"nbr_{method}_{n}_{d or 'world'}_{seed}.npy"


def warm_up(method: str, t: torch.Tensor, v: torch.Tensor, top_k: int, seed: int, rows: int = 1024) -> None:
    """The method once on the first `rows` rows, untimed, along the path that N takes (dense or tiled for
    exact): a fresh process's one-time costs (first products, allocator, lazy kernels) are not mining."""
    import core.mining.exact as exact
    from core.mining import mine_exact, mine_fast

    ts, vs = t[:rows], v[:rows]
    if method == "reference":
        brute_force_topk(ts, vs, top_k)
    elif method == "exact":
        saved = exact.DENSE_MAX_ROWS
        exact.DENSE_MAX_ROWS = saved if t.shape[0] <= saved else 0
        try:
            mine_exact(ts, vs, top_k=top_k, device=t.device)
        finally:
            exact.DENSE_MAX_ROWS = saved
    elif method == "fast":
        mine_fast(ts, vs, top_k=top_k, recall_sample=0, seed=seed, device=t.device)


def measure_one(method: str, n: int, d: int | None = None, top_k: int = 50, seed: int = 0, device: str = "cpu",
                cap_s: float | None = None, exact_full: int = 300_000) -> dict[str, Any]:
    """One timed run of `method` ('reference', 'exact' or 'fast') at size n; meant for a fresh process."""
    from core.mining import mine_exact, mine_fast

    t_np, v_np = load_embeddings(n, d, seed)
    dev = torch.device(device)
    t, v = torch.from_numpy(t_np).to(dev), torch.from_numpy(v_np).to(dev)
    warm_up(method, t, v, top_k, seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss_data = current_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {"method": method, "n": n, "d": int(t.shape[1]), "top_k": top_k,
                           "data": "world (scaled)" if d is None else "planted clusters"}
    idx = None
    if method == "reference":
        if cap_s is not None and 3 * n * n * 4 > FULL_MATRIX_BUDGET:
            run = blocked_brute_force(t, v, top_k, rows=1024, cap_s=cap_s)
            out.update(capped=run, mode=("blocked, complete" if run["complete"] else
                                         f"blocked, stopped after {run['queries_done']:,} queries, extrapolated"))
        else:
            idx, out["mode"] = brute_force_topk(t, v, top_k)
    elif method == "exact" and n > exact_full:
        out["estimate"] = exact_estimate(t, v, top_k)
        out["mode"] = (f"estimated: candidate pass + {out['estimate']['stripes_timed']} stripes "
                       f"({out['estimate']['fraction_timed']:.2%} of pairs) timed")
    elif method == "exact":
        mined = mine_exact(t, v, top_k=top_k, device=dev)
        idx, out["report"] = mined.neighbors, mined.report
    elif method == "fast":
        mined = mine_fast(t, v, top_k=top_k, recall_sample=0, seed=seed, device=dev)
        idx, out["report"] = mined.neighbors, mined.report
    else:
        raise ValueError(f"unknown method {method!r}")
    out["wall_seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    out["seconds"] = out["wall_seconds"] if dev.type == "cuda" else out["cpu_seconds"]
    if "capped" in out and out["capped"]["full_is_extrapolated"]:
        out["extrapolated"], out["seconds"] = True, out["capped"]["seconds_full"]
    if "estimate" in out:
        out["extrapolated"], out["seconds"] = True, out["estimate"]["seconds_full"]
    out["rss_data_mib"] = round(rss_data, 1)
    if method == "fast":
        out.update(heldout_recall(t, v, mined.neighbors, top_k, seed))
    if idx is not None:
        np.save(_neighbors_path(method, n, d, seed), idx)
    return out


def heldout_recall(t: torch.Tensor, v: torch.Tensor, got: np.ndarray, top_k: int, seed: int) -> dict[str, Any]:
    """Recall@top_k of the fast lists on min(N, 10,000) random queries, against exact mining of those rows."""
    from core.mining.exact import exact_rows
    from core.mining.fast import recall_at_k as fast_recall
    from core.mining.scores import Filters

    n = t.shape[0]
    q = np.sort(np.random.default_rng(seed + 12345).choice(n, size=min(n, RECALL_QUERIES), replace=False))
    c0 = time.process_time()
    want = exact_rows(t, v, torch.from_numpy(q).to(t.device), top_k, Filters()).cpu().numpy()
    rec, used = fast_recall(got[q], want)
    return {"recall_heldout": rec, "recall_queries": used, "recall_exact_s": time.process_time() - c0}


def recall_at_k(fast: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |fast_i ∩ exact_i| / |exact_i| (padding -1 ignored), vectorised per chunk."""
    total, rows = 0.0, 0
    for s in range(0, len(exact), 20000):
        f, e = fast[s:s + 20000], exact[s:s + 20000]
        hit = (e[:, :, None] == f[:, None, :]).any(axis=2) & (e >= 0)
        size = (e >= 0).sum(axis=1)
        ok = size > 0
        total += float((hit.sum(axis=1)[ok] / size[ok]).sum())
        rows += int(ok.sum())
    return total / max(rows, 1)


def run(sizes: list[int], methods: list[str], *, d: int | None, top_k: int, seed: int, device: str,
        out: Path, doc: dict[str, Any] | None = None, timeout: float = 7200, cap_s: float | None = None,
        exact_full: int = 300_000) -> dict[str, Any]:
    doc = doc or {"benchmark": "mining", "machine": machine(device), "rows": []}
    doc["config"] = {"d": d or "world (96)", "top_k": top_k, "seed": seed, "device": device, "cap_s": cap_s,
                     "exact_full": exact_full, "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    for n in sizes:
        load_embeddings(n, d, seed)  # generate once, outside the timed processes
        for m in methods:
            r = isolated("bench.mining:measure_one", timeout=timeout, method=m, n=n, d=d, top_k=top_k, seed=seed,
                         device=device, cap_s=cap_s, exact_full=exact_full)
            r["working_mib"] = round(r["rss_peak_mib"] - r["rss_data_mib"], 1)
            doc["rows"] = [x for x in doc["rows"] if (x["method"], x["n"]) != (m, n)] + [r]
            print(f"  {m:9s} N={n:>9,}  {r['seconds']:9.1f} s{' (est.)' if r.get('extrapolated') else '':7s} "
                  f"peak {r['rss_peak_mib']:7.0f} MiB  recall {r.get('recall_heldout', '-')}", flush=True)
            write_json(out, doc)
        ex, fa = _neighbors_path("exact", n, d, seed), _neighbors_path("fast", n, d, seed)
        if ex.exists() and fa.exists() and {"exact", "fast"} <= set(methods) and n <= exact_full:
            rec = recall_at_k(np.load(fa), np.load(ex))
            for r in doc["rows"]:
                if r["method"] == "fast" and r["n"] == n:
                    r["recall_vs_exact_all_rows"] = rec
            write_json(out, doc)
    summarise(doc)
    write_json(out, doc)
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--methods", nargs="+", default=["reference", "exact", "fast"],
                   choices=["reference", "exact", "fast"])
    p.add_argument("--d", type=int, default=None, help="planted clusters of this dimension instead of the world")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "mining_cpu.json")
    p.add_argument("--append", action="store_true", help="add to the rows already in --out")
    p.add_argument("--cap", type=float, default=None,
                   help="CPU seconds: stop the blocked reference after this and extrapolate its full time")
    p.add_argument("--exact-full", type=int, default=300_000, help="above this N, exact is estimated")
    p.add_argument("--plot", type=Path, default=IMG / "bench_mining.png")
    args = p.parse_args(argv)
    doc = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    doc = run(args.sizes, args.methods, d=args.d, top_k=args.top_k, seed=args.seed, device=args.device,
              out=args.out, doc=doc, cap_s=args.cap, exact_full=args.exact_full)
    print_report(doc)
    if args.plot:
        plot(doc, args.plot)
        print(f"wrote {args.out} and {args.plot}")
    return doc


if __name__ == "__main__":
    main()
