"""Item 1: one HELIP fine-tuning step against a plain open_clip contrastive step (same model, same batch).

(a) plain: model forward, open_clip.loss.ClipLoss, backward, AdamW step.
(b) HELIP: the same, plus hard_pair_mask on a hard-pair batch layout and HelipLoss with gamma > 0.
Repeats are interleaved (A B, B A, A B ...) so that machine noise hits both; the ratio b/a is the figure
(as a ratio of medians, and as the median of the per-repeat ratios of back-to-back timings).

    python -m bench.step                                  # CPU: tiny model, 32 px, batch 64
    python -m bench.step --model ViT-B-32 --batch 1024 --device cuda --fused --precision bf16
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, isolated, machine, median, quartiles, table, timed, timed_both, write_json

TINY = "tiny"
CAPTION_WORDS = ["red", "blue", "small", "large", "circle", "square", "photo", "of", "a", "the", "on", "green"]


@dataclass
class StepSetup:
    """Everything one timed step needs, built once and shared by both variants."""

    model: torch.nn.Module
    forward: Callable
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    texts: torch.Tensor
    rows: torch.Tensor
    table: np.ndarray
    group: int
    sample_from: int
    autocast: torch.dtype | None
    device: torch.device
    clip_loss: torch.nn.Module
    helip_loss: torch.nn.Module


def load_bench_model(name: str, device: torch.device) -> Any:
    """The tiny test config (32 px) for `tiny`, else an open_clip architecture with random weights."""
    from core.models import load_model

    if name == TINY:
        # Imported only here: synthworld.pretrain pulls in the job spec (pydantic), which the GPU box lacks.
        from synthworld.pretrain import TINY_CONFIG, TINY_NAME

        return load_model(TINY_NAME, config=TINY_CONFIG, pretrained=None, device=device)
    return load_model(name, pretrained=None, device=device)


def image_size_of(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def random_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(4, 12)))) for _ in range(n)]


def hard_pair_layout(batch: int, group: int, sample_from: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Batch rows laid out as HardPairBatchSampler does (a target, then its hard pairs), and a mined table
    over 4 x batch rows in which each target lists its batch companions among its first `sample_from`."""
    rng = np.random.default_rng(seed)
    k = max(sample_from, group)
    n = max(4 * batch, 2 * k)  # the table needs more rows than one neighbour list is long
    rows = rng.permutation(n)[:batch].astype(np.int64)
    table = np.stack([rng.permutation(n)[:k] for _ in range(n)]).astype(np.int64)
    for start in range(0, batch - batch % group, group):
        target, hard = rows[start], rows[start + 1:start + group]
        slots = rng.choice(sample_from, size=len(hard), replace=False)
        table[target, slots] = hard
    return torch.from_numpy(rows), table


def build(model_name: str = TINY, *, batch: int = 64, device: str = "cpu", compile_model: bool = False,
          fused: bool = False, channels_last: bool = False, precision: str = "fp32", hard_per_target: int = 3,
          sample_from: int = 50, gamma: float = 0.3, seed: int = 0) -> StepSetup:
    if batch % (1 + hard_per_target):
        raise ValueError(f"batch {batch} must be a multiple of 1 + hard_per_target = {1 + hard_per_target}")
    from open_clip.loss import ClipLoss

    from core.losses import HelipLoss

    dev = torch.device(device)
    torch.manual_seed(seed)
    loaded = load_bench_model(model_name, dev)
    model = loaded.model.to(dev).train()
    size = image_size_of(model)
    images = torch.randn(batch, 3, size, size, device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    texts = loaded.tokenizer(random_captions(batch, seed)).to(dev)
    # AdamW with open_clip's decay rule, as the trainer builds it (no decay on gains, biases, logit scale).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}],
                                  lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)
    forward = torch.compile(model) if compile_model else model
    group = 1 + hard_per_target
    rows, mined = hard_pair_layout(batch, group, sample_from, seed)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return StepSetup(model, forward, optimizer, images, texts, rows, mined, group, sample_from, autocast, dev,
                     ClipLoss(), HelipLoss(gamma=gamma))


def _features(s: StepSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = s.forward(s.images, s.texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def plain_step(s: StepSetup) -> None:
    """(a) open_clip's own contrastive step."""
    with torch.autocast(s.device.type, dtype=s.autocast or torch.float32, enabled=s.autocast is not None):
        img, txt, scale = _features(s)
        loss = s.clip_loss(img, txt, scale)
    loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def helip_step(s: StepSetup) -> None:
    """(b) HELIP's step: the hard-pair mask built from the mined table (on the host, as the trainer does),
    then contrastive + gamma * margin loss."""
    from core.sampler import hard_pair_mask

    mask = hard_pair_mask(s.rows, s.table, s.group, s.sample_from).to(s.device, non_blocking=True)
    with torch.autocast(s.device.type, dtype=s.autocast or torch.float32, enabled=s.autocast is not None):
        img, txt, scale = _features(s)
        terms = s.helip_loss(img, txt, scale, mask)
        loss = sum(terms.values())
    loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


VARIANTS: dict[str, Callable[[StepSetup], None]] = {"plain": plain_step, "helip": helip_step}


def margin_extra_bytes(batch: int) -> int:
    """Analytic upper bound of the margin term's extra memory: it works on B x B matrices only
    (similarity view, hard mask, identity, 'hardest' fill, negatives, hinge and its gradient: at
    most 8 fp32-sized B x B buffers alive at once), independent of the model."""
    return 8 * 4 * batch * batch


def time_interleaved(s: StepSetup, *, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Median seconds per step of each variant, from `repeats` interleaved timings of `steps` steps."""
    cuda = s.device.type == "cuda"
    first: dict[str, float] = {}
    for name, fn in VARIANTS.items():  # warm-up (the first call also compiles, when asked)
        for i in range(warmup):
            sec, _ = timed(lambda fn=fn: fn(s), s.device)
            if i == 0:
                first[name] = sec
    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peak: dict[str, int] = {name: 0 for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(repeats):
        # Interleaved, the order alternating (A B, B A, A B ...): noise and any drift hit both variants alike.
        for name in names if r % 2 == 0 else names[::-1]:
            fn = VARIANTS[name]
            if cuda:
                torch.cuda.reset_peak_memory_stats(s.device)
            w, c, _ = timed_both(lambda fn=fn: [fn(s) for _ in range(steps)], s.device)
            wall[name].append(w / steps)
            cpu[name].append(c / steps)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(s.device))
    out: dict[str, Any] = {}
    batch = s.images.shape[0]
    for name in VARIANTS:
        # GPU: wall time. CPU: the process's CPU time, which other users' load on a shared box does not
        # inflate (torch runs single-threaded here, so it equals the wall time of an idle machine).
        runs = wall[name] if cuda else cpu[name]
        med = median(runs)
        q1, q3 = quartiles(runs)
        out[name] = {"s_per_step": med, "s_per_step_q1": q1, "s_per_step_q3": q3, "samples_per_s": batch / med,
                     "wall_s_per_step": median(wall[name]), "first_step_s": first[name], "runs": runs,
                     "clock": "wall" if cuda else "process CPU time"}
        if cuda:
            out[name]["peak_memory_gib"] = peak[name] / 2**30
    # Each repeat's helip/plain ratio comes from two back-to-back timings: steadier than a ratio of medians.
    clock = wall if cuda else cpu
    out["ratio_time_paired"] = median([h / p for h, p in zip(clock["helip"], clock["plain"], strict=True)])
    return out


def measure(model: str = TINY, batch: int = 64, device: str = "cpu", steps: int = 2, repeats: int = 8,
            warmup: int = 2, compile_model: bool = False, fused: bool = False, channels_last: bool = False,
            precision: str = "fp32", hard_per_target: int = 3, gamma: float = 0.3) -> dict[str, Any]:
    """Time both variants in one process (and, on CUDA, their peak memory); the ratio helip / plain."""
    s = build(model, batch=batch, device=device, compile_model=compile_model, fused=fused,
              channels_last=channels_last, precision=precision, hard_per_target=hard_per_target, gamma=gamma)
    res = time_interleaved(s, steps=steps, repeats=repeats, warmup=warmup)
    res["ratio_time"] = res["helip"]["s_per_step"] / res["plain"]["s_per_step"]
    if "peak_memory_gib" in res["plain"]:
        res["ratio_memory"] = res["helip"]["peak_memory_gib"] / res["plain"]["peak_memory_gib"]
        res["memory_method"] = "torch.cuda.max_memory_allocated, max over the timed repeats of each variant"
    if compile_model:
        res["compile_seconds"] = res["plain"]["first_step_s"] - res["plain"]["s_per_step"]
    res["params_millions"] = sum(p.numel() for p in s.model.parameters()) / 1e6
    res["margin_extra_bytes_bound"] = margin_extra_bytes(batch)
    del s
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return res


def memory_one(variant: str, model: str = TINY, batch: int = 64, steps: int = 3, hard_per_target: int = 3,
               gamma: float = 0.3) -> dict[str, Any]:
    """CPU: run one variant alone (meant for a fresh process, see bench.common.isolated) and report
    the resident-memory growth from just before the first step to the process's high-water mark."""
    from bench.common import current_rss_mib, peak_rss_mib

    s = build(model, batch=batch, device="cpu", hard_per_target=hard_per_target, gamma=gamma)
    gc.collect()
    before = current_rss_mib()
    for _ in range(steps):
        VARIANTS[variant](s)
    return {"variant": variant, "rss_before_steps_mib": before, "step_peak_delta_mib": peak_rss_mib() - before}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {"model": args.model, "batch": args.batch, "device": args.device, "compile": args.compile,
           "fused": args.fused, "channels_last": args.channels_last, "precision": args.precision,
           "steps_per_repeat": args.steps, "repeats": args.repeats, "hard_per_target": args.hard_per_target,
           "gamma": args.gamma}
    res = measure(args.model, args.batch, args.device, args.steps, args.repeats, args.warmup, args.compile,
                  args.fused, args.channels_last, args.precision, args.hard_per_target, args.gamma)
    if torch.device(args.device).type == "cpu" and args.memory:
        mem = {v: isolated("bench.step:memory_one", variant=v, model=args.model, batch=args.batch,
                           hard_per_target=args.hard_per_target, gamma=args.gamma) for v in VARIANTS}
        for v in VARIANTS:
            res[v]["peak_memory_mib"] = mem[v]["rss_peak_mib"]
            res[v]["step_memory_delta_mib"] = mem[v]["step_peak_delta_mib"]
        res["ratio_memory"] = mem["helip"]["rss_peak_mib"] / mem["plain"]["rss_peak_mib"]
        res["ratio_step_memory_delta"] = mem["helip"]["step_peak_delta_mib"] / mem["plain"]["step_peak_delta_mib"]
        res["memory_method"] = ("peak RSS (VmHWM) of one fresh process per variant running 3 steps; "
                                "the step deltas are from just before the first step")
    doc = {"benchmark": "step", "machine": machine(args.device), "config": cfg, **res,
           "targets": {"time_ratio_max": 1.05, "memory_ratio_max": 1.05}}
    doc["met"] = {"time": res["ratio_time"] <= 1.05,
                  "memory": res["ratio_memory"] <= 1.05 if "ratio_memory" in res else None}
    return doc


def print_report(doc: dict[str, Any]) -> None:
    rows = []
    for v in VARIANTS:
        r = doc[v]
        rows.append({"variant": v, "s/step": r["s_per_step"], "samples/s": r["samples_per_s"],
                     "peak memory": r.get("peak_memory_gib") and f"{r['peak_memory_gib']:.2f} GiB"
                     or r.get("peak_memory_mib") and f"{r['peak_memory_mib']:.0f} MiB"})
    print(table(rows, ["variant", "s/step", "samples/s", "peak memory"]))
    print(f"ratio helip/plain: time {doc['ratio_time']:.3f} (paired {doc['ratio_time_paired']:.3f}), "
          f"memory {doc.get('ratio_memory', float('nan')):.3f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TINY, help="'tiny' (the 32 px test config) or an open_clip name")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fused", action="store_true", help="fused AdamW")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=6, help="timed repeats of each variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hard-per-target", type=int, default=3)
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="CPU: skip the per-process RSS runs")
    p.add_argument("--out", type=Path, default=RESULTS / "step_cpu.json")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    doc = run(args)
    print_report(doc)
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
