"""Real embeddings for the mining benchmark: the synthetic world's base CLIP, scaled up by perturbation.

The seed set is what a HELIP job mines: the demo's synthetic world (5,000 training pairs) embedded by
the demo's base model pretrained on it (both cached, as `helip demo` does). To reach N = 100k or 1M
rows, each seed pair is repeated with Gaussian noise added to both of its embeddings and the rows
renormalised: neighbourhoods keep the structure the model learnt (shapes, colours, captions that
share attributes) instead of planted clusters. The noise is small enough that a copy's nearest rows
are its siblings and the seed's own neighbours' copies, large enough that copies are not duplicates.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("HELIP_BENCH_CACHE", "/tmp/helip-bench"))
NOISE = 0.35  # norm of the added noise relative to the unit embedding (cosine to the seed ~0.94)


def base_embeddings(cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """The world's training pairs embedded by its pretrained base model ([5000, 96] text and image, fp32)."""
    path = cache / "world_base_emb.npz"
    if path.exists():
        with np.load(path) as z:
            return z["text"], z["image"]
    import torch

    from core.data import build_index
    from core.embed import embed_pairs
    from core.io import Access
    from core.models import load_model
    from core.pretrain import pretrain_base
    from core.synth import generate_world
    from helip.demo import DEMO_CONFIG, DEMO_NAME, DEMO_PRETRAIN, DEMO_WORLD

    world = generate_world(cache / "world", **DEMO_WORLD)
    base = pretrain_base(world.train_csv, cache / "base" / f"{DEMO_NAME}.pt", **DEMO_PRETRAIN)
    access = Access()
    loaded = load_model(DEMO_NAME, config=DEMO_CONFIG, pretrained=str(base), access=access)
    index = build_index(str(world.train_csv), access=access)
    emb = embed_pairs(loaded, index, access, device=torch.device("cpu"), batch_size=256, workers=0)
    valid = index.valid_mask()
    text, image = emb.text[valid], emb.image[valid]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, text=text, image=image)
    os.replace(tmp, path)
    return text, image


def scaled_embeddings(n: int, *, seed: int = 0, noise: float = NOISE, cache: Path = CACHE,
                      chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """n rows: the base pairs first (n >= 5000), then perturbed copies of random base pairs (fp32, unit rows)."""
    path = cache / f"world_scaled_{n}_{seed}_{noise}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["text"], z["image"]
    bt, bv = base_embeddings(cache)
    m, d = bt.shape
    rng = np.random.default_rng(seed)
    src = np.concatenate([np.arange(min(m, n)), rng.integers(0, m, size=max(0, n - m))])
    t = np.empty((n, d), dtype=np.float32)
    v = np.empty((n, d), dtype=np.float32)
    scale = np.float32(noise / np.sqrt(d))
    for s in range(0, n, chunk):
        idx = src[s:s + chunk]
        fresh = (np.arange(s, s + len(idx)) >= m)[:, None]  # the base rows stay as the model embedded them
        for out, base in ((t, bt), (v, bv)):
            x = base[idx] + fresh * scale * rng.standard_normal((len(idx), d), dtype=np.float32)
            out[s:s + len(idx)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, text=t, image=v)
    os.replace(tmp, path)
    return t, v


if __name__ == "__main__":
    t, v = base_embeddings()
    print(t.shape, v.shape, t.dtype)
