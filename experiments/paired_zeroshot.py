"""Is a job's zero-shot gap over its control noise? Per-image predictions of both final checkpoints on the demo's
zero-shot set: each acc1 with its binomial standard error, and the paired (McNemar) standard error of the difference.

    python experiments/paired_zeroshot.py --data-dir .helip --job-dir .helip/store/jobs/<job id>

The README's demo paragraph quotes its output for the demo's job.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helip.entry import configure_process  # noqa: E402  (after the sys.path line: run as a script)

configure_process()  # an entry point: offline hub, quiet random-init warning (before open_clip is imported)

from core.evaluate import eval_mode, zeroshot_classifier  # noqa: E402
from core.io import Access  # noqa: E402
from core.models import load_model  # noqa: E402
from experiments.helip_synth import folder_features  # noqa: E402
from helip.demo import DEMO_CONFIG, DEMO_NAME, DEMO_WORLD  # noqa: E402
from synthworld.world import generate_world  # noqa: E402


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, int, int]:
    """(mean(a) - mean(b), its paired standard error, #a right and b wrong, #b right and a wrong) for two
    boolean vectors of per-image correctness on the same images."""
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    diff = (only_a - only_b) / n
    return diff, math.sqrt(only_a + only_b - (only_a - only_b) ** 2 / n) / n, only_a, only_b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="the demo's data directory (its world is reused)")
    p.add_argument("--job-dir", type=Path, required=True, help="a job's work directory (checkpoints/*_final.pt)")
    args = p.parse_args()
    torch.set_num_threads(1)
    world = generate_world(args.data_dir / "datasets" / "world", **DEMO_WORLD)
    device = torch.device("cpu")
    right = {}
    for run in ("control", "helip"):
        weights = args.job_dir / "checkpoints" / f"{run}_final.pt"
        loaded = load_model(DEMO_NAME, config=DEMO_CONFIG, pretrained=str(weights), device=device)
        with eval_mode(loaded.model):
            feats, labels, _ = folder_features(loaded, world.zeroshot_root, Access(), device)
            classifier = zeroshot_classifier(loaded.model, loaded.tokenizer, world.classnames, world.templates, device)
        right[run] = (feats @ classifier).argmax(dim=1) == labels
        acc = right[run].float().mean().item()
        print(f"{run}: acc1 {acc:.4f} on {len(labels)} images, standard error {math.sqrt(acc * (1 - acc) / len(labels)):.4f}")
    diff, se, only_h, only_c = paired_difference(right["helip"], right["control"])
    print(f"helip right and control wrong: {only_h}; control right and helip wrong: {only_c}")
    print(f"helip - control: {diff:+.4f}, paired standard error {se:.4f} ({diff / se:.1f} standard errors)")


if __name__ == "__main__":
    main()
