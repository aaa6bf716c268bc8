"""The job's own path against the bare loops and open_clip's trainer, side by side in one run (CPU or GPU).

What is timed:
- job: `core.pipeline.run_job` on JPEG webdataset shards (the synthetic world), with a reporter that stamps
  each stage and step: the embedding stage's images/s, the HELIP training stage's samples/s (first to last
  step, so model building and the first step's warm-up are left out on both sides);
- bare encode: the same model encoding the same images, decoded and preprocessed beforehand, in batches
  of `mining.batch_size` (no data loading at all: the ceiling of the embedding stage);
- bare step: forward + open_clip's ClipLoss + backward + AdamW on a batch already in memory (the ceiling
  of a training step);
- open_clip's trainer: `python -m open_clip_train.main`, a plain fine-tune of the same model on the same
  images as a CSV, same batch, steps, workers and precision; its own per-step samples/s log;
- the sampler: `HardPairBatchSampler` over the job's own mined table, per batch, as a share of a job step.

- mining overlap: the check set's embeddings (the bare encode loop's features) mined exactly in float32
  and from the float16 copy the job stores (on a GPU: products in float16, float32 accumulation), the
  share of float32's top-k found.

    python -m bench.jobpath                      # CPU, the tiny ViT at 32 px, with open_clip's trainer
    python -m bench.gpu --only jobpath            # the GPU phase: ViT-B-32 and ViT-B-16 on 224 px JPEG shards
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, machine, median, table, write_json

ROOT = Path(__file__).resolve().parent.parent


class StampingReporter:
    """A Reporter that keeps the time of every stage start and step (what run_job reports, nothing more)."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float]] = []
        self.steps: list[tuple[str, int, float, dict[str, float]]] = []

    def stage(self, name: str) -> None:
        self.stages.append((name, time.perf_counter()))

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        pass

    def progress(self, stage: str, done: int, total: int | None, values: dict[str, float] | None = None) -> None:
        pass

    def step(self, run: str, step: int, total: int, values: dict[str, float]) -> None:
        self.steps.append((run, step, time.perf_counter(), dict(values)))

    def checkpoint(self, run: str, step: int, path: Path, *, final: bool, metrics: dict[str, Any] | None = None) -> None:
        pass

    def eval_result(self, model: str, dataset: str, metrics: dict[str, float]) -> None:
        pass

    def should_cancel(self) -> bool:
        return False

    def stage_seconds(self, name: str) -> float:
        starts = [t for s, t in self.stages if s == name]
        later = [t for s, t in self.stages if t > starts[0] and s != name]
        return (min(later) if later else time.perf_counter()) - starts[0]


def model_spec(name: str) -> dict[str, Any]:
    if name == "tiny":
        from synthworld.pretrain import TINY_CONFIG, TINY_NAME

        return {"name": TINY_NAME, "config": TINY_CONFIG, "pretrained": None}
    return {"name": name, "pretrained": None}


def job_spec(train: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": model_spec(args.model),
        "data": {"train": train, "workers": args.workers},
        "mining": {"top_k": 50, "batch_size": args.embed_batch},
        "helip": {"hard_per_target": 3, "sample_from": 50},
        "train": {"batch_size": args.batch, "max_steps": args.steps, "epochs": 1000, "lr": 1e-5, "warmup": 0.1,
                  "seed": 0, "checkpoint_every": 10**6, "precision": args.precision},
        "eval": {},
        "control": False,
    }


def run_job_timed(train: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from core.pipeline import run_job

    rep = StampingReporter()
    run_job(job_spec(train, args), workdir, reporter=rep, device=args.device)
    helip = [(s, t) for run, s, t, _ in rep.steps if run == "helip"]
    (s0, t0), (s1, t1) = helip[0], helip[-1]
    return {"embed_images_per_s": args.n / rep.stage_seconds("embedding"),
            "train_samples_per_s": (s1 - s0) * args.batch / (t1 - t0),
            "step_seconds": (t1 - t0) / max(s1 - s0, 1), "workdir": workdir}


def _preloaded(train: str, args: argparse.Namespace, n: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The model, and n of the world's images and captions decoded, preprocessed and tokenized beforehand."""
    from core.data import build_index, load_image
    from core.io import Access
    from core.models import load_model

    ms = model_spec(args.model)
    loaded = load_model(ms["name"], config=ms.get("config"), pretrained=None, device=args.device)
    index = build_index(train, access=Access())
    rows = range(min(n, len(index.keys)))
    images = torch.stack([loaded.preprocess_val(load_image(index, r, Access())) for r in rows])
    texts = loaded.tokenizer([index.captions[r] for r in rows])
    return loaded, images, texts


def _autocast(dev: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def bare_encode(loaded: Any, images: torch.Tensor, texts: torch.Tensor,
                args: argparse.Namespace) -> tuple[float, torch.Tensor, torch.Tensor]:
    """images/s of the bare loop (images already on the device), and its normalised features (text, image)."""
    model, dev, bs = loaded.model.eval(), torch.device(args.device), args.embed_batch
    images, texts = images.to(dev), texts.to(dev)
    feats_t, feats_i = [], []
    with torch.no_grad(), _autocast(dev, args.precision):
        model.encode_image(images[:bs])  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(images), bs):
            feats_i.append(model.encode_image(images[i:i + bs]))
            feats_t.append(model.encode_text(texts[i:i + bs]))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rate = len(images) / (time.perf_counter() - t0)
    norm = torch.nn.functional.normalize
    return rate, norm(torch.cat(feats_t).float(), dim=-1), norm(torch.cat(feats_i).float(), dim=-1)


def mining_overlap(text: torch.Tensor, image: torch.Tensor, device: str, k: int = 50) -> float:
    """Share of float32 exact mining's top-k that mining the float16 copy finds (the job's path: float16
    products with float32 accumulation on a GPU, float32 products of the float16 values on a CPU)."""
    from core.mining import mine_exact
    from core.pipeline import fp32_accumulation

    k = min(k, len(text) - 1)
    want = mine_exact(text.float(), image.float(), top_k=k, device=device).neighbors
    with fp32_accumulation():
        got = mine_exact(text.half(), image.half(), top_k=k, device=device).neighbors
    hits = sum(len(set(g[g >= 0].tolist()) & set(w[w >= 0].tolist())) for g, w in zip(got, want, strict=True))
    return hits / max(1, int((want >= 0).sum()))


def bare_step(loaded: Any, images: torch.Tensor, texts: torch.Tensor, args: argparse.Namespace) -> float:
    from open_clip.loss import ClipLoss

    model, dev = loaded.model.train().to(args.device), torch.device(args.device)
    reps = (args.batch + len(images) - 1) // len(images)
    x, y = images.repeat(reps, 1, 1, 1)[:args.batch].to(dev), texts.repeat(reps, 1)[:args.batch].to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=dev.type == "cuda")
    loss_fn = ClipLoss()
    fwd = torch.compile(model) if args.compile else model
    times = []
    warm = 2 + (3 if args.compile else 0)
    for i in range(args.bare_steps + warm):
        t0 = time.perf_counter()
        with _autocast(dev, args.precision):
            img_f, txt_f, scale = fwd(x, y)[:3]  # open_clip's tuple: features and the logit scale
            loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return args.batch / median(times)


def sampler_seconds_per_batch(workdir: Path, args: argparse.Namespace) -> float:
    """The job's sampler over the job's own mined table (what train_run builds), per batch."""
    from core.mining import read_hard_pairs
    from core.sampler import HardPairBatchSampler

    mined, _keys = read_hard_pairs(workdir / "hard_pairs.parquet")
    sampler = HardPairBatchSampler(np.asarray(mined.neighbors), targets_per_batch=args.batch // 4, hard_per_target=3,
                                   sample_from=50, seed=0)
    t0, n = time.perf_counter(), 0
    for _ in sampler:
        n += 1
        if n >= args.steps:
            break
    return (time.perf_counter() - t0) / max(n, 1)


def read_requests(train: str, workdir: Path, args: argparse.Namespace, batches: int = 10) -> tuple[float, float]:
    """Range requests per sample for the job's own hard-pair batches: grouped (PairDataset.__getitems__, what
    the job's DataLoader calls) and row by row (one request per sample)."""
    from core import decoding
    from core.data import PairDataset, build_index
    from core.io import Access
    from core.mining import read_hard_pairs
    from core.sampler import HardPairBatchSampler

    index = build_index(train, access=Access())
    mined, _keys = read_hard_pairs(workdir / "hard_pairs.parquet")
    sampler = HardPairBatchSampler(np.asarray(mined.neighbors), targets_per_batch=args.batch // 4, hard_per_target=3,
                                   sample_from=50, seed=0)
    ds = PairDataset(index, Access(), lambda im: im, lambda texts: torch.zeros(len(texts), 1))
    calls = [0]
    real = decoding.dio.read_range

    def counting(*a: Any, **kw: Any) -> bytes:
        calls[0] += 1
        return real(*a, **kw)

    decoding.dio.read_range = counting  # type: ignore[assignment]
    try:
        grouped = single = samples = 0
        for i, batch in enumerate(sampler):
            if i >= batches:
                break
            calls[0] = 0
            ds.__getitems__(list(batch))
            grouped += calls[0]
            calls[0] = 0
            for r in batch:
                ds[r]
            single += calls[0]
            samples += len(batch)
    finally:
        decoding.dio.read_range = real  # type: ignore[assignment]
    return grouped / max(samples, 1), single / max(samples, 1)


def open_clip_trainer(train_csv: Path, args: argparse.Namespace, tmp: Path) -> float:
    """open_clip_train.main's plain fine-tune on the same images (a CSV of steps x batch rows): its samples/s."""
    tmp.mkdir(parents=True, exist_ok=True)
    rows = train_csv.read_text().splitlines()
    head, body = rows[0], rows[1:]
    need = args.batch * (args.steps + 1)
    body = (body * (need // len(body) + 1))[:need]
    csv = tmp / "train.csv"
    csv.write_text("\n".join([head, *[f"{train_csv.parent / r.split(chr(9))[0]}\t{r.split(chr(9))[1]}"
                                      for r in body]]) + "\n")
    ms = model_spec(args.model)
    register = ""
    if "config" in ms:
        cfg = tmp / f"{ms['name']}.json"
        cfg.write_text(json.dumps(ms["config"]))
        register = f"open_clip.add_model_config({str(cfg)!r}); "
    precision = {"bf16": "amp_bf16", "fp16": "amp"}.get(args.precision, "fp32")
    argv = ["--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", "\t", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", ms["name"], "--batch-size", str(args.batch), "--epochs", "1",
            "--lr", "1e-5", "--wd", "0.1", "--warmup", "2", "--workers", str(args.workers), "--precision", precision,
            "--logs", str(tmp / "logs"), "--log-every-n-steps", "1", "--save-frequency", "0", "--seed", "0",
            "--report-to", "", "--name", "bench"]
    code = (f"import sys, open_clip; {register}from open_clip_train.main import main; main({argv!r})")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    text = out.stdout + out.stderr
    rates = [float(x) for x in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s", text)]
    if out.returncode != 0 or len(rates) < 3:
        raise RuntimeError(f"open_clip_train failed ({out.returncode}):\n{text[-3000:]}")
    return median(rates[1:])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=4096, help="training pairs")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bare-steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None, help="data workers (default: the job's default)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="job and open_clip runs, alternated; medians compared")
    ap.add_argument("--compile", action="store_true", help="compile the bare step (the job compiles by default on GPUs)")
    ap.add_argument("--no-open-clip", action="store_true", help="leave out open_clip_train.main (the GPU phase)")
    ap.add_argument("--data", default=None, help="shards and CSV of the same pairs as SHARDS,CSV (default: the "
                    "synthetic world, made here)")
    ap.add_argument("--out", type=Path, default=RESULTS / "jobpath_cpu.json")
    return ap


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the module docstring in one run; the rows and the figures behind them."""
    if args.workers is None:
        from core.loading import default_workers

        args.workers = default_workers(torch.device(args.device))
    base = Path(tempfile.mkdtemp(prefix="helip-jobpath-"))
    if args.data:
        shards, csv = args.data.split(",")
        csv_path = Path(csv)
    else:
        from synthworld.world import generate_world

        world = generate_world(base / "world", n_train=args.n, n_retrieval=16, zeroshot_per_class=1,
                               probe_per_class=(1, 1), image_size=args.image_size, shards=4, seed=0)
        shards, csv_path = world.train_shards, world.train_csv
    # The job and open_clip's trainer alternate (job, trainer, job, trainer, ...) and the medians are
    # compared: on a shared machine a load change then hits both sides alike.
    jobs, ocs = [], []
    for i in range(args.repeats):
        jobs.append(run_job_timed(shards, args, base / f"job{i}"))
        if not args.no_open_clip:
            ocs.append(open_clip_trainer(csv_path, args, base / f"oc{i}"))
    job = {k: median([j[k] for j in jobs]) for k in ("embed_images_per_s", "train_samples_per_s", "step_seconds")}
    job["workdir"] = jobs[0]["workdir"]
    loaded, images, texts = _preloaded(shards, args, min(args.n, 2048))
    enc, feat_t, feat_i = bare_encode(loaded, images, texts, args)
    overlap = mining_overlap(feat_t, feat_i, args.device)
    step = bare_step(loaded, images, texts, args)
    sampler = sampler_seconds_per_batch(job["workdir"], args)
    grouped, single = read_requests(shards, job["workdir"], args)
    step_ref = "bare compiled step" if args.compile else "bare step"
    rows = [
        {"what": "embedding stage (images/s)", "job": job["embed_images_per_s"], "reference": enc,
         "reference is": "bare encode loop, images preloaded", "ratio": job["embed_images_per_s"] / enc},
        {"what": "training stage (samples/s)", "job": job["train_samples_per_s"], "reference": step,
         "reference is": f"{step_ref}, batch in memory", "ratio": job["train_samples_per_s"] / step},
    ]
    if ocs:
        oc = median(ocs)
        rows.append({"what": "training stage (samples/s)", "job": job["train_samples_per_s"], "reference": oc,
                     "reference is": "open_clip_train.main, same data", "ratio": job["train_samples_per_s"] / oc})
    rows += [
        {"what": "sampler share of a step", "job": sampler, "reference": job["step_seconds"],
         "reference is": "seconds per job step", "ratio": sampler / job["step_seconds"]},
        {"what": "range requests per sample", "job": grouped, "reference": single,
         "reference is": "one request per sample", "ratio": grouped / single},
        {"what": "mining top-50 overlap, float16 vs float32", "job": overlap, "reference": 1.0,
         "reference is": f"float32 exact on {len(feat_t)} check pairs", "ratio": overlap},
    ]
    print(table(rows, ["what", "job", "reference", "reference is", "ratio"]), flush=True)
    doc = {"machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
           "repeats": {"job_train_samples_per_s": [j["train_samples_per_s"] for j in jobs],
                       "job_embed_images_per_s": [j["embed_images_per_s"] for j in jobs],
                       "open_clip_samples_per_s": ocs}}
    write_json(args.out, doc)
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
