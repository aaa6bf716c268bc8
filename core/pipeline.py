"""A whole HELIP job: embed, mine, fine-tune (HELIP and optional control), evaluate, write artifacts.

The same function serves `helip run`, the Celery worker and the tests. It resumes from whatever a
previous attempt left in `workdir` (embeddings, hard pairs, training states, evaluation results).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import layout
from core.cache import EMBEDDINGS, HARD_PAIRS, BlobStore, JobCache, check_pairs
from core.data import PairIndex, build_index
from core.embed import embed_pairs, load_embeddings, save_embeddings
from core.errors import DataError, SpecError
from core.evaluate import eval_size, evaluate
from core.guard import SELECTED_RUN, StepKeeper, judge, plot_curves, select, wise_state
from core.io import Access
from core.layout import final_path
from core.loading import resolve_workers
from core.mining import MinedPairs, read_hard_pairs, write_hard_pairs
from core.mining.shards import ShardBackend
from core.mining.stage import mine_stage
from core.models import LoadedModel, load_model, load_state, model_from_spec, save_checkpoint
from core.progress import Reporter, Stage
from core.spec import JobSpec, resolve_spec
from core.train import RunPlan, pick_device, plan_steps, train_run, world_size_for


@dataclass
class JobResult:
    metrics: dict[str, dict[str, dict[str, float]]]
    artifacts: dict[str, Path]
    summary: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    import open_clip

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "python": platform.python_version()}


def lift(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """boosted minus baseline (and minus control) for every metric the models share."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for other in ("baseline", "control"):
        if other not in metrics or "helip" not in metrics:
            continue
        out[f"helip_minus_{other}"] = {
            ds: {m: v - metrics[other][ds][m] for m, v in vals.items()
                 if m in metrics[other].get(ds, {}) and not m.startswith("n_")}
            for ds, vals in metrics["helip"].items() if ds in metrics[other]
        }
    return out


def _index(spec: JobSpec, access: Access) -> PairIndex:
    d = spec.data
    return build_index(d.train, access=access, csv_img_key=d.csv_img_key, csv_caption_key=d.csv_caption_key,
                       csv_separator=d.csv_separator, max_caption_chars=d.max_caption_chars, param="data.train")


def _check_bad(index: PairIndex, spec: JobSpec, reporter: Reporter) -> None:
    report = index.report()
    if report.get("bad", 0):
        reporter.event(f"{report['bad']} of {report['rows']} samples are unusable and left out",
                       level="warning", data={**report, "examples": dict(list(index.bad.items())[:20])})
    frac = report.get("bad", 0) / max(1, report["rows"])
    if frac > spec.data.max_bad_fraction:
        raise DataError(f"{report['bad']} of {report['rows']} samples ({frac:.1%}) are unusable, more than "
                        f"data.max_bad_fraction ({spec.data.max_bad_fraction:.1%}); first: "
                        f"{list(index.bad.items())[:3]}", param="data.max_bad_fraction")


def _miner(spec: JobSpec, loaded: LoadedModel, access: Access, device, workdir: Path,
           weights_cache: Path | None) -> LoadedModel:
    enc = spec.mining.encoder
    if enc == "self":
        return loaded
    if enc == "unimodal":
        raise SpecError("mining.encoder 'unimodal' (sentence-transformers + DINOv2) is not available in this "
                        "version; use 'self' or an open_clip model name", param="mining.encoder")
    return load_model(enc, pretrained=spec.mining.encoder_pretrained, access=access, device=device,
                      weights_cache=weights_cache,
                      cache_dir=workdir / layout.WEIGHTS_CACHE_DIR, param_prefix="mining.encoder")


def _mine(spec: JobSpec, text: np.ndarray, image: np.ndarray, valid: np.ndarray, device,
          reporter: Reporter, shards: ShardBackend | None) -> MinedPairs:
    """The embeddings are float16 (core.embed): on a GPU the products run in it, accumulated in float32."""
    with fp32_accumulation():
        return mine_stage(spec.mining, text, image, valid, device=device, seed=int(spec.train.seed or 0),
                          reporter=reporter, backend=shards)


@contextlib.contextmanager
def fp32_accumulation() -> Iterator[None]:
    """Half-precision matmuls accumulate in float32 (cuBLAS may otherwise reduce in half precision)."""
    flag = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = flag




def _evaluate(name: str, loaded: LoadedModel | None, spec: JobSpec, access: Access, device, workdir: Path,
              reporter: Reporter, *, report: bool = True) -> dict[str, dict[str, float]]:
    cache = layout.eval_cache_path(workdir, name)
    if cache.exists():
        return json.loads(cache.read_text())
    assert loaded is not None, f"{name}: no cached evaluation and no model"
    res = evaluate(loaded.model, loaded.preprocess_val, loaded.tokenizer, spec.eval, access=access,
                   device=device, batch_size=spec.eval.batch_size,
                   workers=resolve_workers(spec.data.workers, torch.device(device)), precision=spec.train.precision,
                   reporter=reporter)
    for ds, vals in res.items() if report else ():
        reporter.eval_result(name, ds, vals)
    cache.write_text(json.dumps(res, indent=1))
    return res


def _eval_every(spec: JobSpec, steps: int, access: Access) -> int:
    """eval.every, or when unset: a quarter of the run when one evaluation reads at most a tenth of the
    images trained on between two evaluations (then it costs a few percent of the training time)."""
    if spec.eval.every is not None:
        return spec.eval.every
    interval = max(1, math.ceil(steps / 4))
    size = eval_size(spec.eval, access=access)
    return interval if 0 < size <= 0.1 * interval * spec.train.batch_size else 0


def _guard(spec: JobSpec, workdir: Path, metrics: dict, steps: int, access: Access, dev, reporter: Reporter):
    """WiSE interpolations of the HELIP run, the selection, helip_selected.pt; (selected, curves, PNG path)."""
    g, baseline = spec.guard, metrics["baseline"]
    assert g is not None  # called only for a spec with a guard
    model = load_model(spec.model.name, config=spec.model.config, pretrained=spec.model.pretrained,
                       access=access, device=dev, cache_dir=workdir / "weights")
    input_state = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    boosted = load_state(final_path(workdir, "helip"))["state_dict"]
    wise = []
    # The ends are the input and the boosted weights exactly (wise_state returns them unchanged: tested), so
    # their evaluations are the ones already made; only the points in between are evaluated here.
    ends = {0.0: baseline, 1.0: metrics["helip"]}
    for alpha in sorted({0.0, 1.0, *g.wise_alphas}):
        if alpha in ends:
            m = ends[alpha]
        else:
            model.model.load_state_dict(wise_state(input_state, boosted, alpha))
            m = _evaluate(f"wise_{alpha:g}", model, spec, access, dev, workdir, reporter, report=False)
        wise.append({"source": "wise", "step": steps, "alpha": alpha, **judge(m, baseline, g)})
    final = {"source": "final", "step": steps, "alpha": None, **judge(metrics["helip"], baseline, g)}
    keeper = StepKeeper(workdir, "helip", g, baseline)
    best_step = keeper.best()
    candidates = [final] + ([best_step] if best_step else []) + [{**w} for w in reversed(wise)]
    chosen = select(candidates)
    if chosen["source"] == "wise":
        state = wise_state(input_state, boosted, chosen["alpha"])
    else:
        state = load_state(keeper.weights_path if chosen["source"] == "step"
                           else final_path(workdir, "helip"))["state_dict"]
    model.model.load_state_dict(state)
    out = save_checkpoint(workdir / "checkpoints" / f"{SELECTED_RUN}.pt", model.model, name=spec.model.name,
                          extra={"step": chosen["step"], "run": SELECTED_RUN, "source": chosen["source"],
                                 "alpha": chosen["alpha"] if chosen["source"] == "wise" else None})
    selected = {"source": chosen["source"], "step": chosen["step"],
                "alpha": chosen["alpha"] if chosen["source"] == "wise" else None,
                "metrics": chosen["metrics"], "objective": chosen["objective"]}
    reporter.checkpoint(SELECTED_RUN, chosen["step"], out, final=True, metrics=chosen["metrics"])
    for ds, vals in chosen["metrics"].items():  # an evaluated model like the others (eval rows, tables)
        reporter.eval_result(SELECTED_RUN, ds, vals)
    reporter.event(f"guard: selected {selected['source']} (step {selected['step']}, alpha {selected['alpha']}), "
                   f"objective {selected['objective']:.4f}", data={k: v for k, v in selected.items() if k != "metrics"})
    curves = {"objective": g.objective or "mean", "protect": g.protect,
              "input": {"metrics": baseline, **judge(baseline, baseline, g)}, "final": final,
              "steps": keeper.entries, "wise": wise, "selected": selected}
    png = plot_curves(curves, workdir / "guard_curve.png")
    return selected, curves, out, png


def _train(plan: RunPlan, spec: JobSpec, index: PairIndex, neighbors, tokens, access: Access, device,
           workdir: Path, reporter: Reporter, *, cpu_processes: int, weights_cache: Path | None) -> Path:
    if final_path(workdir, plan.run).exists():
        return final_path(workdir, plan.run)
    world = world_size_for(spec, device, cpu_processes)
    if world > 1:
        from core.distributed import train_distributed

        train_distributed(world, device.type, reporter, plan=plan, spec=spec, index=index, neighbors=neighbors,
                          tokens=tokens, access=access, workdir=str(workdir))
        return final_path(workdir, plan.run)
    loaded = model_from_spec(spec.model, access=access, device=device, cache_dir=workdir / layout.WEIGHTS_CACHE_DIR,
                             weights_cache=weights_cache)
    return train_run(plan, loaded=loaded, index=index, access=access, neighbors=neighbors, spec=spec,
                     workdir=workdir, reporter=reporter, device=device, tokens=tokens)


def run_job(spec: JobSpec | dict, workdir: Path, *, access: Access | None = None, reporter: Reporter,
            device: str | None = None, mine_only: bool = False, cpu_processes: int = 1,
            weights_cache: Path | None = None, cache: BlobStore | None = None,
            shards: ShardBackend | None = None) -> JobResult:
    """Run the whole job (or only embedding + mining) and write its artifacts under `workdir`.

    `cpu_processes`: DDP processes on a CPU-only machine when the spec does not say; `weights_cache`: where
    open_clip's tagged weights are cached (both from helip's Settings, given by the caller); `cache`: the store
    that holds cached embeddings and hard pairs (core.cache; used unless mining.cache is false); `shards`: who
    mines the shards of a sharded job (core.mining.shards; default: this process, one after the other).
    """
    spec = resolve_spec(spec)
    access = access or Access()
    workdir = Path(workdir)
    (workdir / layout.CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    (workdir / layout.SPEC).write_text(spec.model_dump_json(indent=1))
    reporter.event("job spec resolved", data={"spec": spec.model_dump(mode="json"), "versions": versions(),
                                              "device": str(dev)})

    # Fail fast on the model (an uncached tag offline, a bad checkpoint) before reading any data.
    loaded = model_from_spec(spec.model, access=access, device=dev, cache_dir=workdir / layout.WEIGHTS_CACHE_DIR,
                             weights_cache=weights_cache)
    index = _index(spec, access)
    reporter.event(f"indexed {len(index)} training pairs", data=index.report())

    reporter.stage(Stage.EMBEDDING)
    emb_path = workdir / layout.EMBEDDINGS
    pairs_path = workdir / layout.HARD_PAIRS
    cached = load_embeddings(emb_path, len(index))
    self_miner = spec.mining.encoder == "self"
    # Reached only now, after the model and every data location passed this job's access checks.
    jc = JobCache(cache, reporter, enabled=spec.mining.cache)
    miner = None
    if jc.active and not pairs_path.exists():
        miner = _miner(spec, loaded, access, dev, workdir, weights_cache)
        jc.key_embeddings(spec, miner, index, access, dev)
    if cached is not None:
        jc.restored(EMBEDDINGS)
        reporter.event("embeddings restored from a previous attempt")
    else:
        cached = jc.fetch(EMBEDDINGS, emb_path, lambda p: load_embeddings(p, len(index)))
    if cached is not None:
        emb, valid = cached
        for row in np.flatnonzero(~valid & index.valid_mask()):
            index.mark_bad(int(row), "unreadable image (found while embedding)")
    else:
        miner = miner or _miner(spec, loaded, access, dev, workdir, weights_cache)
        emb = embed_pairs(miner, index, access, device=dev, batch_size=spec.mining.batch_size,
                          workers=resolve_workers(spec.data.workers, dev), precision=spec.train.precision, reporter=reporter,
                          decode=spec.data.decode)
        save_embeddings(emb_path, emb, index.valid_mask())
        reporter.event(f"embedded {emb.report['pairs']} pairs at {emb.report['pairs_per_second']:.0f}/s",
                       data=emb.report)
        jc.put(EMBEDDINGS, emb_path)
    del miner
    # The miner's tokens are the trainer's only when the miner is the model itself.
    tokens = emb.tokens if self_miner else None
    timings["embedding"] = time.perf_counter() - t0
    _check_bad(index, spec, reporter)

    reporter.stage(Stage.MINING)
    t1 = time.perf_counter()
    if pairs_path.exists():
        mined, _ = read_hard_pairs(pairs_path)
        jc.restored(HARD_PAIRS)
        reporter.event("hard pairs restored from a previous attempt")
    elif (hit := jc.fetch(HARD_PAIRS, pairs_path, lambda p: check_pairs(*read_hard_pairs(p), index))) is not None:
        mined = hit
    else:
        mined = _mine(spec, emb.text, emb.image, index.valid_mask(), dev, reporter, shards)
        write_hard_pairs(pairs_path, mined, index.keys)
        reporter.event(f"mined {spec.mining.top_k} hard pairs for {int(index.valid_mask().sum())} pairs "
                       f"({spec.mining.method})", data=mined.report)
        jc.put(HARD_PAIRS, pairs_path)
    timings["mining"] = time.perf_counter() - t1
    artifacts: dict[str, Path] = {"hard_pairs": pairs_path}
    del emb
    if mine_only:
        return JobResult(metrics={}, artifacts=artifacts,
                         summary={"timings": timings, "mining": mined.report, "cache": jc.summary()})

    steps = plan_steps(int(index.valid_mask().sum()), spec)
    every = _eval_every(spec, steps, access)
    # Each run evaluates its final weights while they are in memory (eval_final), and the input model is
    # evaluated now, while it is loaded: the evaluation stage then reloads nothing. The baseline comes
    # first too because it is the reference of every curve the training stage shows.
    runs = [RunPlan("helip", spec.helip.hard_per_target, steps, spec.train.batch_size, every, eval_final=True)]
    if spec.control:
        runs.append(RunPlan("control", 0, steps, spec.train.batch_size, every, eval_final=True))
    _evaluate("baseline", loaded, spec, access, dev, workdir, reporter)
    del loaded
    reporter.stage(Stage.TRAINING)
    t2 = time.perf_counter()
    for plan in runs:
        artifacts[f"checkpoint:{plan.run}"] = _train(plan, spec, index, mined.neighbors, tokens, access, dev,
                                                     workdir, reporter, cpu_processes=cpu_processes,
                                                     weights_cache=weights_cache)
    timings["training"] = time.perf_counter() - t2

    reporter.stage(Stage.EVALUATING)
    t3 = time.perf_counter()
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    models = [("baseline", spec.model.pretrained)] + [(p.run, str(final_path(workdir, p.run))) for p in runs]
    for name, weights in models:
        if layout.eval_cache_path(workdir, name).exists():  # evaluated when its weights were in memory
            metrics[name] = _evaluate(name, None, spec, access, dev, workdir, reporter)
            continue
        m = load_model(spec.model.name, config=spec.model.config, pretrained=weights,
                       access=access if name == "baseline" else Access(), device=dev,
                       cache_dir=workdir / layout.WEIGHTS_CACHE_DIR, weights_cache=weights_cache)
        metrics[name] = _evaluate(name, m, spec, access, dev, workdir, reporter)
        del m
    timings["evaluating"] = time.perf_counter() - t3
    doc = {**metrics, "lift": lift(metrics)}
    if spec.guard is not None:
        selected, curves, artifacts[f"checkpoint:{SELECTED_RUN}"], artifacts["guard_curve"] = _guard(
            spec, workdir, metrics, steps, access, dev, reporter)
        doc["selected"], doc["guard"] = selected, curves
        metrics[SELECTED_RUN] = doc[SELECTED_RUN] = selected["metrics"]
    (workdir / layout.METRICS).write_text(json.dumps(doc, indent=1))
    artifacts["metrics"] = workdir / layout.METRICS
    timings["total"] = time.perf_counter() - t0
    # the lift (boosted minus baseline and minus control) is what a job is for: on the job itself, so a list
    # of jobs or a webhook shows it without a second request; the full metrics are in metrics.json and /metrics
    summary = {"timings": timings, "steps": steps, "mining": mined.report, "data": index.report(),
               "seed": spec.train.seed, "lift": doc["lift"], "eval_every": every, "cache": jc.summary()}
    (workdir / layout.SUMMARY).write_text(json.dumps(summary, indent=1, default=str))
    reporter.event("job finished", data=summary)
    return JobResult(metrics=metrics, artifacts=artifacts, summary=summary)
