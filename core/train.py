"""Fine-tuning: the HELIP (or plain control) training loop, single process or one rank of DDP.

Reads top to bottom: plan the steps, build optimizer and schedule, resume if a training state exists,
then loop over hard-pair batches with the contrastive + margin loss, checkpointing as it goes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data import PairDataset, PairIndex, collate_pairs
from core.device_decode import batch_to_device, input_pipeline
from core.errors import DataError, JobCancelled, SpecError
from core.evaluate import evaluate
from core.families import model_family
from core.guard import StepKeeper
from core.io import Access
from core.layout import eval_cache_path, final_path, state_path
from core.loading import close_loader, make_loader, resolve_workers, ssl_transform
from core.losses import HelipLoss, SimCLRLoss
from core.models import LoadedModel, load_state, prepare_for_training, save_checkpoint, unwrap
from core.progress import Reporter
from core.sampler import HardPairBatchSampler, hard_pair_mask, mask_table
from core.spec import JobSpec
from core.train_step import LossWindow, StepLoss, compile_failure, micro_slices, train_step


@dataclass(frozen=True)
class RunPlan:
    """What one training run does: `run` names it in metrics and checkpoints."""

    run: str                 # "helip", "control" or "pretrain"
    hard_per_target: int     # 0: plain batches (the control)
    total_steps: int
    batch_size: int          # global, per optimizer step
    eval_every: int = 0      # evaluate every this many steps and at the end (0: never during training)
    eval_final: bool = False  # evaluate the final weights while they are in memory (the job's evaluation reuses it)

    @property
    def group(self) -> int:
        return 1 + self.hard_per_target


def plan_steps(n_valid: int, spec: JobSpec) -> int:
    """Optimizer steps of the HELIP run; the control run takes the same number (docs/spec.md, the method's decisions)."""
    targets = spec.train.batch_size // (1 + spec.helip.hard_per_target)
    per_epoch = n_valid // targets
    if per_epoch == 0:
        raise DataError(
            f"{n_valid} usable pairs are fewer than the {targets} targets one batch needs",
            param="train.batch_size",
        )
    steps = max(1, math.ceil(spec.train.epochs * per_epoch))
    if spec.train.max_steps is not None:
        steps = min(steps, spec.train.max_steps)
    if spec.train.warmup >= 1 and spec.train.warmup > steps:
        raise SpecError(f"train.warmup ({spec.train.warmup:g} steps) is longer than the run ({steps} steps from "
                        f"{n_valid} usable pairs)", param="train.warmup")
    return steps


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPU by default, none (fp32) on CPU; pure_* give their type (for inference)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "amp": torch.float16,
            "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16,
            "pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}[precision]


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to zero, as open_clip's cosine_lr."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, norms and the logit scale (open_clip's rule)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{DATASET/METRIC: value} for step metrics (counts left out)."""
    return {f"{ds}/{m}": float(v) for ds, vals in results.items() for m, v in vals.items() if not m.startswith("n_")}


def train_run(plan: RunPlan, *, loaded: LoadedModel, index: PairIndex, access: Access,
              neighbors: np.ndarray | None, spec: JobSpec, workdir: Path, reporter: Reporter,
              device: torch.device, rank: int = 0, world_size: int = 1, tokens: np.ndarray | None = None) -> Path:
    """Train `loaded.model` in place for plan.total_steps and return the final checkpoint's path.
    `tokens`: the captions already tokenized by the model's tokenizer (from the embedding pass)."""
    t, h = spec.train, spec.helip
    workdir = Path(workdir)
    if final_path(workdir, plan.run).exists():
        reporter.event(f"{plan.run}: final checkpoint already present, training skipped")
        return final_path(workdir, plan.run)
    targets_global = plan.batch_size // plan.group
    if targets_global % world_size:
        raise DataError(f"train.batch_size {plan.batch_size} gives {targets_global} targets per step, "
                        f"not divisible by {world_size} processes", param="train.batch_size")
    torch.manual_seed(t.seed + rank)
    pure = t.precision.startswith("pure_")
    autocast_dtype = None if pure else resolve_precision(t.precision, device)

    model = loaded.model.to(device).train()
    if pure:  # open_clip's pure_bf16 / pure_fp16: the weights themselves in that type, no autocast
        model = model.to(resolve_precision(t.precision, device))
    for note in prepare_for_training(model, t):
        reporter.event(f"{plan.run}: {note}")
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    base = unwrap(model)
    optimizer = torch.optim.AdamW(_param_groups(base, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=t.eps, fused=device.type == "cuda")
    warmup = int(t.warmup) if t.warmup >= 1 else int(round(t.warmup * plan.total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, warmup), plan.total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    loss_fn = HelipLoss(gamma=h.gamma if plan.hard_per_target else 0.0, margin=h.margin,
                        symmetric=h.margin_symmetric, rank=rank, world_size=world_size,
                        siglip=model_family(spec.model.name, spec.model.config) == "siglip")
    ssl_fn = SimCLRLoss() if t.ssl_weight > 0 else None
    step_loss = StepLoss(loss_fn, ssl_fn, t.ssl_weight)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)

    def backward(total: torch.Tensor) -> None:
        scaler.scale(total).backward()

    no_sync = model.no_sync if world_size > 1 else None
    fwd_model = torch.compile(model) if (t.compile if t.compile is not None else device.type == "cuda") else model

    valid = index.valid_mask()
    table = neighbors if neighbors is not None else np.full((len(index), 1), -1, dtype=np.int64)
    sampler = HardPairBatchSampler(
        table, targets_per_batch=targets_global // world_size, hard_per_target=plan.hard_per_target,
        sample_from=h.sample_from, valid=valid, captions=index.captions, dedupe_captions=h.dedupe_captions,
        seed=t.seed, rank=rank, world_size=world_size)
    if len(sampler) == 0:
        raise DataError("not enough usable pairs for one batch", param="train.batch_size")
    clip_tf = loaded.preprocess_train
    transform, normalize, decoder = input_pipeline(
        ssl_transform(clip_tf, loaded.preprocess_val, unwrap(loaded.model)) if ssl_fn else clip_tf, device,
        spec.data.decode)
    dataset = PairDataset(index, access, transform, loaded.tokenizer, tokens=tokens, jpeg_passthrough=decoder is not None)
    workers = resolve_workers(spec.data.workers, device, world_size)
    # One loader for the whole run: its workers live across epochs (the sampler is told the epoch before
    # each pass and is iterated in this process, so a resumed or new epoch needs no new workers).
    loader = make_loader(dataset, workers=workers, device=device, persistent=True, batch_sampler=sampler,
                         collate_fn=collate_pairs)
    hard_table = mask_table(table, h.sample_from, device) if plan.hard_per_target else None

    step, epoch, start_batch = 0, 0, 0
    state_file = state_path(workdir, plan.run)
    if state_file.exists():
        state = load_state(state_file)
        base.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, start_batch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        reporter.event(f"{plan.run}: resumed from step {step}", data={"run": plan.run, "resumed_step": step})

    def save_state(batch_in_epoch: int, metrics: dict | None = None) -> None:
        if rank != 0:
            return
        save_checkpoint(state_file, model, name=loaded.name, extra={
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "run": plan.run})
        reporter.checkpoint(plan.run, step, state_file, final=False, metrics=metrics)

    def evaluate_now() -> dict[str, dict[str, float]]:
        # pure_* weights need autocast to read fp32 images; otherwise evaluate() picks the precision itself
        pure_cast = torch.autocast(device.type, dtype=resolve_precision(t.precision, device)) if pure else None
        with pure_cast or contextlib.nullcontext():
            return evaluate(base, loaded.preprocess_val, loaded.tokenizer, spec.eval, access=access, device=device,
                            batch_size=spec.eval.batch_size, workers=workers, precision=t.precision)

    keeper = None
    if rank == 0 and plan.eval_every and spec.guard is not None and plan.run == "helip":
        keeper = StepKeeper(workdir, plan.run, spec.guard, json.loads(eval_cache_path(workdir, "baseline").read_text()))
    final_metrics = None

    reporter.event(f"{plan.run}: training {plan.total_steps} steps of {plan.batch_size} "
                   f"({plan.group} per target) on {world_size} process(es), {device.type}",
                   data={"run": plan.run, "steps": plan.total_steps, "batch_size": plan.batch_size,
                         "hard_per_target": plan.hard_per_target, "warmup_steps": warmup, "data_workers": workers,
                         "compiled": fwd_model is not model, "uint8_transfer": normalize is not None,
                         "decode": "device" if decoder is not None else "workers"})
    cancel_flag = torch.zeros(1, device=device if device.type == "cuda" else "cpu")
    seen, window_t, window_n = 0, time.perf_counter(), 0
    window = LossWindow()
    bad_seen = 0
    try:
        while step < plan.total_steps:
            sampler.set_epoch(epoch, start_batch)
            batch_in_epoch = start_batch
            for batch in loader:
                images, texts, rows, bad_rows = batch_to_device(batch, device, normalize, decoder)
                if bad_rows:
                    bad_seen += len(bad_rows)
                    reporter.event(f"{plan.run}: {len(bad_rows)} unreadable image(s) left out of a batch",
                                   level="warning", data={"rows": [r for r, _ in bad_rows][:20]})
                mask = None
                if hard_table is not None and not bad_rows:
                    mask = hard_pair_mask(rows.to(device, non_blocking=True), hard_table, plan.group, h.sample_from)
                slices = micro_slices(len(rows), t.accum_steps, plan.group)

                step_args = (images, texts, mask, slices)
                step_kw = dict(step_loss=step_loss, ssl=ssl_fn is not None, autocast=autocast, backward=backward,
                               no_sync=no_sync)
                try:
                    terms = train_step(fwd_model, *step_args, **step_kw)
                except Exception as exc:
                    if fwd_model is model or not compile_failure(exc):
                        raise
                    reporter.event(f"{plan.run}: torch.compile failed ({type(exc).__name__}: "
                                   f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); "
                                   "training goes on uncompiled", level="warning")
                    optimizer.zero_grad(set_to_none=True)
                    fwd_model = model
                    terms = train_step(fwd_model, *step_args, **step_kw)
                if t.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(base.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                with torch.no_grad():
                    base.logit_scale.clamp_(0, math.log(100))
                step += 1
                batch_in_epoch += 1
                seen += len(rows) * world_size
                window_n += len(rows) * world_size
                window.add(terms)

                results = None
                last = step == plan.total_steps
                if rank == 0 and ((plan.eval_every and (step % plan.eval_every == 0 or last)) or (plan.eval_final and last)):
                    eval_t0 = time.perf_counter()
                    results = evaluate_now()
                    window_t += time.perf_counter() - eval_t0  # samples_per_second counts training time only
                    if step == plan.total_steps:
                        final_metrics = results
                    elif keeper is not None:
                        keeper.record(step, results, lambda p, at=step: save_checkpoint(
                            p, model, name=loaded.name, extra={"step": at, "run": plan.run}))
                # The host reads the device only here (loss values, logit scale): every log_every steps, not every step.
                logging = step % t.log_every == 0 or last or step == 1 or results is not None
                if logging:
                    terms_mean = window.mean(base.logit_scale.detach().exp())
                    now = time.perf_counter()
                    values = {**terms_mean, "lr": scheduler.get_last_lr()[0],
                              "samples_per_second": window_n / max(now - window_t, 1e-9), "epoch": epoch,
                              **flat_metrics(results or {})}
                    window_t, window_n = now, 0
                    if rank == 0:
                        reporter.step(plan.run, step, plan.total_steps, values)
                # Cancel: one process asks its reporter (no device read); ranks agree by an all-reduce, and read it
                # only when the step was logged anyway (so a cancel takes effect within log_every steps).
                if world_size == 1:
                    cancelled = rank == 0 and reporter.should_cancel()
                elif logging:
                    if rank == 0:
                        cancel_flag.fill_(1.0 if reporter.should_cancel() else 0.0)
                    torch.distributed.all_reduce(cancel_flag)
                    cancelled = cancel_flag.item() > 0
                else:
                    cancelled = False
                if cancelled:
                    save_state(batch_in_epoch)
                    raise JobCancelled(f"{plan.run}: cancelled at step {step}; state saved")
                if (step % t.checkpoint_every == 0 or results is not None) and step < plan.total_steps:
                    save_state(batch_in_epoch, results)
                if step >= plan.total_steps:
                    break
            else:
                epoch, start_batch = epoch + 1, 0
                continue
            break

    finally:  # persistent workers end with the run, also when it is cancelled or fails
        close_loader(loader)

    stats = dict(sampler.stats)
    if rank == 0:
        save_state(batch_in_epoch)
        out = save_checkpoint(final_path(workdir, plan.run), model, name=loaded.name,
                              extra={"step": step, "run": plan.run})
        reporter.event(f"{plan.run}: done, {step} steps, {seen} samples",
                       data={"run": plan.run, "sampler": stats, "unreadable_in_training": bad_seen})
        if final_metrics is not None:  # the final weights' evaluation: the pipeline reuses it
            eval_cache_path(workdir, plan.run).write_text(json.dumps(final_metrics, indent=1))
            for ds, vals in final_metrics.items():
                reporter.eval_result(plan.run, ds, vals)
        reporter.checkpoint(plan.run, step, out, final=True, metrics=final_metrics)
    return final_path(workdir, plan.run)


def pick_device(requested: str | None = None) -> torch.device:
    """The device a job runs on: the one asked for, else the first GPU, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def world_size_for(spec: JobSpec, device: torch.device, cpu_processes: int = 1) -> int:
    """DDP processes: spec.train.devices, else every visible GPU, else `cpu_processes` (Settings.cpu_processes)."""
    if spec.train.devices:
        return spec.train.devices
    if device.type == "cuda":
        return max(1, torch.cuda.device_count())
    return max(1, int(cpu_processes))
