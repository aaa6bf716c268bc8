"""Evaluation of a CLIP model on an EvalSpec: zero-shot classification, image-text retrieval, linear probe."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core.data import ImageListDataset, PairDataset, build_index, collate_images, collate_pairs, read_image_folder
from core.errors import DataError, SpecError
from core.loading import device_transform, make_loader
from core.metrics import linear_probe_metrics, retrieval_metrics, zeroshot_metrics
from core.progress import Reporter

if TYPE_CHECKING:
    from core.io import Access
    from core.spec import EvalSpec

RETRIEVAL_KS = (1, 5, 10)
# Prompts tokenised and encoded per forward pass when building a zero-shot classifier.
_TEXT_BATCH = 1024


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA ("auto" means bf16 there); on CPU always fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    dtypes = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16,
              "pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of auto, fp32, bf16, fp16, pure_bf16, pure_fp16; got {precision!r}")
    return dtypes[precision]


@contextmanager
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    dtype = _autocast_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """model.eval() inside; afterwards every submodule gets back its own previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _encode_texts(model, tokenizer, texts: Sequence[str], device: torch.device, precision: str,
                  batch_size: int = _TEXT_BATCH) -> torch.Tensor:
    """L2-normalised text features [len(texts), D] on the CPU, in float32."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        with _autocast(device, precision):
            feats = model.encode_text(tokens)
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                        device, *, precision: str = "fp32") -> torch.Tensor:
    """[D, C] zero-shot weights: per class the mean of its normalised template embeddings, renormalised.

    This is CLIP's prompt ensembling; a template names the class as "{c}".
    """
    device = torch.device(device)
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    feats = _encode_texts(model, tokenizer, prompts, device, precision)
    per_class = feats.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T.contiguous()


def _unpack(batch: Any) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(images, labels-or-rows, n_bad) from a `collate_pairs` dict, a `collate_images` dict or an
    (images, labels) tuple."""
    if isinstance(batch, dict):
        if "rows" in batch:
            ids, n_bad = batch["rows"], len(batch.get("bad_rows", ()))
        else:
            ids, n_bad = batch["labels"], int(batch.get("skipped", 0))
        ids = torch.as_tensor(ids, dtype=torch.long)
        return (batch["images"] if len(ids) else None), ids, n_bad
    images, labels = batch[0], torch.as_tensor(batch[1], dtype=torch.long)
    return (images if len(labels) else None), labels, 0


@torch.no_grad()
def encode_images(model, loader: Iterable, device, *, precision: str = "fp32",
                  progress: Callable[[int], None] | None = None,
                  normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features [N, D] (CPU, float32) and the batches' labels (or rows) [N].

    `loader` yields `collate_pairs` dicts (rows come back), `collate_images` dicts or (images,
    labels) tuples; batches with no readable image are skipped. `progress(n)` is told how many
    items each batch consumed, bad ones included. `normalize`: applied on the device to uint8 images
    (core.loading.DeviceNormalize). Features stay on the device until the end (one wait, not one a batch).
    """
    device = torch.device(device)
    feats, labels = [], []
    for batch in loader:
        images, ids, n_bad = _unpack(batch)
        if images is not None and len(ids):
            images = images.to(device, non_blocking=True)
            with _autocast(device, precision):
                f = model.encode_image(normalize(images) if normalize is not None else images)
            feats.append(F.normalize(f.float(), dim=-1))
            labels.append(ids)
        if progress is not None:
            progress(len(ids) + n_bad)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats).cpu(), torch.cat(labels)


@dataclass
class _Task:
    """One evaluation data set, listed (not yet read): what to run and how many items it holds."""

    name: str
    size: int
    run: Callable[[], dict[str, float]]


class _Evaluator:
    """Holds what every data set shares (model, transform, loader settings, progress) for one evaluate() call."""

    def __init__(self, model, preprocess, tokenizer, *, access, device, batch_size, workers, precision, reporter):
        self.model, self.tokenizer = model, tokenizer
        self.access, self.device = access, torch.device(device)
        # On a GPU the workers hand over uint8 images and the device normalises them.
        self.preprocess: Any = preprocess
        self.normalize: Any = None
        if preprocess is not None:
            self.preprocess, self.normalize = device_transform(preprocess, self.device)
        self.batch_size, self.workers, self.precision = batch_size, workers, precision
        self.reporter: Reporter | None = reporter
        self.done, self.total = 0, 0

    def tick(self, n: int) -> None:
        self.done += n
        if self.reporter is not None:
            self.reporter.progress("evaluating", self.done, self.total)

    def loader(self, dataset, collate) -> DataLoader:
        return make_loader(dataset, workers=self.workers, device=self.device, batch_size=self.batch_size,
                           collate_fn=collate, shuffle=False)

    def folder_features(self, items: list[tuple[str, int]], root: str, param: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Encode a listed ImageFolder: (features, labels, n_bad)."""
        locations = [loc for loc, _ in items]
        labels = [int(c) for _, c in items]
        dataset = ImageListDataset(locations, labels, self.access, self.preprocess)
        feats, ys = encode_images(self.model, self.loader(dataset, collate_images), self.device,
                                  precision=self.precision, progress=self.tick, normalize=self.normalize)
        if len(ys) == 0:
            raise DataError(f"no image of {root} could be read ({len(items)} listed)", param=param)
        return feats, ys, len(items) - len(ys)

    # ------------------------------------------------------------------ zero-shot

    def zeroshot_task(self, i: int, z) -> _Task:
        param = f"eval.zeroshot.{i}.root"
        items, folders = read_image_folder(z.root, self.access, param=param)
        classnames = list(z.classnames) if z.classnames is not None else list(folders)
        if len(classnames) != len(folders):
            raise SpecError(f"{len(classnames)} classnames given for {len(folders)} class folders in {z.root}",
                            param=f"eval.zeroshot.{i}.classnames")
        bad_templates = [t for t in z.templates if "{c}" not in t]
        if bad_templates:
            raise SpecError(f"every template must name the class as {{c}}; not: {bad_templates[:3]}",
                            param=f"eval.zeroshot.{i}.templates")

        def run() -> dict[str, float]:
            feats, ys, n_bad = self.folder_features(items, z.root, param)
            weights = zeroshot_classifier(self.model, self.tokenizer, classnames, z.templates, self.device,
                                          precision=self.precision)
            return {**zeroshot_metrics(feats @ weights, ys), "n_samples": len(ys), "n_bad": n_bad}

        return _Task(z.name, len(items), run)

    # ------------------------------------------------------------------ retrieval

    def retrieval_task(self, i: int, r) -> _Task:
        param = f"eval.retrieval.{i}.data"
        # The spec leaves the CSV layout open (None): open_clip's defaults then.
        index = build_index(
            r.data, access=self.access,
            csv_img_key=r.csv_img_key if r.csv_img_key is not None else "filepath",
            csv_caption_key=r.csv_caption_key if r.csv_caption_key is not None else "title",
            csv_separator=r.csv_separator if r.csv_separator is not None else "\t",
            param=param,
        )
        valid = np.flatnonzero(np.asarray(index.valid_mask()))
        # An image used by several rows is one image with several captions: rows sharing
        # (source, key) are grouped and the image is read once, from the group's first row.
        group_of: dict[tuple[Any, Any], int] = {}
        row_group = np.array([group_of.setdefault((index.sources[r_], index.keys[r_]), len(group_of))
                              for r_ in valid.tolist()], dtype=np.int64)
        # Group ids are numbered by first appearance, so np.unique's first indices are in group order.
        first_row = valid[np.unique(row_group, return_index=True)[1]]

        def run() -> dict[str, float]:
            if len(valid) == 0:
                raise DataError(f"no readable pair in {r.data} ({len(index.keys)} rows)", param=param)
            dataset = PairDataset(index, self.access, self.preprocess, self.tokenizer, rows=first_row)
            img_feats, img_rows = encode_images(self.model, self.loader(dataset, collate_pairs), self.device,
                                                precision=self.precision, progress=self.tick,
                                                normalize=self.normalize)
            if len(img_rows) == 0:
                raise DataError(f"no image of {r.data} could be read ({len(first_row)} images)", param=param)
            # Image position of each group whose image was read; -1 where it was unreadable.
            group_pos = np.full(len(first_row), -1, dtype=np.int64)
            # first_row ascends (valid does, and groups are numbered by first appearance): a row's group is its rank.
            read_groups = np.searchsorted(first_row, img_rows.numpy())
            group_pos[read_groups] = np.arange(len(read_groups))
            keep = group_pos[row_group] >= 0
            rows = valid[keep]
            texts = [index.captions[int(x)] for x in rows.tolist()]
            txt_feats = _encode_texts(self.model, self.tokenizer, texts, self.device, self.precision)
            t2i = torch.from_numpy(group_pos[row_group[keep]])
            m = retrieval_metrics(img_feats, txt_feats, t2i, texts=texts, ks=RETRIEVAL_KS)
            return {**m, "n_samples": len(rows), "n_bad": len(index.keys) - len(rows)}

        return _Task(r.name, len(first_row), run)

    # ------------------------------------------------------------------ linear probe

    def linear_probe_task(self, i: int, lp) -> _Task:
        p_train, p_test = f"eval.linear_probe.{i}.train", f"eval.linear_probe.{i}.test"
        train_items, train_classes = read_image_folder(lp.train, self.access, param=p_train)
        test_items, test_classes = read_image_folder(lp.test, self.access, param=p_test)
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            # Counts only: folder names are directory contents, which an error message must not reveal.
            raise SpecError(f"{len(unknown)} of the {len(test_classes)} test class folders have no training folder "
                            "of the same name", param=p_test)
        # Folder indices of train and test differ when their class lists differ: map by name.
        to_train = torch.tensor([train_classes.index(c) for c in test_classes], dtype=torch.long)

        def run() -> dict[str, float]:
            xtr, ytr, badtr = self.folder_features(train_items, lp.train, p_train)
            xte, yte, badte = self.folder_features(test_items, lp.test, p_test)
            m = linear_probe_metrics(xtr.to(self.device), ytr, xte.to(self.device), to_train[yte],
                                     epochs=lp.epochs, weight_decay=lp.weight_decay, seed=0)
            return {**m, "n_samples": len(ytr) + len(yte), "n_bad": badtr + badte}

        return _Task(lp.name, len(train_items) + len(test_items), run)


def eval_size(eval_spec: EvalSpec, *, access: Access) -> int:
    """Items one evaluate() call reads (images; pairs for retrieval), from listing the data sets only."""
    ev = _Evaluator(None, None, None, access=access, device="cpu", batch_size=1, workers=0, precision="fp32",
                    reporter=None)
    tasks = [ev.zeroshot_task(i, z) for i, z in enumerate(eval_spec.zeroshot)]
    tasks += [ev.retrieval_task(i, r) for i, r in enumerate(eval_spec.retrieval)]
    tasks += [ev.linear_probe_task(i, lp) for i, lp in enumerate(eval_spec.linear_probe)]
    return sum(t.size for t in tasks)


def evaluate(model, preprocess, tokenizer, eval_spec: EvalSpec, *, access: Access, device,
             batch_size: int = 256, workers: int = 0, precision: str = "fp32",
             reporter: Reporter | None = None) -> dict[str, dict[str, float]]:
    """{dataset name: {metric: value}} for every data set in `eval_spec`, metric names as CLIP_benchmark's.

    Zero-shot: acc1, acc5, mean_per_class_recall. Retrieval: image_retrieval_recall@k and
    text_retrieval_recall@k for k in 1, 5, 10 (with the identical-caption rule of
    `core.metrics.retrieval_metrics`). Linear probe: lp_acc1, lp_acc5, lp_mean_per_class_recall.
    Each dict also holds n_samples (items evaluated: images, pairs for retrieval, train + test
    images for a probe) and n_bad (items skipped as unreadable). The model runs in eval mode and
    gets its previous modes back; `reporter.progress("evaluating", done, total)` counts images read.
    """
    device = torch.device(device)
    model = model.to(device)
    ev = _Evaluator(model, preprocess, tokenizer, access=access, device=device, batch_size=batch_size,
                    workers=workers, precision=precision, reporter=reporter)
    # List every data set first: spec mistakes surface before any encoding, and progress has a total.
    tasks = [ev.zeroshot_task(i, z) for i, z in enumerate(eval_spec.zeroshot)]
    tasks += [ev.retrieval_task(i, r) for i, r in enumerate(eval_spec.retrieval)]
    tasks += [ev.linear_probe_task(i, lp) for i, lp in enumerate(eval_spec.linear_probe)]
    ev.total = sum(t.size for t in tasks)
    results: dict[str, dict[str, float]] = {}
    with eval_mode(model), torch.no_grad():
        for task in tasks:
            results[task.name] = task.run()
    return results
