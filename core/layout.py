"""The layout of a job's work directory: every file name core writes there, defined once.

core.pipeline and core.train write these files; the worker uploads and restores them by the same names
(worker/files.py), and `helip run --out DIR` leaves them in DIR.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_CACHE_DIR = "weights"  # downloaded or copied weights, per work directory
EMBEDDINGS = "embeddings.npz"
HARD_PAIRS = "hard_pairs.parquet"
METRICS = "metrics.json"
SUMMARY = "summary.json"
SPEC = "spec.json"
EVAL_CACHE_PREFIX = "eval_"  # eval_<model>.json: one model's evaluation, reused by a resumed job
EVAL_CACHE_GLOB = f"{EVAL_CACHE_PREFIX}*.json"


def state_path(workdir: Path | str, run: str) -> Path:
    """The resumable training state of `run` (weights, optimizer, scheduler, position in the data)."""
    return Path(workdir) / CHECKPOINTS_DIR / f"{run}_latest.pt"


SELECTED_RUN = "helip_selected"  # the forgetting guard's choice: checkpoints/helip_selected.pt


def final_path(workdir: Path | str, run: str) -> Path:
    """The final weights of `run`, in open_clip's checkpoint format (the guard's selection: helip_selected.pt)."""
    name = f"{run}.pt" if run == SELECTED_RUN else f"{run}_final.pt"
    return Path(workdir) / CHECKPOINTS_DIR / name


def eval_cache_path(workdir: Path | str, model: str) -> Path:
    return Path(workdir) / f"{EVAL_CACHE_PREFIX}{model}.json"


def eval_cache_model(path: Path) -> str:
    """The model name an evaluation cache file belongs to (inverse of eval_cache_path)."""
    return Path(path).stem.removeprefix(EVAL_CACHE_PREFIX)
