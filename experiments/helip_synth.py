"""HELIP vs a plain fine-tune of equal length on the synthetic world, over seeds and settings.

    python experiments/helip_synth.py --out runs/experiment      # runs (resumable), then writes the report
    python experiments/helip_synth.py --out runs/experiment --report docs/results.md

One base model is pretrained on the world; it is embedded and mined once (the hard pairs depend on the
base model only); then, for every seed, the control (hard_per_target 0) and each HELIP setting
fine-tune it for the same number of steps at the same batch size, and are evaluated on zero-shot
classification and retrieval. Each run's result is appended to results.jsonl as soon as it ends, so
an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import build_index  # noqa: E402
from core.embed import embed_pairs  # noqa: E402
from core.evaluate import evaluate  # noqa: E402
from core.io import Access  # noqa: E402
from core.mining import mine_exact  # noqa: E402
from core.models import load_model  # noqa: E402
from core.pretrain import TINY_CONFIG, TINY_NAME, pretrain_base  # noqa: E402
from core.progress import CollectingReporter  # noqa: E402
from core.spec import EvalSpec, resolve_spec  # noqa: E402
from core.synth import generate_world  # noqa: E402
from core.train import RunPlan, train_run  # noqa: E402

METRICS = (("shapes", "acc1"), ("shapes", "acc5"), ("retrieval", "image_retrieval_recall@1"),
           ("retrieval", "text_retrieval_recall@1"), ("retrieval", "image_retrieval_recall@5"))


def settings_grid(hards: list[int], gammas: list[float]) -> list[dict]:
    """The control first, then HELIP settings, the largest hard_per_target and middle gamma first: an
    experiment cut short still holds the main comparison on every seed."""
    grid = [{"name": "control", "hard_per_target": 0, "gamma": 0.0}]
    mid = sorted(gammas)[len(gammas) // 2]
    for h in sorted(hards, reverse=True):
        for g in [mid] + [g for g in gammas if g != mid]:
            grid.append({"name": f"helip h={h} gamma={g:g}", "hard_per_target": h, "gamma": g})
    return grid


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = generate_world(out / "world", n_train=args.n_train, seed=0, workers=args.gen_workers)
    base = pretrain_base(world.train_csv, out / "base.pt", steps=args.pretrain_steps, batch_size=128, lr=1e-3,
                         seed=0, device=str(device), workers=args.workers)
    print(f"world + base ready ({time.time() - t0:.0f}s)", flush=True)
    access = Access()
    index = build_index(str(world.train_csv), access=access)
    eval_doc = world.eval_spec()
    eval_doc["linear_probe"] = []          # the probe adds minutes and is not what HELIP targets here
    eval_spec = EvalSpec.model_validate(eval_doc)
    pairs_file = out / "neighbors.pt"
    if pairs_file.exists():
        neighbors = torch.load(pairs_file, weights_only=True).numpy()
    else:
        loaded = load_model(TINY_NAME, config=TINY_CONFIG, pretrained=str(base), device=device)
        emb = embed_pairs(loaded, index, access, device=device, batch_size=256, workers=args.workers)
        mined = mine_exact(torch.from_numpy(emb.text), torch.from_numpy(emb.image), top_k=50,
                           valid=index.valid_mask(), device=device)
        neighbors = mined.neighbors
        torch.save(torch.from_numpy(neighbors), pairs_file)
        torch.save(torch.from_numpy(emb.tokens), out / "tokens.pt")
    tokens_file = out / "tokens.pt"  # absent for an experiment started before tokens were kept
    tokens = torch.load(tokens_file, weights_only=True).numpy() if tokens_file.exists() else None
    results_file = out / "results.jsonl"
    done = {(r["setting"], r["seed"]) for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.exists() else set()

    def record(row: dict) -> None:
        with results_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if ("baseline", 0) not in done:
        loaded = load_model(TINY_NAME, config=TINY_CONFIG, pretrained=str(base), device=device)
        res = evaluate(loaded.model, loaded.preprocess_val, loaded.tokenizer, eval_spec, access=access, device=device,
                       workers=args.workers)
        record({"setting": "baseline", "seed": 0, "metrics": res, "seconds": 0})

    for s in settings_grid(args.hard, args.gamma):
        for seed in args.seeds:
            if (s["name"], seed) in done:
                continue
            t1 = time.time()
            spec = resolve_spec({
                "model": {"name": TINY_NAME, "config": TINY_CONFIG, "pretrained": str(base)},
                "data": {"train": str(world.train_csv), "workers": args.workers},
                "helip": {"hard_per_target": s["hard_per_target"], "gamma": s["gamma"], "sample_from": 50,
                          "dedupe_captions": not args.no_dedupe},
                "train": {"batch_size": args.batch_size, "lr": args.lr, "warmup": 0.05, "seed": seed,
                          "checkpoint_every": 10**9, "log_every": 50},
            })
            loaded = load_model(TINY_NAME, config=TINY_CONFIG, pretrained=str(base), device=device)
            workdir = out / "runs" / f"{s['name'].replace(' ', '_')}_seed{seed}"
            rep = CollectingReporter()
            plan = RunPlan(s["name"].split()[0], s["hard_per_target"], args.steps, args.batch_size)
            train_run(plan, loaded=loaded, index=index, access=access, neighbors=neighbors, spec=spec,
                      workdir=workdir, reporter=rep, device=device, tokens=tokens)
            res = evaluate(loaded.model, loaded.preprocess_val, loaded.tokenizer, eval_spec, access=access,
                           device=device, workers=args.workers)
            record({"setting": s["name"], "seed": seed, "metrics": res, "seconds": time.time() - t1,
                    "sampler": rep.events[-1]["data"].get("sampler"), "final_loss": rep.steps[-1]})
            print(f"{s['name']:24s} seed {seed}: acc1 {res['shapes']['acc1']:.4f} "
                  f"R@1 {res['retrieval']['image_retrieval_recall@1']:.4f} ({time.time() - t1:.0f}s)", flush=True)
    print(f"experiment done ({time.time() - t0:.0f}s)", flush=True)


def report(out: Path, dest: Path | None, args: argparse.Namespace) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], {})[r["seed"]] = r["metrics"]
    base = by.pop("baseline")[0]
    control = by.get("control", {})
    lines = [f"| setting | {' | '.join(f'{d} {m}' for d, m in METRICS)} | ahead of control (acc1 / R@1) |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    lines.append("| baseline (input model) | " + " | ".join(f"{base[d][m]:.4f}" for d, m in METRICS) + " | |")
    for name, seeds in by.items():
        cells = []
        for d, m in METRICS:
            vals = [seeds[s][d][m] for s in sorted(seeds)]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}")
        wins = ""
        if name != "control":
            common = [s for s in seeds if s in control]
            a = sum(seeds[s]["shapes"]["acc1"] > control[s]["shapes"]["acc1"] for s in common)
            r = sum(seeds[s]["retrieval"]["image_retrieval_recall@1"] > control[s]["retrieval"]["image_retrieval_recall@1"]
                    for s in common)
            wins = f"{a}/{len(common)} / {r}/{len(common)}"
        lines.append(f"| {name} (n={len(seeds)}) | " + " | ".join(cells) + f" | {wins} |")
    per_seed = ["", "Per seed (zero-shot acc1 / image R@1):", "",
                "| setting | " + " | ".join(f"seed {s}" for s in sorted(control)) + " |",
                "|---|" + "---|" * len(control)]
    for name, seeds in by.items():
        per_seed.append(f"| {name} | " + " | ".join(
            f"{seeds[s]['shapes']['acc1']:.4f} / {seeds[s]['retrieval']['image_retrieval_recall@1']:.4f}"
            if s in seeds else "" for s in sorted(control)) + " |")
    text = "\n".join(lines + per_seed)
    if dest is not None:
        doc = dest.read_text() if dest.exists() else ""
        start, end = "<!-- experiment-table:start -->", "<!-- experiment-table:end -->"
        if start in doc and end in doc:
            doc = doc[: doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
        else:
            doc += f"\n{start}\n{text}\n{end}\n"
        dest.write_text(doc)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--n-train", type=int, default=12_000)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps, the same for every run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--hard", type=int, nargs="+", default=[1, 3])
    p.add_argument("--gamma", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    p.add_argument("--no-dedupe", action="store_true")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--gen-workers", type=int, default=1, help="processes generating the world")
    p.add_argument("--report", type=Path, default=None, help="write the table into this Markdown file")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        run(args)
    print(report(Path(args.out), args.report, args))


if __name__ == "__main__":
    main()
