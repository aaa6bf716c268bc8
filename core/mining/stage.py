"""The mining stage of a job: one miner in this process, or exact mining in row-range shards (mining.shards)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.mining.embeddings import mine_arrays
from core.mining.scores import MinedPairs
from core.mining.shards import MEMORY_BUDGET, LocalShards, ShardBackend, ShardResult, auto_shards, mine_sharded
from core.progress import Reporter, Stage


def shard_count(mining: Any, n_valid: int, dim: int, budget: int = MEMORY_BUDGET) -> int:
    """How many shards a spec's `mining` section asks for over `n_valid` rows (1: not sharded)."""
    if mining.method != "exact":
        return 1
    if mining.shards is not None:
        return max(1, min(int(mining.shards), n_valid))
    return auto_shards(n_valid, dim, mining.top_k, budget)


def mine_stage(mining: Any, text: np.ndarray, image: np.ndarray, valid: np.ndarray, *, device: torch.device,
               seed: int, reporter: Reporter, backend: ShardBackend | None = None) -> MinedPairs:
    """Mine with a spec's `mining` options; sharded when shard_count says so, through `backend` (default:
    every shard in this process). Progress counts shards done; the events name each shard's worker and time."""
    n_valid = int(np.asarray(valid).sum())
    budget = int(getattr(backend, "memory_budget", MEMORY_BUDGET))
    count = shard_count(mining, n_valid, int(text.shape[1]), budget)
    if count <= 1:
        return mine_arrays(text, image, mining, valid=valid, device=device, seed=seed,
                           progress=lambda done, total: reporter.progress(Stage.MINING, done, total))
    reporter.event(f"mining {n_valid} pairs in {count} shards of about {n_valid // count} rows",
                   data={"shards": count, "valid_rows": n_valid, "requested": mining.shards})
    done: list[ShardResult] = []

    def on_done(result: ShardResult) -> None:
        done.append(result)
        reporter.progress(Stage.MINING, len(done), count)

    reporter.progress(Stage.MINING, 0, count)
    mined, results = mine_sharded(
        text, image, top_k=mining.top_k, shards=count, valid=valid, same_caption_threshold=mining.same_caption_threshold,
        duplicate_threshold=mining.duplicate_threshold, clamp_negative=mining.clamp_negative,
        block_size=mining.block_size, device=device, backend=backend or LocalShards(), on_done=on_done,
        should_cancel=reporter.should_cancel)
    workers = sorted({r.worker for r in results})
    reporter.event(f"mined {count} shards on {len(workers)} worker(s); slowest shard {mined.report['shard_seconds_max']:.2f} s",
                   data={"shards": [{"shard": r.index, "rows": [r.a, r.b], "worker": r.worker, "seconds": r.seconds}
                                    for r in results], "workers": workers})
    return mined
