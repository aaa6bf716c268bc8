"""The torch datasets over pairs and image folders, and their collate functions (bad samples reported, not raised)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from core import io as dio
from core.decoding import MAX_IMAGE_BYTES, BadSample, decode_image, jpeg_or_none, load_image, read_grouped
from core.errors import DataError, LocationError
from core.index import PairIndex

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")


class PairDataset(torch.utils.data.Dataset):
    """(image, tokens) by row. Position i reads rows[i] when `rows` is given; otherwise position == row,
    which is how the HELIP batch sampler addresses it. A bad sample gives {"bad": (row, reason)}: the
    reason travels with the batch to collate_pairs (also from DataLoader worker processes)."""

    def __init__(self, index: PairIndex, access: dio.Access, transform: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], *, rows: np.ndarray | None = None,
                 draft_size: int | None = None, tokens: np.ndarray | None = None, jpeg_passthrough: bool = False):
        self.index, self.access, self.transform, self.tokenizer = index, access, transform, tokenizer
        # JPEGs leave as their bytes, to be decoded on the device (core.device_decode); the rest is decoded here.
        self.jpeg_passthrough = jpeg_passthrough
        # Captions tokenized once (by the embedding pass) spare the BPE tokenizer on every training step.
        self.tokens = tokens
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.index) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._sample(int(i) if self.rows is None else int(self.rows[i]))

    def __getitems__(self, positions: list[int]) -> list[dict[str, Any]]:
        """A whole batch (the DataLoader calls this when it exists): the rows of one shard that lie close
        together are read with one range request (core.decoding.read_grouped), not one each."""
        rows = [int(i) if self.rows is None else int(self.rows[i]) for i in positions]
        data = read_grouped(self.index, rows, self.access)
        return [self._sample(r, data[r]) for r in rows]

    def _sample(self, row: int, data: bytes | BadSample | None = None) -> dict[str, Any]:
        if self.jpeg_passthrough and data is None:
            data = read_grouped(self.index, [row], self.access)[row]
        if isinstance(data, BadSample):
            return {"bad": (row, data.reason)}
        if self.jpeg_passthrough and data is not None and jpeg_or_none(data) is not None:
            return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "text": self._text(row), "row": row}
        try:
            image = load_image(self.index, row, self.access, draft_size=self.draft_size, data=data)
        except BadSample as exc:
            return {"bad": (row, exc.reason)}
        return {"image": self.transform(image), "text": self._text(row), "row": row}

    def _text(self, row: int) -> torch.Tensor:
        if self.tokens is not None:
            return torch.from_numpy(self.tokens[row].astype(np.int64))
        return self.tokenizer([self.index.captions[row]])[0]


def collate_pairs(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples; `bad_rows` lists (row, reason) for the ones that failed, so the caller can
    mark them in its PairIndex (a worker's index copy is not the caller's)."""
    bad = [tuple(s["bad"]) for s in batch if "bad" in s]
    good = [s for s in batch if "bad" not in s]
    if not good:
        return {"images": torch.empty(0), "texts": torch.empty(0, dtype=torch.long),
                "rows": torch.empty(0, dtype=torch.long), "bad_rows": bad}
    decoded = [s["image"] for s in good if "image" in s]
    out = {
        "images": torch.stack(decoded) if decoded else torch.empty(0),
        "texts": torch.stack([torch.as_tensor(s["text"], dtype=torch.long) for s in good]),
        "rows": torch.tensor([s["row"] for s in good], dtype=torch.long),
        "bad_rows": bad,
    }
    if len(decoded) < len(good):  # JPEG bytes for the device (core.device_decode.assemble), with positions
        out["jpegs"] = [s["jpeg"] for s in good if "jpeg" in s]
        out["jpeg_pos"] = [i for i, s in enumerate(good) if "jpeg" in s]
        out["image_pos"] = [i for i, s in enumerate(good) if "image" in s]
    return out


def read_image_folder(root: str, access: dio.Access, *, param: str) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder layout: (image location, class index) sorted by class folder then file; classnames sorted."""
    root = access.check(root, param=param)
    classes = [n[:-1] for n in dio.list_dir(root, access, param=param) if n.endswith("/")]
    if not classes:
        raise DataError(f"{root!r} has no class folders (ImageFolder layout: one folder per class)", param=param)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = dio.join(root, name)
        for f in dio.list_dir(folder, access, param=param):
            if not f.endswith("/") and f.lower().endswith(FOLDER_IMAGE_EXTS):
                samples.append((access.check(dio.join(folder, f), param=param), label))
    if not samples:
        raise DataError(f"{root!r} holds no images", param=param)
    return samples, classes


class ImageListDataset(torch.utils.data.Dataset):
    """(transformed image, label) per location, or None when the image is bad (see collate_images)."""

    def __init__(self, locations: list[str], labels: list[int], access: dio.Access,
                 transform: Callable[[Image.Image], torch.Tensor], *, draft_size: int | None = None):
        if len(locations) != len(labels):
            raise ValueError("locations and labels differ in length")
        self.locations, self.labels, self.access, self.transform = list(locations), list(labels), access, transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        try:
            data = dio.read_bytes(self.locations[i], self.access, max_bytes=MAX_IMAGE_BYTES)
            image = decode_image(data, draft_size=self.draft_size)
        except (LocationError, DataError, ValueError):
            return None
        return self.transform(image), self.labels[i]


def collate_images(batch: list[tuple[torch.Tensor, int] | None]) -> dict[str, Any]:
    """{"images": [B,3,H,W], "labels": LongTensor[B], "skipped": number of bad images dropped}."""
    good = [s for s in batch if s is not None]
    return {
        "images": torch.stack([s[0] for s in good]) if good else torch.empty(0),
        "labels": torch.tensor([s[1] for s in good], dtype=torch.long),
        "skipped": len(batch) - len(good),
    }
