"""Spherical k-means on the joint embedding [t; v]: what the fast miner's inverted lists and the exact
miner's candidate pass group rows by (inner product on [t; v] = cos_t + cos_v)."""

from __future__ import annotations

import math

import torch


def _assign(x: torch.Tensor, centroids: torch.Tensor, rows: int) -> torch.Tensor:
    """Nearest centroid (largest inner product) of every row, `rows` at a time."""
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], rows):
        out[s:s + rows] = (x[s:s + rows] @ centroids.T).argmax(dim=1)
    return out


def kmeans(t: torch.Tensor, v: torch.Tensor, clusters: int, *, iters: int = 8, sample: int = 64,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [C, 2d] unit rows, assignment [N]) of the rows of [t; v].

    Trained on at most `sample` x C random rows (Lloyd's iterations, an empty cluster reseeded from a
    random training row), then every row assigned once. Deterministic for a seed.
    """
    n = t.shape[0]
    clusters = max(1, min(clusters, n))
    g = torch.Generator().manual_seed(seed)
    m = min(n, sample * clusters)
    train_rows = torch.randperm(n, generator=g)[:m].sort().values.to(t.device)
    x = torch.cat([t[train_rows], v[train_rows]], 1).float()
    centroids = x[torch.randperm(m, generator=g)[:clusters].to(t.device)].clone()
    rows = max(1, (256 * 1024**2) // (4 * clusters))
    for _ in range(iters):
        a = _assign(x, centroids, rows)
        sums = torch.zeros_like(centroids).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=clusters)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            sums[empty] = x[torch.randint(m, (empty.numel(),), generator=g).to(t.device)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    assign = torch.empty(n, dtype=torch.int64, device=t.device)
    chunk = max(1, (256 * 1024**2) // (4 * max(clusters, 2 * t.shape[1])))
    for s in range(0, n, chunk):
        xb = torch.cat([t[s:s + chunk], v[s:s + chunk]], 1).float()
        assign[s:s + chunk] = (xb @ centroids.T).argmax(dim=1)
    return centroids, assign


def default_lists(n: int, per_list: float) -> int:
    """Number of clusters for about `per_list` rows each (at least 1)."""
    return max(1, int(math.ceil(n / per_list)))


def kmeans_two_level(t: torch.Tensor, v: torch.Tensor, clusters: int, *, iters: int = 8, sample: int = 64,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`kmeans` in two levels: about sqrt(clusters) coarse clusters, then each split into its share of
    `clusters` (in proportion to its rows). Training and assigning cost N x 2 sqrt(clusters) products
    instead of N x clusters: what makes thousands of small lists affordable at 1M rows. Same outputs."""
    n = t.shape[0]
    clusters = max(1, min(clusters, n))
    coarse = max(1, round(math.sqrt(clusters)))
    if coarse < 2:
        return kmeans(t, v, clusters, iters=iters, sample=sample, seed=seed)
    _, top = kmeans(t, v, coarse, iters=iters, sample=sample, seed=seed)
    order = torch.sort(top, stable=True).indices
    sizes = torch.bincount(top, minlength=coarse).tolist()
    parts, assign = [], torch.empty(n, dtype=torch.int64, device=t.device)
    start, made = 0, 0
    for j, size in enumerate(sizes):
        if size == 0:
            continue
        rows = order[start:start + size]
        start += size
        c, a = kmeans(t[rows], v[rows], max(1, round(clusters * size / n)), iters=iters, sample=sample,
                      seed=seed + 1 + j)
        parts.append(c)
        assign[rows] = a + made
        made += c.shape[0]
    return torch.cat(parts), assign
