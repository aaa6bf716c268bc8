"""Mine once, reuse: the embedding + mining stages of a job with the cache off, on a miss, and on a hit.

Three `core.pipeline.run_job(..., mine_only=True)` runs on the same synthetic world and model, in one process:
- off: `mining.cache: false`, what every job of a sweep paid before the cache (the reference);
- first: the cache on and empty: keys computed (every training file hashed), embedded, mined, written;
- second: another train seed, the same inputs: both stages from the cache (a file store, as the embedded
  defaults use; an S3 store adds the transfer of the two files).
A first run, not recorded, warms the process up. It prints each run's embedding and mining stage times
(core.pipeline's own timings: the embedding stage includes loading the model and indexing the data),
the wall time, and the ratios second / first and first / off (the cost of the keys on a miss).

    python -m bench.cache                 # CPU, the tiny ViT, 2000 pairs
    python -m bench.cache --n 8000 --device cuda --model ViT-B-32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, table, write_json

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def spec(world, args: argparse.Namespace, *, cache: bool, seed: int) -> dict[str, Any]:
    model = {"name": "bench-cache-tiny", "config": TINY} if args.model == "tiny" else {"name": args.model}
    return {"model": model, "data": {"train": str(world.train_csv), "workers": args.workers},
            "mining": {"top_k": 20, "batch_size": args.batch, "cache": cache}, "helip": {"sample_from": 20},
            "train": {"seed": seed}, "control": False}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="training pairs")
    p.add_argument("--model", default="tiny", help="'tiny' (a 32 px ViT built from a config) or an open_clip name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/cache_<device>.json)")
    args = p.parse_args(argv)

    from core.pipeline import run_job
    from core.progress import CollectingReporter
    from helip.store import FileStore
    from synthworld.world import generate_world

    tmp = Path(tempfile.mkdtemp(prefix="helip-bench-cache-"))
    world = generate_world(tmp / "world", n_train=args.n, n_retrieval=16, zeroshot_per_class=1,
                           probe_per_class=(1, 1), shards=1, seed=1)
    store = FileStore(tmp / "store")
    runs: dict[str, dict[str, Any]] = {}
    # warm-up: the process's first job pays imports and first-call costs; it is not recorded
    run_job(spec(world, args, cache=False, seed=1), tmp / "warm", reporter=CollectingReporter(), device=args.device,
            mine_only=True)
    for name, cache, seed in (("off", False, 1), ("first", True, 1), ("second", True, 2)):
        rep = CollectingReporter()
        t0 = time.perf_counter()
        res = run_job(spec(world, args, cache=cache, seed=seed), tmp / name, reporter=rep, device=args.device,
                      mine_only=True, cache=store)
        wall = time.perf_counter() - t0
        t = res.summary["timings"]
        keys = [e for e in rep.events if e["message"].startswith("cache keys computed")]
        runs[name] = {"embedding_s": t["embedding"], "mining_s": t["mining"], "stages_s": t["embedding"] + t["mining"],
                      "wall_s": wall, "cached": res.summary["cache"]["cached"],
                      "keys_s": float(keys[0]["message"].split(" in ")[1].split(" s")[0]) if keys else 0.0}
    assert runs["second"]["cached"] == ["embeddings", "hard_pairs"], runs["second"]
    ratios = {"second_over_first": runs["second"]["stages_s"] / runs["first"]["stages_s"],
              "first_over_off": runs["first"]["stages_s"] / runs["off"]["stages_s"],
              "second_over_off": runs["second"]["stages_s"] / runs["off"]["stages_s"]}
    rows = [{"run": name, "embedding s": r["embedding_s"], "mining s": r["mining_s"], "embed+mine s": r["stages_s"],
             "keys s": r["keys_s"], "wall s": r["wall_s"], "cached": ",".join(r["cached"]) or "-"}
            for name, r in runs.items()]
    print(f"{args.n} pairs, model {args.model}, device {args.device}")
    print(table(rows, ["run", "embedding s", "mining s", "embed+mine s", "keys s", "wall s", "cached"]))
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    doc = {"machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
           "ratios": ratios}
    write_json(args.out or RESULTS / f"cache_{args.device.split(':')[0]}.json", doc)
    return doc


if __name__ == "__main__":
    main()
