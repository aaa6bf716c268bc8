"""Sharded mining: a job's mining stage with 1 and 2 worker processes, against the unsharded miner, in one run.

The machinery is the service's (worker/shards.py): the job's process records the plan in a database
(SQLite in a temporary embedded data dir), uploads the embeddings to the store (file://), mines shards
itself, and with 2 workers a second process (spawned when the job sends its shard message, as Celery
would start a task) claims shards, downloads the embeddings and mines too. What is timed is
`ServiceShards.run` plus the merge (core.mining.shards.mine_sharded), from the job's first call to the
merged table; the helper's start (a fresh interpreter importing torch) counts. Celery's own message
latency (milliseconds on Redis) does not. Every figure uses 1 thread per process (OMP_NUM_THREADS=1).

    OMP_NUM_THREADS=1 python -m bench.shards [--rows 20000] [--dim 256] [--top-k 50] [--shards 8]

On this 2-core machine two processes are at best 2x one; a shard scores its rows against every row
(no symmetry across shards), so the sharded total is up to twice mine_exact's work.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, now_iso, table, write_json
from bench.mining_data import synthetic_embeddings


def _settings(data_dir: Path) -> Any:
    from helip.settings import Settings

    return Settings(data_dir=data_dir, storage_url=f"file://{data_dir / 'store'}", heartbeat_seconds=1.0,
                    stale_after_seconds=60.0)


def _helper(data_dir: str, job_id: str, plan: str, name: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from worker.shards import help_mine

    help_mine(job_id, plan, settings=_settings(Path(data_dir)), worker_id=name)


def _running_job(settings: Any) -> str:
    from helip import db, transitions

    sessions = db.session_factory(settings)
    with sessions() as s:
        job = transitions.create_job(s, owner="bench", spec={}, seed=0)
        s.commit()
        transitions.claim_job(s, job_id=job.id, worker_id="bench-job", stale_after_seconds=60)
        s.commit()
        return job.id


def sharded_stage(text: np.ndarray, image: np.ndarray, *, top_k: int, shards: int, workers: int) -> dict[str, Any]:
    """One sharded mining stage with `workers` processes (the job's own included); its figures and table."""
    from core.mining.shards import mine_sharded
    from helip import db
    from helip.store import store_from_settings
    from worker.shards import ServiceShards

    ctx = mp.get_context("spawn")
    helpers: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        settings = _settings(Path(tmp))
        job_id = _running_job(settings)

        def send(job: str, plan: str) -> None:  # one message per missing worker, like the job's Celery sends
            if len(helpers) < workers - 1:
                p = ctx.Process(target=_helper, args=(tmp, job, plan, f"helper-{len(helpers) + 1}"))
                p.start()
                helpers.append(p)

        backend = ServiceShards(settings=settings, sessions=db.session_factory(settings),
                                store=store_from_settings(settings), job_id=job_id, worker_id="job", send=send)
        t0 = time.perf_counter()
        mined, results = mine_sharded(text, image, top_k=top_k, shards=shards, backend=backend)
        seconds = time.perf_counter() - t0
        for p in helpers:
            p.join(timeout=60)
    by_worker: dict[str, int] = {}
    for r in results:
        by_worker[r.worker] = by_worker.get(r.worker, 0) + 1
    return {"workers": workers, "shards": shards, "seconds": round(seconds, 3),
            "shards_by_worker": by_worker, "shard_seconds_sum": mined.report["shard_seconds_sum"],
            "_mined": mined}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "shards_cpu.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from core.mining.exact import mine_exact

    torch.set_num_threads(1)
    text, image = synthetic_embeddings(args.rows, args.dim, seed=0)
    t0 = time.perf_counter()
    ref = mine_exact(torch.from_numpy(text), torch.from_numpy(image), top_k=args.top_k)
    unsharded = time.perf_counter() - t0
    rows: list[dict[str, Any]] = [{"run": "mine_exact, 1 process (unsharded)", "workers": 1, "shards": 1,
                                   "seconds": round(unsharded, 3), "_s": unsharded}]
    for workers in (1, 2):
        r = sharded_stage(text, image, top_k=args.top_k, shards=args.shards, workers=workers)
        mined = r.pop("_mined")
        assert np.array_equal(mined.neighbors, ref.neighbors) and np.array_equal(mined.scores, ref.scores), \
            "the sharded table differs from mine_exact's"
        rows.append({"run": f"sharded, {workers} worker(s)", **r, "_s": r["seconds"]})
    one = rows[1]["_s"]
    for r in rows:  # ratios of the unrounded times (a tiny run rounds to 0)
        secs = max(r.pop("_s"), 1e-9)
        r["vs_1_worker"] = round(one / secs, 2)
        r["vs_unsharded"] = round(unsharded / secs, 2)
    print(f"rows {args.rows}, dim {args.dim}, top_k {args.top_k}, {args.shards} shards; tables identical to "
          f"mine_exact's (checked)")
    print(table(rows, ["run", "workers", "shards", "seconds", "vs_1_worker", "vs_unsharded", "shards_by_worker"]))
    result = {"when": now_iso(), "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
