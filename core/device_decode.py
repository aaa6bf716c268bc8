"""JPEG decoding on the device: the workers only read bytes, the main process decodes a whole batch at once
(torchvision.io.decode_jpeg: nvJPEG on a GPU) and applies the geometric part of the model's transform there.

Why: on a GPU host the CPU decode is the limit of a job (16 cores decode about 5,000 224 px JPEGs a second;
ViT-B-32 encodes 22,700). The split of the work:
- worker: read the bytes (grouped reads), look at the JPEG header with PIL (format, mode, size: the same
  limits as the CPU path, so a decompression bomb never reaches the decoder), and send the bytes; any
  image that is not a baseline RGB/greyscale JPEG is decoded on the CPU as before (uint8, same geometry);
- main process: decode_jpeg on the list, then per image the transform's own Resize / CenterCrop /
  RandomResizedCrop (torchvision transforms accept tensors on any device), then DeviceNormalize.
An image the device cannot decode is a bad sample with its reason, like on the CPU path.
Pixels differ from PIL's by resampling rounding only (tested: mean absolute difference under 1.5 of 255).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.loading import DeviceNormalize, device_transform, split_normalize

DEVICE_GEOMETRY = ("Resize", "CenterCrop", "RandomResizedCrop")
SKIPPED_ON_DEVICE = ("MaybeConvertMode", "_convert_to_rgb")  # decode_jpeg(mode=RGB) already gives RGB


@dataclass(frozen=True)
class DeviceDecode:
    """What the main process applies to a batch's JPEG bytes: the geometry, then the normalisation."""

    geometry: Callable[[torch.Tensor], torch.Tensor]
    normalize: DeviceNormalize


def plan_device_decode(transform: Callable) -> tuple[Callable, DeviceDecode] | None:
    """(the workers' uint8 transform for images decoded on the CPU, the device's part), or None when the
    transform has steps the device path does not know (then everything is decoded by the workers)."""
    from torchvision import transforms as T

    split = split_normalize(transform)
    if split is None:
        return None
    uint8_tf, normalize = split
    geometry = []
    for step in list(transform.transforms)[:-2]:  # type: ignore[attr-defined]
        name = step.__name__ if isinstance(step, types.FunctionType) else type(step).__name__
        if name in SKIPPED_ON_DEVICE:
            continue
        if name not in DEVICE_GEOMETRY:
            return None
        geometry.append(step)
    return uint8_tf, DeviceDecode(T.Compose(geometry), normalize)


def assemble(batch: dict[str, Any], decode: DeviceDecode, device: torch.device,
             out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[tuple[int, str]], torch.Tensor]:
    """The batch's normalised images on `device`, in batch order: the workers' uint8 images and the JPEGs
    decoded here. Returns (images, bad (row, reason) found while decoding, keep: bool [B] of the samples
    kept). `batch` comes from collate_pairs with `jpegs` / `jpeg_pos` / `image_pos`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    n = len(batch["rows"])
    jpegs, jpeg_pos = batch.get("jpegs", []), batch.get("jpeg_pos", [])
    decoded: list[torch.Tensor | None]
    if jpegs:
        try:
            decoded = list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the batch call: find it
            decoded = []
            for data in jpegs:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
    else:
        decoded = []
    keep = torch.ones(n, dtype=torch.bool)
    bad = []
    parts: list[torch.Tensor | None] = [None] * n
    for pos, img in zip(jpeg_pos, decoded, strict=True):
        if img is None:
            keep[pos] = False
            bad.append((int(batch["rows"][pos]), "corrupt image"))
        else:
            parts[pos] = decode.geometry(img)
    if len(batch.get("image_pos", [])):
        cpu = batch["images"].to(device, non_blocking=True)
        for i, pos in enumerate(batch["image_pos"]):
            parts[pos] = cpu[i]
    kept = [p for p in parts if p is not None]
    images = decode.normalize(torch.stack(kept), out_dtype) if kept else torch.empty(0, device=device)
    return images, bad, keep


def batch_to_device(batch: dict[str, Any], device: torch.device, normalize: DeviceNormalize | None,
                    decode: DeviceDecode | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """(images, texts, rows, bad_rows) of a collate_pairs batch, images normalised on `device`; the rows the
    device could not decode are dropped from all three and added to bad_rows."""
    rows, texts, bad_rows = batch["rows"], batch["texts"], list(batch["bad_rows"])
    if decode is not None and "jpegs" in batch:
        images, found, keep = assemble(batch, decode, device)
        if found:
            rows, texts, bad_rows = rows[keep], texts[keep], bad_rows + found
    else:
        images = batch["images"].to(device, non_blocking=True)
        if normalize is not None:
            images = normalize(images)
    return images, texts.to(device, non_blocking=True), rows, bad_rows


def input_pipeline(transform: Callable, device: torch.device, decode: str = "auto", *,
                   uint8: bool | None = None) -> tuple[Callable, DeviceNormalize | None, DeviceDecode | None]:
    """(the workers' transform, the device's normalisation, the device's decoder) for `data.decode`: JPEGs
    decoded on the device when asked and the transform allows it; else uint8 transfer on a GPU (or when
    `uint8` says so); else the transform as it is."""
    if decode_mode(decode, device):
        planned = plan_device_decode(transform)
        if planned is not None:
            return planned[0], planned[1].normalize, planned[1]
    tf, norm = device_transform(transform, device, uint8=uint8)
    return tf, norm, None


def decode_mode(requested: str, device: torch.device) -> bool:
    """data.decode -> whether JPEGs are decoded on the device: `auto` does it on a GPU."""
    if requested == "auto":
        return device.type == "cuda"
    return requested == "device"
