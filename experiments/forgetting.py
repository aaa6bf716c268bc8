"""Forgetting on the synthetic world, and what the forgetting guard keeps, over seeds.

    python experiments/forgetting.py --out runs/forgetting --report docs/results.md

The base model is the main experiment's architecture (tiny-rn16), pretrained on the whole world
for 500 steps. Fine-tuning sees only the pairs of two shapes (the "target" domain) for a long run at
a high learning rate: zero-shot accuracy on those shapes' 16 classes rises, and on the other 32
classes (the "general" set, what the model knew before) it falls. Each seed is one job through
core.pipeline.run_job: HELIP, the plain fine-tune of the same length (control), evaluation every
few steps, and a guard with objective target/acc1 and protect {general/acc1: max_drop}. Each
seed's result is appended to results.jsonl as soon as it ends (resumable).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.pipeline import run_job  # noqa: E402
from core.progress import CollectingReporter  # noqa: E402
from experiments.helip_synth import MODELS  # noqa: E402
from synthworld.pretrain import pretrain_base  # noqa: E402
from synthworld.world import SHAPES, generate_world  # noqa: E402

TARGET_SHAPES = ("circle", "square")


def subset_csv(world, shapes: tuple[str, ...], dest: Path) -> int:
    """A CSV (absolute image paths) of the training pairs whose image shows one of `shapes`; its size."""
    keep = set()
    for shard in sorted((world.root / "train-shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    if meta["shape"] in shapes:
                        keep.add(meta["key"])
    rows = ["filepath\ttitle"]
    for line in world.train_csv.read_text().splitlines()[1:]:
        path, title = line.split("\t", 1)
        if Path(path).stem in keep:
            rows.append(f"{world.root / path}\t{title}")
    dest.write_text("\n".join(rows) + "\n")
    return len(rows) - 1


def split_zeroshot(world, shapes: tuple[str, ...], out: Path) -> dict[str, list[str]]:
    """Copy the zero-shot folders into target/ (classes with one of `shapes`) and general/ (the others)."""
    names: dict[str, list[str]] = {"target": [], "general": []}
    for cls in world.classnames:  # "<colour> <shape>", in folder order
        part = "target" if cls.split()[1] in shapes else "general"
        src = Path(world.zeroshot_root) / cls.replace(" ", "_")
        dst = out / part / src.name
        if not dst.exists():
            shutil.copytree(src, dst)
        names[part].append(cls)
    return names


def job_spec(args, name, config, base: Path, train_csv: Path, eval_root: Path, classes, world, seed: int) -> dict:
    zs = [{"name": part, "root": str(eval_root / part), "classnames": classes[part], "templates": list(world.templates)}
          for part in ("target", "general")]
    return {
        "model": {"name": name, "config": config, "pretrained": str(base)},
        "data": {"train": str(train_csv), "workers": args.workers},
        "mining": {"top_k": 50, "method": "exact"},
        "helip": {"hard_per_target": 3, "sample_from": 50, "gamma": 0.3},
        "train": {"max_steps": args.steps, "epochs": 1000, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup": 0.05, "seed": seed, "checkpoint_every": 10**6, "log_every": 50},
        "eval": {"zeroshot": zs, "every": args.eval_every},
        "control": True,
        "guard": {"wise_alphas": args.alphas, "objective": "target/acc1", "protect": {"general/acc1": args.max_drop}},
    }


def run(args) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = generate_world(out / "world", n_train=args.n_train, zeroshot_per_class=args.zeroshot_per_class, seed=0)
    name, config = MODELS[args.model]
    train_csv = out / "target_train.csv"
    n = subset_csv(world, TARGET_SHAPES, train_csv)
    if args.base_sees_target:
        base = pretrain_base(world.train_csv, out / "base.pt", steps=args.pretrain_steps, batch_size=128, lr=1e-3,
                             seed=0, config=config, name=name, workers=args.workers)
    else:  # the target shapes are new to the base: what fine-tuning teaches, and what it makes the base forget
        general_csv = out / "general_train.csv"
        subset_csv(world, tuple(s for s in SHAPES if s not in TARGET_SHAPES), general_csv)
        base = pretrain_base(general_csv, out / "base_general.pt", steps=args.pretrain_steps, batch_size=128,
                             lr=1e-3, seed=0, config=config, name=name, workers=args.workers)
    classes = split_zeroshot(world, TARGET_SHAPES, out / "eval")
    print(f"world, base, {n} target pairs ready ({time.time() - t0:.0f}s)", flush=True)
    results = out / "results.jsonl"
    done = {json.loads(x)["seed"] for x in results.read_text().splitlines()} if results.exists() else set()
    for seed in args.seeds:
        if seed in done:
            continue
        t1 = time.time()
        spec = job_spec(args, name, config, base, train_csv, out / "eval", classes, world, seed)
        rep = CollectingReporter()
        run_job(spec, out / f"seed{seed}", reporter=rep)
        doc = json.loads((out / f"seed{seed}" / "metrics.json").read_text())
        curves = {r: [[s["step"], s["target/acc1"], s["general/acc1"]] for s in rep.steps
                      if s["run"] == r and "target/acc1" in s] for r in ("helip", "control")}
        row = {"seed": seed, "seconds": time.time() - t1, "pairs": n, "steps": args.steps,
               "metrics": {k: doc[k] for k in ("baseline", "control", "helip")},
               "selected": doc["selected"], "guard": doc["guard"], "curves": curves}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        sel = doc["selected"]
        print(f"seed {seed}: target {doc['baseline']['target']['acc1']:.3f} -> helip {doc['helip']['target']['acc1']:.3f}"
              f" / selected {sel['metrics']['target']['acc1']:.3f}; general {doc['baseline']['general']['acc1']:.3f} ->"
              f" {doc['helip']['general']['acc1']:.3f} / {sel['metrics']['general']['acc1']:.3f} ({sel['source']},"
              f" step {sel['step']}, alpha {sel['alpha']}) ({time.time() - t1:.0f}s)", flush=True)


def report(results: Path, dest: Path | None, max_drop: float, table: str = "forgetting-table") -> str:
    """The forgetting table (mean ± sd over seeds); written between the `table` markers in `dest`."""
    rows = [json.loads(x) for x in results.read_text().splitlines()]

    def cell(vals: list[float]) -> str:
        return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f}"

    def model_vals(get) -> tuple[list[float], list[float]]:
        return [get(r)["target"]["acc1"] for r in rows], [get(r)["general"]["acc1"] for r in rows]

    base_t, base_g = model_vals(lambda r: r["metrics"]["baseline"])
    lines = ["| model | target acc1 (16 classes) | general acc1 (32 classes, protected) | general drop | "
             f"within bound ({max_drop:g}) |", "|---|---|---|---|---|"]
    for label, get in (("input model", lambda r: r["metrics"]["baseline"]),
                       ("plain fine-tune (control), final", lambda r: r["metrics"]["control"]),
                       ("HELIP, final", lambda r: r["metrics"]["helip"]),
                       ("HELIP + guard, selected", lambda r: r["selected"]["metrics"])):
        t, g = model_vals(get)
        drops = [b - x for b, x in zip(base_g, g, strict=True)]
        within = sum(d <= max_drop + 1e-12 for d in drops)
        lines.append(f"| {label} | {cell(t)} | {cell(g)} | {cell(drops)} | {within}/{len(rows)} |")
    helip_t, _ = model_vals(lambda r: r["metrics"]["helip"])
    sel_t, _ = model_vals(lambda r: r["selected"]["metrics"])
    kept = [(s - b) / (h - b) if h > b else float("nan") for s, b, h in zip(sel_t, base_t, helip_t, strict=True)]
    lines += ["", "Per seed: what the guard selected, and the share of HELIP's target gain it keeps.", "",
              "| seed | selected | target gain kept |", "|---|---|---|"]
    for r, k in zip(rows, kept, strict=True):
        s = r["selected"]
        where = f"WiSE alpha {s['alpha']:g}" if s["source"] == "wise" else f"{s['source']} (step {s['step']})"
        lines.append(f"| {r['seed']} | {where} | {'no gain to keep' if k != k else f'{k:.0%}'} |")
    text = "\n".join(lines)
    if dest is not None:
        doc = dest.read_text()
        start, end = f"<!-- {table}:start -->", f"<!-- {table}:end -->"
        if start in doc and end in doc:
            doc = doc[: doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
        else:
            doc += f"\n{start}\n{text}\n{end}\n"
        dest.write_text(doc)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/forgetting")
    p.add_argument("--n-train", type=int, default=8_000)
    p.add_argument("--zeroshot-per-class", type=int, default=100)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny-rn16")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps of both runs")
    p.add_argument("--base-sees-target", action="store_true",
                   help="pretrain the base on the whole world (default: on the other four shapes only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--max-drop", type=float, default=0.01, help="the guard's bound on general/acc1")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--table", default="forgetting-table", help="the report's marker name in --report")
    args = p.parse_args()
    if not args.report_only:
        run(args)
    print(report(args.results or Path(args.out) / "results.jsonl", args.report, args.max_drop, args.table))


if __name__ == "__main__":
    assert set(TARGET_SHAPES) <= set(SHAPES)
    main()
