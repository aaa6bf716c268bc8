"""Embeddings for the mining benchmark: the synthetic world's base CLIP scaled up by perturbation, or planted clusters.

The seed set is what a HELIP job mines: a synthetic world of 5,000 training pairs embedded by the
demo's base architecture pretrained on it for 500 steps (both cached; the sizes are the benchmark's
own, SEED_WORLD and SEED_PRETRAIN, so the demo can change without changing these figures). To reach N = 100k or 1M
rows, each seed pair is repeated with Gaussian noise added to both of its embeddings and the rows
renormalised: neighbourhoods keep the structure the model learnt (shapes, colours, captions that
share attributes) instead of planted clusters. The noise is small enough that a copy's nearest rows
are its siblings and the seed's own neighbours' copies, large enough that copies are not duplicates.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

CACHE = Path(os.environ.get("HELIP_BENCH_CACHE", "/tmp/helip-bench"))
DUP_FRACTION = 0.01  # planted near-duplicate images (cosine ~0.99 to another row)
SAME_CAPTION_FRACTION = 0.01  # planted pairs sharing one caption (identical text embedding)
NOISE = 0.35  # norm of the added noise relative to the unit embedding (cosine to the seed ~0.94)
SEED_WORLD = {"n_train": 5000, "image_size": 32, "seed": 0}
SEED_PRETRAIN_STEPS = 500


def base_embeddings(cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """The world's training pairs embedded by its pretrained base model ([5000, d] text and image, fp32)."""
    path = cache / "world_base_emb.npz"
    if path.exists():
        with np.load(path) as z:
            return z["text"], z["image"]
    from core.data import build_index
    from core.embed import embed_pairs
    from core.io import Access
    from core.models import load_model
    from helip.demo import DEMO_CONFIG, DEMO_NAME, DEMO_PRETRAIN
    from synthworld.pretrain import pretrain_base
    from synthworld.world import generate_world

    world = generate_world(cache / "world", **SEED_WORLD)
    base = pretrain_base(world.train_csv, cache / "base" / f"{DEMO_NAME}.pt",
                         **{**DEMO_PRETRAIN, "steps": SEED_PRETRAIN_STEPS})
    access = Access()
    loaded = load_model(DEMO_NAME, config=DEMO_CONFIG, pretrained=str(base), access=access)
    index = build_index(str(world.train_csv), access=access)
    emb = embed_pairs(loaded, index, access, device=torch.device("cpu"), batch_size=256, workers=0)
    valid = index.valid_mask()
    text, image = emb.text[valid].astype(np.float32), emb.image[valid].astype(np.float32)
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


def synthetic_embeddings(n: int, d: int = 512, *, seed: int = 0, per_cluster: int = 100,
                         chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, L2-normalised text and image embeddings [n, d] (float32), correlated with each other.

    Cluster centres of images lean towards their text centres (a shared CLIP space); within a cluster
    a pair sits at cosine ~0.6 to its centre. A few rows are planted near-duplicate images and a few
    share a caption, so HELIP's filters have something to filter. Generated in chunks (1M x 512 x 2
    is 4 GB: no float64 copy of it is ever made).
    """
    rng = np.random.default_rng(seed)
    clusters = max(8, n // per_cluster)
    ct = rng.standard_normal((clusters, d), dtype=np.float32)
    ct /= np.linalg.norm(ct, axis=1, keepdims=True)
    cv = 0.6 * ct + 0.8 * rng.standard_normal((clusters, d), dtype=np.float32) / math.sqrt(d)
    cv /= np.linalg.norm(cv, axis=1, keepdims=True)
    assign = rng.integers(0, clusters, size=n)
    t = np.empty((n, d), dtype=np.float32)
    v = np.empty((n, d), dtype=np.float32)
    sigma = np.float32(1.2 / math.sqrt(d))
    for s in range(0, n, chunk):
        a = assign[s:s + chunk]
        for out, centre in ((t, ct), (v, cv)):
            x = centre[a] + sigma * rng.standard_normal((len(a), d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s:s + chunk] = x
    src = rng.integers(0, n, size=int(n * DUP_FRACTION))
    dst = rng.integers(0, n, size=len(src))
    v[dst] = v[src] + np.float32(0.1 / math.sqrt(d)) * rng.standard_normal((len(src), d), dtype=np.float32)
    v[dst] /= np.linalg.norm(v[dst], axis=1, keepdims=True)
    src = rng.integers(0, n, size=int(n * SAME_CAPTION_FRACTION))
    dst = rng.integers(0, n, size=len(src))
    t[dst] = t[src]
    return t, v


def synthetic_embeddings_torch(n: int, d: int = 512, *, seed: int = 0, device: str | torch.device = "cuda",
                               dtype: torch.dtype = torch.float16, per_cluster: int = 100,
                               chunk: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """`synthetic_embeddings`' recipe generated on the device (3.3M x 512 in seconds on a GPU), in `dtype`."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    clusters = max(8, n // per_cluster)
    ct = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g, device=dev), dim=1)
    noise = torch.randn(clusters, d, generator=g, device=dev) / math.sqrt(d)
    cv = torch.nn.functional.normalize(0.6 * ct + 0.8 * noise, dim=1)
    assign = torch.randint(0, clusters, (n,), generator=g, device=dev)
    t = torch.empty(n, d, dtype=dtype, device=dev)
    v = torch.empty(n, d, dtype=dtype, device=dev)
    sigma = 1.2 / math.sqrt(d)
    for s in range(0, n, chunk):
        a = assign[s:s + chunk]
        for out, centre in ((t, ct), (v, cv)):
            x = centre[a] + sigma * torch.randn(len(a), d, generator=g, device=dev)
            out[s:s + chunk] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    src = torch.randint(0, n, (int(n * DUP_FRACTION),), generator=g, device=dev)
    dst = torch.randint(0, n, (len(src),), generator=g, device=dev)
    noisy = v[src].float() + 0.1 / math.sqrt(d) * torch.randn(len(src), d, generator=g, device=dev)
    v[dst] = torch.nn.functional.normalize(noisy, dim=1).to(dtype)
    src = torch.randint(0, n, (int(n * SAME_CAPTION_FRACTION),), generator=g, device=dev)
    dst = torch.randint(0, n, (len(src),), generator=g, device=dev)
    t[dst] = t[src]
    return t, v


if __name__ == "__main__":
    t, v = base_embeddings()
    print(t.shape, v.shape, t.dtype)
