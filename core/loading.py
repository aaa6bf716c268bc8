"""How a job feeds its device: worker count, DataLoader settings, and uint8 images normalised on the device.

On a GPU the workers hand over uint8 images (a quarter of float32's bytes to pin and copy: a 224 px
batch of 1,024 is 154 MB instead of 616 MB) and the division by 255 and the mean/std normalisation
run on the GPU, fused into one kernel. On a CPU the workers keep normalising (they run in parallel
with the step; the main process is the bottleneck there).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

MAX_AUTO_WORKERS = 16


def host_cores() -> int:
    """The cores this process may run on (the cgroup/affinity view, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: torch.device, world_size: int = 1, cores: int | None = None) -> int:
    """`data.workers` when the spec leaves it unset: the cores each process gets, minus the one its own
    main process needs, at least 1 and at most 16 (more rarely helps one GPU: decoding is then not the
    limit). On a CPU the main process computes the step, so the same rule leaves it its core."""
    per_process = (cores or host_cores()) // max(1, world_size)
    return max(1, min(MAX_AUTO_WORKERS, per_process - 1))


def resolve_workers(requested: int | None, device: torch.device, world_size: int = 1) -> int:
    """data.workers as given, or default_workers when the spec leaves it unset."""
    return requested if requested is not None else default_workers(device, world_size)


def make_loader(dataset, *, workers: int, device: torch.device, persistent: bool = False, **kw: Any) -> DataLoader:
    """Every loader of a job: pinned memory on a GPU; with workers, four batches in flight per worker, and
    with `persistent` (a training run's loader, read once per epoch) workers kept alive across passes."""
    extra: dict[str, Any] = {"persistent_workers": persistent, "prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda", **extra, **kw)


def close_loader(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now (not when the garbage collector gets to the loader: a
    cancelled run's traceback keeps it alive)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


@dataclass(frozen=True)
class DeviceNormalize:
    """uint8 [..., 3, H, W] -> float normalised, on whatever device the batch is on."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    # (mean * 255, 1 / (std * 255)) per device, made once: a tensor built from a list on a GPU is a copy the
    # host waits for, which the training step must not do every step
    _consts: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images  # already normalised by the workers
        consts = self._consts.get(images.device)
        if consts is None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
            inv = 1.0 / (torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1) * 255.0)
            consts = self._consts[images.device] = (mean.to(images.device), inv.to(images.device))
        mean, inv = consts
        return ((images.float() - mean) * inv).to(dtype)


def split_normalize(transform: Callable) -> tuple[Callable, DeviceNormalize] | None:
    """(the same transform giving uint8 CHW tensors, the normalisation it left out), or None when the
    transform is not a torchvision Compose ending in ToTensor + Normalize (then it stays as it is)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or not isinstance(steps[-2], T.ToTensor):
        return None
    norm = steps[-1]
    mean = tuple(float(x) for x in torch.as_tensor(norm.mean).flatten())
    std = tuple(float(x) for x in torch.as_tensor(norm.std).flatten())
    return T.Compose([*steps[:-2], T.PILToTensor()]), DeviceNormalize(mean, std)


def device_transform(transform: Callable, device: torch.device, *,
                     uint8: bool | None = None) -> tuple[Callable, DeviceNormalize | None]:
    """The workers' transform and the normalisation left for the device: uint8 transfer on a GPU (or when
    `uint8` says so), the transform unchanged otherwise."""
    if not (device.type == "cuda" if uint8 is None else uint8):
        return transform, None
    split = split_normalize(transform)
    return (transform, None) if split is None else split


class SslViews:
    """Transform giving [3, C, H, W]: the CLIP view and two SimCLR views of the same image (SLIP)."""

    def __init__(self, clip_transform, image_size: int, mean, std):
        from torchvision import transforms as T

        self.clip = clip_transform
        self.aug = T.Compose([
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    def __call__(self, img):
        return torch.stack([self.clip(img), self.aug(img), self.aug(img)])


def ssl_transform(clip_transform, val_transform, model: torch.nn.Module) -> SslViews:
    """The CLIP view and two SimCLR views, normalised as the model's own (validation) transform normalises."""
    norm = next(t for t in val_transform.transforms if type(t).__name__ == "Normalize")
    size: Any = model.visual.image_size  # type: ignore[union-attr]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return SslViews(clip_transform, size, norm.mean, norm.std)
