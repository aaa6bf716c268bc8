"""Why a base model's zero-shot accuracy on "<colour> <shape>" is what it is: does its image tower see shape?

    python experiments/shape_diagnostics.py --world runs/final/world \\
        --model tiny=runs/vit/base.pt --model tiny-rn16=runs/final/base.pt

For each (architecture, checkpoint) it prints:
- zero-shot acc1 on the 48 classes, split into "colour right" and "shape right" (chance 1/8, 1/6);
- a linear probe for the 6 shapes on the frozen image features (the probe split: is shape in the
  features at all, aligned with text or not?);
- how fast the same image tower learns shape with shape labels (supervised, from the checkpoint and
  from random weights): the upper bound on what any fine-tune of a few hundred steps can teach it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helip_synth import MODELS, attribute_accuracy, folder_features  # noqa: E402

from core.evaluate import eval_mode  # noqa: E402
from core.io import Access  # noqa: E402
from core.models import load_model  # noqa: E402
from synthworld.world import SHAPES, load_world  # noqa: E402


def shape_probe(loaded, world, access: Access) -> float:
    """Multinomial logistic regression (L-BFGS, small L2) from frozen image features to the 6 shapes."""
    cpu = torch.device("cpu")
    with eval_mode(loaded.model):
        xtr, ytr, folders = folder_features(loaded, world.probe_train, access, cpu)
        xte, yte, _ = folder_features(loaded, world.probe_test, access, cpu)
    shape_of = torch.tensor([SHAPES.index(f.split("_")[1]) for f in folders])
    ytr, yte = shape_of[ytr], shape_of[yte]
    w = torch.zeros(xtr.shape[1], len(SHAPES), requires_grad=True)
    b = torch.zeros(len(SHAPES), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w * 10 + b, ytr) + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xte @ w * 10 + b).argmax(1) == yte).float().mean().item()


def _train_images(world, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image with its main object's shape, read from the shards' metadata."""
    xs, ys = [], []
    for shard in sorted(Path(world.root, "train-shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in sorted(members.items()):
                if name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    jpg = tar.extractfile(members[name[:-5] + ".jpg"]).read()
                    xs.append(preprocess(Image.open(io.BytesIO(jpg)).convert("RGB")))
                    ys.append(SHAPES.index(meta["shape"]))
    return torch.stack(xs), torch.tensor(ys)


def supervised_shape_curve(loaded, world, steps: int, seed: int = 0) -> list[tuple[int, float]]:
    """Train the image tower + a linear head on shape labels (batch 128, AdamW 3e-4); held-out accuracy."""
    torch.manual_seed(seed)
    x, y = _train_images(world, loaded.preprocess_val)
    n_test = len(x) // 8
    xtr, ytr, xte, yte = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    tower = loaded.model.visual
    tower.train()
    head = torch.nn.Linear(loaded.model.text_projection.shape[1], len(SHAPES))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=3e-4)
    curve = []
    for step in range(steps + 1):
        if step % 100 == 0:
            tower.eval()
            with torch.no_grad():
                curve.append((step, (head(tower(xte)).argmax(1) == yte).float().mean().item()))
            tower.train()
        if step == steps:
            break
        idx = torch.randint(0, len(xtr), (128,))
        loss = F.cross_entropy(head(tower(xtr[idx])), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--model", action="append", required=True, help="ARCH=CHECKPOINT (ARCH: a key of MODELS)")
    p.add_argument("--steps", type=int, default=300, help="supervised steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    world, access = load_world(args.world), Access()
    for item in args.model:
        key, _, ckpt = item.partition("=")
        name, config = MODELS[key]
        t0 = time.time()
        loaded = load_model(name, config=config, pretrained=ckpt, device=torch.device("cpu"))
        loaded.model.eval()
        attrs = attribute_accuracy(loaded, world, access, torch.device("cpu"), 0)
        probe = shape_probe(loaded, world, access)
        print(f"{key} {ckpt}: zero-shot colour right {attrs['colour_acc']:.3f}, shape right {attrs['shape_acc']:.3f}; "
              f"linear probe for shape {probe:.3f} (chance {1 / len(SHAPES):.3f})", flush=True)
        for start in ("checkpoint", "random weights"):
            fresh = load_model(name, config=config, pretrained=ckpt if start == "checkpoint" else None,
                               device=torch.device("cpu"))
            curve = supervised_shape_curve(fresh, world, args.steps)
            print(f"  supervised shape accuracy from {start}: "
                  + ", ".join(f"{acc:.3f} @ {s}" for s, acc in curve), flush=True)
        print(f"  ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
