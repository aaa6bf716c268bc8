"""Pretrain a small base CLIP on the synthetic world: the "already trained model" that tests and the demo boost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from core.data import build_index
from core.io import Access
from core.layout import final_path
from core.models import load_model
from core.progress import CollectingReporter, Reporter
from core.spec import JobSpec, resolve_spec
from core.train import RunPlan, pick_device, train_run

# A ~7M-parameter ViT for 32 px images; most parameters are the 49,408-token embedding table.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
TINY_NAME = "helip-tiny-vit"


def pretrain_spec(train_csv: Path, *, steps: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                  config: dict[str, Any] | None = None, name: str = TINY_NAME, workers: int = 0) -> JobSpec:
    """A plain contrastive run from random weights (hard_per_target 0), expressed as a job spec."""
    return resolve_spec({
        "model": {"name": name, "config": config or TINY_CONFIG, "pretrained": None},
        "data": {"train": str(train_csv), "workers": workers},
        "helip": {"hard_per_target": 0, "gamma": 0.0},
        "train": {"batch_size": batch_size, "lr": lr, "weight_decay": 0.1, "warmup": 0.05, "max_steps": steps,
                  "epochs": 1000, "seed": seed, "checkpoint_every": 10**9, "log_every": 25},
    })


def pretrain_base(train_csv: Path, out: Path, *, steps: int = 1500, batch_size: int = 128, lr: float = 1e-3,
                  seed: int = 0, config: dict[str, Any] | None = None, name: str = TINY_NAME,
                  device: str | None = None, reporter: Reporter | None = None, workers: int = 0) -> Path:
    """Train the base model and write it as an open_clip checkpoint at `out` (cached: same args, no work)."""
    out = Path(out)
    spec = pretrain_spec(train_csv, steps=steps, batch_size=batch_size, lr=lr, seed=seed, config=config,
                         name=name, workers=workers)
    meta = {"train_csv": str(Path(train_csv).resolve()), "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "config": spec.model.config, "name": name}
    meta_path = out.with_suffix(".json")
    if out.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return out
    reporter = reporter or CollectingReporter()
    dev = pick_device(device)
    access = Access()
    loaded = load_model(name, config=spec.model.config, pretrained=None, access=access, device=dev)
    index = build_index(str(train_csv), access=access)
    workdir = out.parent / (out.stem + ".work")
    if workdir.exists():
        shutil.rmtree(workdir)
    train_run(RunPlan("pretrain", 0, steps, batch_size), loaded=loaded, index=index, access=access,
              neighbors=None, spec=spec, workdir=workdir, reporter=reporter, device=dev)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(final_path(workdir, "pretrain")), out)
    shutil.rmtree(workdir, ignore_errors=True)
    meta_path.write_text(json.dumps(meta, indent=1))
    return out


def param_count(config: dict[str, Any] | None = None, name: str = TINY_NAME) -> int:
    m = load_model(name, config=config or TINY_CONFIG, pretrained=None, device="cpu").model
    return sum(p.numel() for p in m.parameters())

