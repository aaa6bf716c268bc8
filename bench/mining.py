"""Item 2: hard pair mining, exact and fast, against a brute-force reference on synthetic embeddings.

Each (method, N) runs in a fresh process so that its peak memory is its own. The reference is the
straightforward computation of the same score, (T T^T) * (V V^T) and top-k, without HELIP's filters:
one [N, N] product where N x N fits in memory, else the same in blocks of rows (said in the results).

    python -m bench.mining --sizes 10000 30000 100000           # CPU defaults
    python -m bench.mining --sizes 1000000 --methods fast       # 1M: the fast path only
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import IMG, RESULTS, current_rss_mib, fit_exponent, isolated, machine, table, write_json

CACHE = Path(os.environ.get("HELIP_BENCH_CACHE", "/tmp/helip-bench"))
FULL_MATRIX_BUDGET = 6 * 1024**3  # bytes: above this the reference runs blocked (three [N, N] fp32 buffers)
DUP_FRACTION = 0.01  # planted near-duplicate images (cosine ~0.99 to another row)
SAME_CAPTION_FRACTION = 0.01  # planted pairs sharing one caption (identical text embedding)


def synthetic_embeddings(n: int, d: int = 512, *, seed: int = 0, per_cluster: int = 100,
                         chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, L2-normalised text and image embeddings [n, d] (float32), correlated with each other.

    Cluster centres of images lean towards their text centres (a shared CLIP space); within a cluster
    a pair sits at cosine ~0.6 to its centre. A few rows are planted near-duplicate images and a few
    share a caption, so HELIP's filters have something to filter. Generated in chunks (1M x 512 x 2
    is 4 GB: no float64 copy of it is ever made).
    """
    rng = np.random.default_rng(seed)
    clusters = max(8, n // per_cluster)
    ct = rng.standard_normal((clusters, d), dtype=np.float32)
    ct /= np.linalg.norm(ct, axis=1, keepdims=True)
    cv = 0.6 * ct + 0.8 * rng.standard_normal((clusters, d), dtype=np.float32) / math.sqrt(d)
    cv /= np.linalg.norm(cv, axis=1, keepdims=True)
    assign = rng.integers(0, clusters, size=n)
    t = np.empty((n, d), dtype=np.float32)
    v = np.empty((n, d), dtype=np.float32)
    sigma = np.float32(1.2 / math.sqrt(d))
    for s in range(0, n, chunk):
        a = assign[s:s + chunk]
        for out, centre in ((t, ct), (v, cv)):
            x = centre[a] + sigma * rng.standard_normal((len(a), d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s:s + chunk] = x
    src = rng.integers(0, n, size=int(n * DUP_FRACTION))
    dst = rng.integers(0, n, size=len(src))
    v[dst] = v[src] + np.float32(0.1 / math.sqrt(d)) * rng.standard_normal((len(src), d), dtype=np.float32)
    v[dst] /= np.linalg.norm(v[dst], axis=1, keepdims=True)
    src = rng.integers(0, n, size=int(n * SAME_CAPTION_FRACTION))
    dst = rng.integers(0, n, size=len(src))
    t[dst] = t[src]
    return t, v


def load_embeddings(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic set of this size, cached as .npy (regenerating 1M rows in every process is slow)."""
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


def synthetic_embeddings_torch(n: int, d: int = 512, *, seed: int = 0, device: str | torch.device = "cuda",
                               dtype: torch.dtype = torch.float16, per_cluster: int = 100,
                               chunk: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """`synthetic_embeddings`' recipe generated on the device (3.3M x 512 in seconds on a GPU), in `dtype`."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    clusters = max(8, n // per_cluster)
    ct = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g, device=dev), dim=1)
    noise = torch.randn(clusters, d, generator=g, device=dev) / math.sqrt(d)
    cv = torch.nn.functional.normalize(0.6 * ct + 0.8 * noise, dim=1)
    assign = torch.randint(0, clusters, (n,), generator=g, device=dev)
    t = torch.empty(n, d, dtype=dtype, device=dev)
    v = torch.empty(n, d, dtype=dtype, device=dev)
    sigma = 1.2 / math.sqrt(d)
    for s in range(0, n, chunk):
        a = assign[s:s + chunk]
        for out, centre in ((t, ct), (v, cv)):
            x = centre[a] + sigma * torch.randn(len(a), d, generator=g, device=dev)
            out[s:s + chunk] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    src = torch.randint(0, n, (int(n * DUP_FRACTION),), generator=g, device=dev)
    dst = torch.randint(0, n, (len(src),), generator=g, device=dev)
    noisy = v[src].float() + 0.1 / math.sqrt(d) * torch.randn(len(src), d, generator=g, device=dev)
    v[dst] = torch.nn.functional.normalize(noisy, dim=1).to(dtype)
    src = torch.randint(0, n, (int(n * SAME_CAPTION_FRACTION),), generator=g, device=dev)
    dst = torch.randint(0, n, (len(src),), generator=g, device=dev)
    t[dst] = t[src]
    return t, v


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
                # the same without the first block's one-off costs (torch.compile of the block kernel)
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
    """core.mining.mine_exact with a time cap: past it the run stops and the full time is extrapolated."""
    from core.mining import mine_exact

    clock = _Clock(cap_s, t.device)
    report: dict[str, Any] = {}
    try:
        report = mine_exact(t, v, top_k=top_k, block_size=block_size, device=t.device, progress=clock.tick).report
    except _Deadline:
        pass
    return {**clock.result(t.shape[0]), "report": report}


def _neighbors_path(method: str, n: int, d: int, seed: int) -> Path:
    return CACHE / f"nbr_{method}_{n}_{d}_{seed}.npy"


def measure_one(method: str, n: int, d: int = 512, top_k: int = 50, seed: int = 0, device: str = "cpu",
                block_size: int = 4096, recall_sample: int = 1000, cap_s: float | None = None) -> dict[str, Any]:
    """One timed run of `method` ('reference', 'exact' or 'fast') at size n; meant for a fresh process.

    Saves its neighbour table so that the parent can compare fast against exact over every row. With
    cap_s, reference and exact stop after that many seconds and their full time is extrapolated from
    the steady rate (each block of queries costs the same); the peak memory is still measured.
    """
    from core.mining import mine_exact, mine_fast

    t_np, v_np = load_embeddings(n, d, seed)
    dev = torch.device(device)
    t, v = torch.from_numpy(t_np), torch.from_numpy(v_np)
    if dev.type == "cuda":
        t, v = t.to(dev), v.to(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    rss_data = current_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {"method": method, "n": n, "d": d, "top_k": top_k}
    idx = None
    if cap_s is not None and method in ("reference", "exact"):
        if method == "reference":
            run = blocked_brute_force(t, v, top_k, rows=1024, cap_s=cap_s)
        else:
            run = exact_capped(t, v, top_k, cap_s=cap_s, block_size=block_size)
            out["report"] = run.pop("report")
        out.update(capped=run, mode=("blocked, complete" if run["complete"] else
                                     f"stopped after {run['queries_done']:,} queries, extrapolated"))
    elif method == "reference":
        idx, mode = brute_force_topk(t, v, top_k)
        out["mode"] = mode
    elif method == "exact":
        mined = mine_exact(t, v, top_k=top_k, block_size=block_size, device=dev)
        idx, out["report"] = mined.neighbors, mined.report
    elif method == "fast":
        mined = mine_fast(t, v, top_k=top_k, recall_sample=recall_sample, seed=seed, device=dev)
        idx, out["report"] = mined.neighbors, mined.report
    else:
        raise ValueError(f"unknown method {method!r}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    out["wall_seconds"] = time.perf_counter() - t0
    # CPU: the process's CPU time (single-threaded, so it is the unloaded wall time); GPU: wall time.
    out["cpu_seconds"] = time.process_time() - c0
    out["seconds"] = out["wall_seconds"] if dev.type == "cuda" else out["cpu_seconds"]
    if "capped" in out and out["capped"]["full_is_extrapolated"]:
        out["extrapolated"] = True
        out["seconds"] = out["capped"]["seconds_full"]
    out["rss_data_mib"] = round(rss_data, 1)
    if idx is not None:
        np.save(_neighbors_path(method, n, d, seed), idx)
    return out


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


def run(sizes: list[int], methods: list[str], *, d: int, top_k: int, seed: int, device: str,
        out: Path, doc: dict[str, Any] | None = None, timeout: float = 3600,
        cap_s: float | None = None) -> dict[str, Any]:
    doc = doc or {"benchmark": "mining", "machine": machine(device), "rows": []}
    doc["config"] = {"d": d, "top_k": top_k, "seed": seed, "device": device,
                     "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    for n in sizes:
        load_embeddings(n, d, seed)  # generate once, outside the timed processes
        for m in methods:
            r = isolated("bench.mining:measure_one", timeout=timeout, method=m, n=n, d=d, top_k=top_k, seed=seed,
                         device=device, cap_s=cap_s)
            r["working_mib"] = round(r["rss_peak_mib"] - r["rss_data_mib"], 1)
            doc["rows"] = [x for x in doc["rows"] if (x["method"], x["n"]) != (m, n)] + [r]
            print(f"  {m:9s} N={n:>8,}  {r['seconds']:8.1f} s (wall {r['wall_seconds']:.1f} s)  "
                  f"peak {r['rss_peak_mib']:7.0f} MiB  "
                  f"(working {r['working_mib']:.0f} MiB)", flush=True)
            write_json(out, doc)
        ex, fa = _neighbors_path("exact", n, d, seed), _neighbors_path("fast", n, d, seed)
        if ex.exists() and fa.exists() and {"exact", "fast"} <= set(methods) and cap_s is None:
            rec = recall_at_k(np.load(fa), np.load(ex))
            for r in doc["rows"]:
                if r["method"] == "fast" and r["n"] == n:
                    r["recall_vs_exact_all_rows"] = rec
            write_json(out, doc)
    summarise(doc)
    write_json(out, doc)
    return doc


def summarise(doc: dict[str, Any]) -> None:
    """Growth exponents per method, the extrapolated exact time at 1M when not measured, and the targets."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in doc["rows"]:
        by.setdefault(r["method"], {})[r["n"]] = r
    doc["exponents"] = {m: fit_exponent(sorted(rs), [rs[n]["seconds"] for n in sorted(rs)]) for m, rs in by.items()}
    ex, fa = by.get("exact", {}), by.get("fast", {})
    extrap = {}
    b = doc["exponents"].get("exact", float("nan"))
    if ex and 1_000_000 not in ex and b == b:
        n0 = max(ex)
        extrap["exact_1m_seconds"] = ex[n0]["seconds"] * (1_000_000 / n0) ** b
        extrap["from"] = f"exact at N={n0:,} x (1M/N)^{b:.2f} (fitted over N={sorted(ex)})"
    doc["extrapolated"] = extrap
    exact_1m = ex[1_000_000]["seconds"] if 1_000_000 in ex else extrap.get("exact_1m_seconds")
    met: dict[str, Any] = {}
    if ex:
        # "never holds N x N": the working memory stays far below one N x N fp32 matrix at the largest N.
        n_max = max(ex)
        met["exact_never_nxn"] = ex[n_max]["working_mib"] < 0.5 * n_max * n_max * 4 / 2**20
        met["exact_working_mib_at_largest_n"] = ex[n_max]["working_mib"]
        met["nxn_fp32_mib_at_largest_n"] = n_max * n_max * 4 / 2**20
    if 1_000_000 in fa and exact_1m:
        speed = exact_1m / fa[1_000_000]["seconds"]
        met["fast_1m_speedup"] = speed
        met["fast_1m_10x"] = speed >= 10
    if fa and ex and b == b:
        # fast against exact at the same N: measured exact where there is one, else exact's fitted trend
        n0 = max(ex)
        exact_at = {n: ex[n]["seconds"] if n in ex else ex[n0]["seconds"] * (n / n0) ** b for n in fa}
        met["fast_speedup_vs_exact"] = {n: exact_at[n] / fa[n]["seconds"] for n in sorted(fa)}
    if fa:
        n_max = max(fa)
        rec = fa[n_max].get("recall_vs_exact_all_rows", fa[n_max].get("report", {}).get("recall_at_k"))
        met["fast_recall_at_largest_n"] = rec
        met["fast_recall_95"] = rec is not None and rec >= 0.95
    doc["met"] = met


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Time and working memory against N, log-log; the extrapolated exact point hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"reference": ("tab:gray", "s"), "exact": ("tab:blue", "o"), "fast": ("tab:orange", "^")}
    for m, (color, marker) in styles.items():
        rs = sorted((r for r in doc["rows"] if r["method"] == m), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        b = doc.get("exponents", {}).get(m, float("nan"))
        label = f"{m} (~N^{b:.2f})" if b == b else m
        ax_t.loglog(ns, [r["seconds"] for r in rs], marker=marker, color=color, label=label)
        ext = [r for r in rs if r.get("extrapolated")]  # capped runs: full time extrapolated, drawn hollow
        if ext:
            ax_t.loglog([r["n"] for r in ext], [r["seconds"] for r in ext], ls="none", marker=marker, ms=9,
                        mfc="white", color=color)
        ax_m.loglog(ns, [max(r["working_mib"], 1.0) for r in rs], marker=marker, color=color, label=m)
    all_n = sorted({r["n"] for r in doc["rows"]})
    if all_n:
        ax_m.loglog(all_n, [n * n * 4 / 2**20 for n in all_n], ls="--", color="black", lw=1,
                    label="one N x N fp32 matrix")
    ex = doc.get("extrapolated", {})
    if "exact_1m_seconds" in ex:
        n0 = max(r["n"] for r in doc["rows"] if r["method"] == "exact")
        t0 = next(r["seconds"] for r in doc["rows"] if r["method"] == "exact" and r["n"] == n0)
        ax_t.loglog([n0, 1_000_000], [t0, ex["exact_1m_seconds"]], ls=":", color="tab:blue")
        ax_t.loglog([1_000_000], [ex["exact_1m_seconds"]], marker="o", mfc="none", color="tab:blue",
                    label="exact 1M (extrapolated)")
    ax_t.set_xlabel("pairs N")
    ax_t.set_ylabel("seconds")
    ax_t.set_title("mining time")
    ax_t.legend(fontsize=8)
    ax_m.set_xlabel("pairs N")
    ax_m.set_ylabel("MiB above the embeddings")
    ax_m.set_title("working memory (peak RSS - data)")
    ax_m.legend(fontsize=8)
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(doc: dict[str, Any]) -> None:
    rows = []
    for r in sorted(doc["rows"], key=lambda r: (r["n"], r["method"])):
        rep = r.get("report", {})
        rows.append({"N": f"{r['n']:,}", "method": r["method"],
                     "seconds": f"{r['seconds']:.1f}" + (" (extrapolated)" if r.get("extrapolated") else ""),
                     "wall s": r["wall_seconds"],
                     "peak RSS MiB": r["rss_peak_mib"], "working MiB": r["working_mib"],
                     "recall vs exact": r.get("recall_vs_exact_all_rows", rep.get("recall_at_k")),
                     "notes": r.get("mode") or rep.get("index")})
    print(table(rows, ["N", "method", "seconds", "wall s", "peak RSS MiB", "working MiB", "recall vs exact", "notes"]))
    print("growth exponents:", {m: round(b, 2) for m, b in doc.get("exponents", {}).items()})
    print("extrapolated:", doc.get("extrapolated"), "\nmet:", doc.get("met"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--methods", nargs="+", default=["reference", "exact", "fast"],
                   choices=["reference", "exact", "fast"])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "mining_cpu.json")
    p.add_argument("--append", action="store_true", help="add to the rows already in --out")
    p.add_argument("--cap", type=float, default=None,
                   help="seconds: stop reference / exact after this and extrapolate their full time")
    p.add_argument("--plot", type=Path, default=IMG / "bench_mining.png")
    args = p.parse_args(argv)
    import json

    doc = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    doc = run(args.sizes, args.methods, d=args.d, top_k=args.top_k, seed=args.seed, device=args.device,
              out=args.out, doc=doc, cap_s=args.cap)
    print_report(doc)
    if args.plot:
        plot(doc, args.plot)
        print(f"wrote {args.out} and {args.plot}")
    return doc


if __name__ == "__main__":
    main()
