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
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helip.entry import configure_process  # noqa: E402  (after the sys.path line: run as a script)

configure_process()  # an entry point: offline hub, quiet random-init warning (before open_clip is imported)

from core.data import (  # noqa: E402
    ImageListDataset,
    build_index,  # noqa: E402
    collate_images,
    read_image_folder,
)
from core.embed import embed_pairs  # noqa: E402
from core.evaluate import encode_images, eval_mode, evaluate, zeroshot_classifier  # noqa: E402
from core.io import Access  # noqa: E402
from core.mining import mine_exact  # noqa: E402
from core.models import load_model  # noqa: E402
from core.progress import CollectingReporter  # noqa: E402
from core.spec import EvalSpec, resolve_spec  # noqa: E402
from core.train import RunPlan, train_run  # noqa: E402
from synthworld.pretrain import TINY_CONFIG, TINY_NAME, pretrain_base  # noqa: E402
from synthworld.world import generate_world  # noqa: E402

# The base models the experiment can use, all with the tests' text tower: the tests' and demo's tiny ViT
# (patch 8: 4 x 4 patches on a 32 px image), the same ViT at patch 4, and small ModifiedResNet towers
# (open_clip's RN layout: a list of `layers` makes a ResNet), which learn shapes much sooner than a ViT.
MODELS = {
    "tiny": (TINY_NAME, TINY_CONFIG),
    "tiny-p4": ("helip-tiny-vit-p4", {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "patch_size": 4}}),
    "tiny-rn16": ("helip-tiny-rn16", {**TINY_CONFIG, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1],
                                                                    "width": 16, "head_width": 32}}),
    "tiny-rn32": ("helip-tiny-rn32", {**TINY_CONFIG, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1],
                                                                    "width": 32, "head_width": 64}}),
}

# (data set, metric, column title) of the report's table.
METRICS = (("shapes", "acc1", "zero-shot acc1"), ("shapes", "acc5", "zero-shot acc5"),
           ("shapes_by_attribute", "shape_acc", "zero-shot shape right"),
           ("retrieval", "image_retrieval_recall@1", "image R@1"), ("retrieval", "text_retrieval_recall@1", "text R@1"),
           ("retrieval", "image_retrieval_recall@5", "image R@5"))


def _value(metrics: dict, dataset: str, metric: str) -> float | None:
    return metrics.get(dataset, {}).get(metric)


def settings_grid(hards: list[int], gammas: list[float], margins: list[float] = (0.0,),
                  control: bool = True, dedupe: bool = True) -> list[dict]:
    """The control first, then HELIP settings, the largest hard_per_target and middle gamma first: an
    experiment cut short still holds the main comparison on every seed. A setting's name carries its
    margin when it is not 0 (gamma 0 makes the margin irrelevant: that setting is run once) and
    "no-dedupe" when caption de-duplication is off (the control has no hard pairs to de-duplicate)."""
    grid = [{"name": "control", "hard_per_target": 0, "gamma": 0.0, "margin": 0.0, "dedupe": True}] if control else []
    mid = sorted(gammas)[len(gammas) // 2]
    for h in sorted(hards, reverse=True):
        for g in [mid] + [g for g in gammas if g != mid]:
            for m in (margins if g > 0 else [0.0]):
                name = f"helip h={h} gamma={g:g}" + (f" m={m:g}" if m else "") + ("" if dedupe else " no-dedupe")
                grid.append({"name": name, "hard_per_target": h, "gamma": g, "margin": m, "dedupe": dedupe})
    return grid


def attribute_scores(pred: list[int], labels: list[int], classnames: list[str]) -> dict[str, float]:
    """How often a predicted "<colour> <shape>" class has the true class's colour, and its shape."""
    if len(pred) != len(labels) or not pred:
        raise ValueError("pred and labels must be non-empty and of one length")
    colour = [c.split()[0] for c in classnames]
    shape = [c.split()[1] for c in classnames]
    pairs = list(zip(pred, labels, strict=True))
    return {"colour_acc": sum(colour[p] == colour[y] for p, y in pairs) / len(pairs),
            "shape_acc": sum(shape[p] == shape[y] for p, y in pairs) / len(pairs)}


@torch.no_grad()
def folder_features(loaded, root: Path | str, access: Access, device: torch.device,
                    workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Normalised image features, labels and class folders of an ImageFolder (call it in eval mode:
    BatchNorm in the ResNet towers must use its running statistics)."""
    items, folders = read_image_folder(str(root), access, param="root")
    dataset = ImageListDataset([loc for loc, _ in items], [c for _, c in items], access, loaded.preprocess_val)
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=collate_images)
    feats, labels = encode_images(loaded.model, loader, device)
    return feats, labels, folders


@torch.no_grad()
def attribute_accuracy(loaded, world, access: Access, device: torch.device, workers: int) -> dict[str, float]:
    """Zero-shot predictions on the 48 "<colour> <shape>" classes, scored per attribute: how often the
    predicted class has the right colour, and how often the right shape (chance: 1/8 and 1/6)."""
    with eval_mode(loaded.model):
        feats, labels, _ = folder_features(loaded, world.zeroshot_root, access, device, workers)
        weights = zeroshot_classifier(loaded.model, loaded.tokenizer, world.classnames, world.templates, device)
    pred = (feats @ weights).argmax(dim=1)
    return attribute_scores(pred.tolist(), labels.tolist(), list(world.classnames))


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = generate_world(out / "world", n_train=args.n_train, zeroshot_per_class=args.zeroshot_per_class, seed=0,
                           workers=args.gen_workers)
    name, config = MODELS[args.model]
    base = pretrain_base(world.train_csv, out / "base.pt", steps=args.pretrain_steps,
                         batch_size=args.pretrain_batch_size, lr=1e-3, seed=0, config=config, name=name,
                         device=str(device), workers=args.workers)
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
        loaded = load_model(name, config=config, pretrained=str(base), device=device)
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

    def evaluate_all(loaded) -> dict:
        res = evaluate(loaded.model, loaded.preprocess_val, loaded.tokenizer, eval_spec, access=access, device=device,
                       workers=args.workers)
        res["shapes_by_attribute"] = attribute_accuracy(loaded, world, access, device, args.workers)
        return res

    if ("baseline", 0) not in done:
        loaded = load_model(name, config=config, pretrained=str(base), device=device)
        record({"setting": "baseline", "seed": 0, "metrics": evaluate_all(loaded), "seconds": 0})

    for s in settings_grid(args.hard, args.gamma, args.margin, control=not args.no_control, dedupe=not args.no_dedupe):
        for seed in args.seeds:
            if (s["name"], seed) in done:
                continue
            t1 = time.time()
            spec = resolve_spec({
                "model": {"name": name, "config": config, "pretrained": str(base)},
                "data": {"train": str(world.train_csv), "workers": args.workers},
                "helip": {"hard_per_target": s["hard_per_target"], "gamma": s["gamma"], "margin": s["margin"],
                          "sample_from": args.sample_from, "dedupe_captions": s["dedupe"]},
                "train": {"batch_size": args.batch_size, "lr": args.lr, "warmup": 0.05, "seed": seed,
                          "checkpoint_every": 10**9, "log_every": 50},
            })
            loaded = load_model(name, config=config, pretrained=str(base), device=device)
            workdir = out / "runs" / f"{s['name'].replace(' ', '_')}_seed{seed}"
            rep = CollectingReporter()
            plan = RunPlan(s["name"].split()[0], s["hard_per_target"], args.steps, args.batch_size)
            train_run(plan, loaded=loaded, index=index, access=access, neighbors=neighbors, spec=spec,
                      workdir=workdir, reporter=rep, device=device, tokens=tokens)
            res = evaluate_all(loaded)
            record({"setting": s["name"], "seed": seed, "metrics": res, "seconds": time.time() - t1,
                    "sampler": rep.events[-1]["data"].get("sampler"), "final_loss": rep.steps[-1]})
            print(f"{s['name']:24s} seed {seed}: acc1 {res['shapes']['acc1']:.4f} "
                  f"R@1 {res['retrieval']['image_retrieval_recall@1']:.4f} ({time.time() - t1:.0f}s)", flush=True)
    print(f"experiment done ({time.time() - t0:.0f}s)", flush=True)


def report(results: Path, dest: Path | None, table: str = "experiment-table") -> str:
    """The results as Markdown tables; with `dest`, also written into that file between the
    `<!-- {table}:start -->` and `<!-- {table}:end -->` markers (appended when it has none)."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], {})[r["seed"]] = r["metrics"]
    base = by.pop("baseline")[0]
    control = by.get("control", {})
    lines = [f"| setting | {' | '.join(title for _, _, title in METRICS)} | ahead of control (acc1 / R@1) |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    lines.append("| baseline (input model) | " + " | ".join(
        f"{v:.4f}" if (v := _value(base, d, m)) is not None else "" for d, m, _ in METRICS) + " | |")
    for name, seeds in by.items():
        cells = []
        for d, m, _ in METRICS:
            vals = [v for s in sorted(seeds) if (v := _value(seeds[s], d, m)) is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}" if vals else "")
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
        start, end = f"<!-- {table}:start -->", f"<!-- {table}:end -->"
        if start in doc and end in doc:
            doc = doc[: doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
        else:
            doc += f"\n{start}\n{text}\n{end}\n"
        dest.write_text(doc)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--n-train", type=int, default=8_000)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny-rn16", help="the base model's architecture")
    p.add_argument("--zeroshot-per-class", type=int, default=100, help="zero-shot test images per class (48 classes)")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--pretrain-batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=500, help="fine-tuning steps, the same for every run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--hard", type=int, nargs="+", default=[1, 3])
    p.add_argument("--gamma", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    p.add_argument("--margin", type=float, nargs="+", default=[0.0], help="helip.margin values (with gamma > 0)")
    p.add_argument("--sample-from", type=int, default=50)
    p.add_argument("--no-control", action="store_true", help="skip the control (already in results.jsonl)")
    p.add_argument("--no-dedupe", action="store_true")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--gen-workers", type=int, default=1, help="processes generating the world")
    p.add_argument("--report", type=Path, default=None, help="write the table into this Markdown file")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--results", type=Path, default=None, help="report this results file (default: OUT/results.jsonl)")
    p.add_argument("--table", default="experiment-table", help="the report's marker name in --report")
    args = p.parse_args()
    if not args.report_only:
        run(args)
    print(report(args.results or Path(args.out) / "results.jsonl", args.report, args.table))


if __name__ == "__main__":
    main()
