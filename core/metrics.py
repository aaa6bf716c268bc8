"""Pure metric math on tensors: zero-shot accuracy, image-text retrieval recall@k, linear probe (CLIP_benchmark names)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Upper bound on the elements of one query-by-item similarity block (512 MiB in fp32): the query
# side is chunked so that 50k x 50k retrieval never holds the full score matrix at once.
_SCORE_BLOCK_ELEMENTS = 1 << 27


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample: is the true label among the k highest logits (bool, [N])."""
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def _mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Recall averaged over the classes that occur in `labels` (sklearn's balanced_accuracy_score)."""
    correct = (pred == labels).to(torch.float64)
    per_class_total = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    per_class_correct = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    per_class_correct.index_add_(0, labels, correct)
    present = per_class_total > 0
    return (per_class_correct[present] / per_class_total[present]).mean().item()


def zeroshot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall of class scores `logits` [N, C] against `labels` [N].

    With fewer than 5 classes, acc5 is top-C accuracy (hence 1.0), so the key is always present
    (CLIP_benchmark writes NaN there instead). mean_per_class_recall averages recall over the classes present
    in `labels`, as CLIP_benchmark (sklearn's balanced accuracy) does; it differs from acc1 when classes are unbalanced.
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N, C] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("zeroshot_metrics needs at least one sample")
    logits = logits.float()
    labels = labels.to(device=logits.device, dtype=torch.long)
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1)
    return {
        "acc1": (pred == labels).double().mean().item(),
        "acc5": _topk_hits(logits, labels, min(5, num_classes)).double().mean().item(),
        "mean_per_class_recall": _mean_per_class_recall(pred, labels, num_classes),
    }


def _caption_sets(
    text_to_image: torch.Tensor,
    n_images: int,
    image_captions: list[list[str]] | None,
    texts: list[str] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Encode the identical-caption rule as integers.

    Returns (text_caption_id [T], image_caption_keys [P]) where a key is caption_id * n_images +
    image: text j and image i are a positive pair when j's caption id times n_images plus i is a
    key. None when neither captions nor texts were given (plain definition).
    """
    if texts is None and image_captions is None:
        return None
    n_texts = int(text_to_image.shape[0])
    if image_captions is not None and len(image_captions) != n_images:
        raise ValueError(f"image_captions has {len(image_captions)} entries for {n_images} images")
    if texts is None:
        # Only the CLIP_benchmark layout can be inferred: texts are the images' captions, in order.
        assert image_captions is not None
        texts = [c for caps in image_captions for c in caps]
        implied = torch.repeat_interleave(torch.tensor([len(c) for c in image_captions], dtype=torch.long))
        if len(texts) != n_texts or not torch.equal(implied, text_to_image.cpu()):
            raise ValueError("image_captions without texts must list every text, image by image, in text order")
    if len(texts) != n_texts:
        raise ValueError(f"texts has {len(texts)} entries for {n_texts} text features")
    if image_captions is None:
        # Each image's captions are the texts that belong to it.
        image_captions = [[] for _ in range(n_images)]
        for t, i in zip(texts, text_to_image.tolist(), strict=True):
            image_captions[i].append(t)
    ids: dict[str, int] = {}
    text_ids = [ids.setdefault(t.strip(), len(ids)) for t in texts]
    pair_keys = {ids.setdefault(c.strip(), len(ids)) * n_images + i for i, caps in enumerate(image_captions) for c in caps}
    return torch.tensor(text_ids, dtype=torch.long), torch.tensor(sorted(pair_keys), dtype=torch.long)


def _any_hit_at_k(
    queries: torch.Tensor,
    items: torch.Tensor,
    ks: Sequence[int],
    is_positive,
) -> dict[int, float]:
    """For each k: fraction of queries with at least one positive among their top-k items.

    `is_positive(query_rows, topk_items)` -> bool [q, kmax]. Queries are processed in chunks so the
    score block stays below _SCORE_BLOCK_ELEMENTS.
    """
    n_q, n_items = queries.shape[0], items.shape[0]
    kmax = min(max(ks), n_items)
    chunk = max(1, _SCORE_BLOCK_ELEMENTS // max(1, n_items))
    hits_by_k = {k: 0 for k in ks}
    for start in range(0, n_q, chunk):
        rows = torch.arange(start, min(start + chunk, n_q), device=queries.device)
        scores = queries[rows] @ items.T
        top = scores.topk(kmax, dim=1).indices
        positive = is_positive(rows, top)
        # A hit at k is a hit at every larger k: cumulative "any" along the ranked list.
        first_hit = positive.cummax(dim=1).values
        for k in ks:
            hits_by_k[k] += int(first_hit[:, min(k, kmax) - 1].sum())
    return {k: hits_by_k[k] / n_q for k in ks}


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    image_captions: list[list[str]] | None = None,
    texts: list[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-text retrieval recall@k with CLIP_benchmark's names and definitions.

    - ``image_retrieval_recall@k`` (text -> image): for each text, is its image among the k images
      most similar to it; averaged over texts.
    - ``text_retrieval_recall@k`` (image -> text): for each image, is at least one of its texts
      among the k texts most similar to it; averaged over images.

    Similarity is the cosine (features are L2-normalised here). `text_to_image[j]` is the image
    index of text j. When k is at least the number of candidates, every query is a hit (CLIP_benchmark
    would fail on topk instead).

    Identical-caption rule (our extension): when `texts` (one per text feature) and/or
    `image_captions` (each image's captions) are given, an image i counts as a positive for text j
    also when one of i's captions is identical to j's caption (exact string after ``strip()``).
    This applies both ways: a retrieved image carrying the query text's caption is a hit, and a
    retrieved text whose caption equals one of the query image's captions is a hit. Identical
    captions are indistinguishable to any text encoder, so without the rule a data set with
    repeated captions caps the metric below 1 for a perfect model. Without texts and captions,
    only the given pairing counts (CLIP_benchmark exactly). `image_captions` without `texts` must
    list the texts image by image in text order (CLIP_benchmark's layout); `texts` without
    `image_captions` groups the texts by `text_to_image`.
    """
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if n_images == 0 or n_texts == 0:
        raise ValueError("retrieval_metrics needs at least one image and one text")
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},), got {tuple(text_to_image.shape)}")
    if min(ks) < 1:
        raise ValueError(f"recall@k needs k >= 1, got {list(ks)}")
    device = image_features.device
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float().to(device), dim=-1)
    t2i = text_to_image.to(device=device, dtype=torch.long)
    if int(t2i.min()) < 0 or int(t2i.max()) >= n_images:
        raise ValueError("text_to_image holds an index outside the images")

    captions = _caption_sets(t2i.cpu(), n_images, image_captions, texts)
    if captions is not None:
        text_cap, pair_keys = captions[0].to(device), captions[1].to(device)

    def text_query_positive(rows: torch.Tensor, top_images: torch.Tensor) -> torch.Tensor:
        pos = top_images == t2i[rows][:, None]
        if captions is not None:
            pos |= torch.isin(text_cap[rows][:, None] * n_images + top_images, pair_keys)
        return pos

    def image_query_positive(rows: torch.Tensor, top_texts: torch.Tensor) -> torch.Tensor:
        pos = t2i[top_texts] == rows[:, None]
        if captions is not None:
            pos |= torch.isin(text_cap[top_texts] * n_images + rows[:, None], pair_keys)
        return pos

    image_recall = _any_hit_at_k(txt, img, ks, text_query_positive)
    text_recall = _any_hit_at_k(img, txt, ks, image_query_positive)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = image_recall[k]
        out[f"text_retrieval_recall@{k}"] = text_recall[k]
    return out


def linear_probe_metrics(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int = 100,
    weight_decay: float = 0.0,
    lr: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Multinomial logistic regression on frozen features; lp_acc1, lp_acc5, lp_mean_per_class_recall on test.

    Features are standardised with the training set's mean and std. The probe is fitted full-batch
    with L-BFGS (strong Wolfe line search; at most `epochs` iterations, fewer once converged; step
    `lr`, default 1.0) on mean cross-entropy + weight_decay * ||W||^2 (the bias is not decayed).
    Deterministic for a given `seed` (which draws the small initial weights) on a given device.
    """
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("linear probe needs at least one training and one test sample")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
    device = train_x.device
    xtr = train_x.float()
    xte = test_x.float().to(device)
    ytr = train_y.to(device=device, dtype=torch.long)
    yte = test_y.to(device=device, dtype=torch.long)
    mean = xtr.mean(dim=0, keepdim=True)
    std = xtr.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    num_classes = int(max(int(ytr.max()), int(yte.max()))) + 1

    gen = torch.Generator(device="cpu").manual_seed(seed)
    weight = (torch.randn(xtr.shape[1], num_classes, generator=gen) * 0.01).to(device).requires_grad_()
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0 if lr is None else lr, max_iter=epochs, history_size=20,
        line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, ytr) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = xte @ weight + bias
    m = zeroshot_metrics(logits, yte)
    return {f"lp_{name}": value for name, value in m.items()}
