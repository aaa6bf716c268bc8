"""One optimizer step's forward and backward: the whole batch is one contrastive batch, also when accumulating.

With `accum` micro-batches this is open_clip's --accum-freq: every micro-batch is first encoded without
gradients (features cached), then each micro-batch is encoded again with gradients and the loss over the
whole batch (its live features, the others' cached ones) is backpropagated. The gradients add up to the
gradient of the whole batch; memory is that of one micro-batch plus the cached features.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

FEATURE_KEYS = ("image", "text", "ssl1", "ssl2")


def micro_slices(batch_len: int, accum: int, group: int) -> list[slice]:
    """Split a batch into `accum` micro-batches on group boundaries (a target stays with its hard pairs)."""
    groups = batch_len // group
    if accum <= 1 or groups < accum:
        return [slice(0, batch_len)]
    per = groups // accum
    cuts = [i * per * group for i in range(accum)] + [batch_len]
    return [slice(cuts[i], cuts[i + 1]) for i in range(accum)]


def forward_features(model, images: torch.Tensor, texts: torch.Tensor, *, ssl: bool) -> dict[str, torch.Tensor]:
    """The model's outputs by name: image, text, scale, bias (SigLIP) and, with ssl, the two SimCLR views."""
    n = images.shape[0]
    out = model(images.flatten(0, 1) if ssl else images, texts)
    if isinstance(out, dict):
        img, txt, scale, bias = out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    else:
        img, txt, scale = out[0], out[1], out[2]
        bias = out[3] if len(out) > 3 else None
    feats = {"text": txt, "scale": scale}
    if bias is not None:
        feats["bias"] = bias
    if ssl:
        views = img.view(n, 3, -1)
        feats.update(image=views[:, 0], ssl1=views[:, 1], ssl2=views[:, 2])
    else:
        feats["image"] = img
    return feats


@dataclass
class StepLoss:
    """The loss of one batch from its features: the HELIP (or SigLIP) terms and the optional SimCLR term."""

    loss_fn: torch.nn.Module
    ssl_fn: torch.nn.Module | None = None
    ssl_weight: float = 0.0

    def __call__(self, feats: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        terms = self.loss_fn(feats["image"], feats["text"], feats["scale"], mask, logit_bias=feats.get("bias"))
        if self.ssl_fn is not None:
            terms["ssl_loss"] = self.ssl_weight * self.ssl_fn(feats["ssl1"], feats["ssl2"])
        return terms


def _spread(live: torch.Tensor, k: int) -> torch.Tensor:
    """`live`'s value with 1/k of its gradient: k passes together give a shared parameter its gradient once."""
    return live.detach() + (live - live.detach()) / k


def train_step(model, images: torch.Tensor, texts: torch.Tensor, mask: torch.Tensor | None, slices: list[slice],
               *, step_loss: StepLoss, ssl: bool, autocast: Callable[[], contextlib.AbstractContextManager],
               backward: Callable[[torch.Tensor], None],
               no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, torch.Tensor]:
    """Forward and backward of one batch (gradients accumulate in the parameters); the loss terms' values,
    as detached 0-d tensors on the device: reading them (float) waits for the device, so the caller does
    that only when it logs."""
    if len(slices) == 1:
        with autocast():
            terms = step_loss(forward_features(model, images, texts, ssl=ssl), mask)
            total = functools.reduce(operator.add, terms.values())  # a Tensor (sum() starts at int 0)
        backward(total)
        return {k: v.detach() for k, v in terms.items()}
    cached = []
    with torch.no_grad():
        for sl in slices:
            with autocast():
                cached.append(forward_features(model, images[sl], texts[sl], ssl=ssl))
    k = len(slices)
    values: dict[str, torch.Tensor] = {}
    for j, sl in enumerate(slices):
        sync = no_sync() if no_sync is not None and j < k - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                live = forward_features(model, images[sl], texts[sl], ssl=ssl)
                feats = {key: torch.cat([live[key] if i == j else c[key] for i, c in enumerate(cached)])
                         for key in FEATURE_KEYS if key in live}
                feats["scale"] = _spread(live["scale"], k)
                if "bias" in live:
                    feats["bias"] = _spread(live["bias"], k)
                terms = step_loss(feats, mask)
                total = functools.reduce(operator.add, terms.values())  # a Tensor (sum() starts at int 0)
            backward(total)
        if j == 0:
            values = {name: v.detach() for name, v in terms.items()}
    return values


class LossWindow:
    """The loss terms of the steps since the last log, summed on the device (no host read per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float().clone()
        self.steps += 1

    def mean(self, logit_scale: torch.Tensor) -> dict[str, float]:
        """The window's mean of each term and of their sum, and the logit scale: one read from the device."""
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names] + [logit_scale.float().reshape(())]).tolist()
        out = {k: v / max(self.steps, 1) for k, v in zip(names, values[:-1], strict=True)}
        out["loss"] = sum(out.values())
        out["logit_scale"] = values[-1]
        self.sums, self.steps = {}, 0
        return out


def compile_failure(exc: BaseException) -> bool:
    """An error raised by torch.compile's machinery (dynamo, inductor, a missing compiler), not by the model."""
    return any(type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
               for e in (exc, exc.__cause__, exc.__context__) if e is not None)
