"""faiss-cpu's IVF-Flat against the torch IVF self-join (core.mining.mine_fast), at the same data and N.

faiss: IndexIVFFlat over x = [t; v] (inner product = cos_t + cos_v, the join's own grouping), trained
on a sample, all rows added, then `--queries` random rows searched for `--candidates` neighbours each
with `--nprobe` lists, and HELIP's exact filtered score applied to those candidates (top 50 kept, the
tie rule): the search and re-rank time per query is scaled to all N rows (every query costs about the
same), training and adding are timed in full. torch: mine_fast with its defaults, timed in full.
Both: recall@50 on the same queries against exact mining of those rows. CPU time, one thread.

    OMP_NUM_THREADS=1 python -m bench.mining_faiss --n 1000000 --seed 1 --queries 2000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, write_json
from bench.mining_data import scaled_embeddings


def faiss_mine(t: torch.Tensor, v: torch.Tensor, queries: np.ndarray, *, nlist: int, nprobe: int, candidates: int,
               top_k: int = 50, train_per_list: int = 32, seed: int = 0) -> dict[str, Any]:
    """IVF-Flat candidates for `queries`, re-ranked by the exact filtered score; times and the lists."""
    import faiss

    from core.mining.dense import rank_window
    from core.mining.scores import Filters, _topk_lowest_index, tile_scores

    n = t.shape[0]
    x = np.ascontiguousarray(torch.cat([t, v], 1).numpy())
    c0 = time.process_time()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 8  # as many k-means iterations as the torch join's
    sample = np.random.default_rng(seed).choice(n, size=min(n, train_per_list * nlist), replace=False)
    index.train(x[np.sort(sample)])
    train_s = time.process_time() - c0
    c0 = time.process_time()
    index.add(x)
    add_s = time.process_time() - c0
    index.nprobe = nprobe
    c0 = time.process_time()
    _, cand = index.search(x[queries], candidates + 1)
    cand_t = torch.from_numpy(cand)
    q = torch.from_numpy(queries)
    ok = (cand_t >= 0) & (cand_t != q[:, None])
    safe = cand_t.clamp_min(0)
    ct = (t[q][:, None, :] * t[safe]).sum(-1)
    cv = (v[q][:, None, :] * v[safe]).sum(-1)
    s, _, _ = tile_scores(ct, cv, Filters())
    s = s.masked_fill(~ok, -math.inf)
    order = torch.sort(safe, dim=1).indices  # candidates by row number: the window's tie rule needs it
    s, safe = s.gather(1, order), safe.gather(1, order)
    vals, pos = _topk_lowest_index(s, top_k)
    vals, cols = rank_window(vals, safe.gather(1, pos), top_k)
    got = torch.where(torch.isfinite(vals), cols, -1).numpy()
    search_s = time.process_time() - c0
    per_query = search_s / len(queries)
    return {"nlist": nlist, "nprobe": nprobe, "candidates": candidates, "train_s": train_s, "add_s": add_s,
            "search_rerank_s_per_query": per_query, "seconds_all_rows": train_s + add_s + per_query * n,
            "neighbors": got}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from core.mining import mine_fast
    from core.mining.exact import exact_rows
    from core.mining.fast import recall_at_k
    from core.mining.scores import Filters

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--configs", nargs="+", default=["2048,16,200", "2048,32,300"],
                   help="faiss nlist,nprobe,candidates")
    p.add_argument("--out", type=Path, default=RESULTS / "mining_faiss_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_np, v_np = scaled_embeddings(args.n, seed=args.seed)
    t, v = torch.from_numpy(t_np), torch.from_numpy(v_np)
    queries = np.sort(np.random.default_rng(args.seed + 99).choice(args.n, size=args.queries, replace=False))
    want = exact_rows(t, v, torch.from_numpy(queries), 50, Filters()).numpy()
    doc: dict[str, Any] = {"benchmark": "mining_faiss", "n": args.n, "seed": args.seed, "queries": args.queries,
                           "rows": []}
    c0 = time.process_time()
    mined = mine_fast(t, v, top_k=50, recall_sample=0)
    torch_s = time.process_time() - c0
    doc["torch"] = {"seconds": torch_s, "recall": recall_at_k(mined.neighbors[queries], want)[0],
                    "lists": mined.report["lists"], "probe": mined.report["probe"]}
    print(f"torch IVF join: {torch_s:.1f} CPU-s, recall {doc['torch']['recall']:.4f}", flush=True)
    for cfg in args.configs:
        nlist, nprobe, cands = (int(x) for x in cfg.split(","))
        r = faiss_mine(t, v, queries, nlist=nlist, nprobe=nprobe, candidates=cands)
        r["recall"] = recall_at_k(r.pop("neighbors"), want)[0]
        doc["rows"].append(r)
        print(f"faiss IVF-Flat {cfg}: {r['seconds_all_rows']:.1f} CPU-s for all rows (train {r['train_s']:.1f}, "
              f"add {r['add_s']:.1f}), recall {r['recall']:.4f}", flush=True)
        write_json(args.out, doc)
    write_json(args.out, doc)
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}))
    return doc


if __name__ == "__main__":
    main()
