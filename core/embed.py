"""Embed every training pair with a CLIP model: normalised text and image features, bad rows recorded."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.data import PairDataset, PairIndex, collate_pairs
from core.io import Access
from core.models import LoadedModel
from core.progress import Reporter, Stage
from core.train import resolve_precision

# The layout of embeddings.npz (arrays, dtypes): part of every cached entry's key (core.cache), so bump it
# whenever save_embeddings writes something an older load_embeddings would misread.
EMBEDDINGS_FORMAT = 1


@dataclass
class EmbeddedPairs:
    """Normalised embeddings [N, d] aligned with the index rows (zero rows where the image is bad), the
    captions' tokens [N, context] as the model's tokenizer made them, and a small report."""

    text: np.ndarray
    image: np.ndarray
    tokens: np.ndarray
    report: dict[str, float]


@torch.no_grad()
def embed_pairs(loaded: LoadedModel, index: PairIndex, access: Access, *, device: torch.device,
                batch_size: int, workers: int, precision: str = "auto",
                reporter: Reporter | None = None) -> EmbeddedPairs:
    """Embed every valid row; undecodable images are marked bad in the index."""
    model: Any = loaded.model.to(device)  # an open_clip CLIP: encode_image / encode_text
    was_training = model.training
    model.eval()
    dtype = resolve_precision(precision, device)
    rows = np.flatnonzero(index.valid_mask())
    dataset = PairDataset(index, access, loaded.preprocess_val, loaded.tokenizer, rows=rows)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_pairs,
                        pin_memory=device.type == "cuda", shuffle=False)
    text: np.ndarray | None = None
    image: np.ndarray | None = None
    tokens: np.ndarray | None = None
    done, t0 = 0, time.perf_counter()
    for batch in loader:
        for row, reason in batch["bad_rows"]:
            index.mark_bad(int(row), reason)
        if len(batch["rows"]) == 0:
            continue
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            img = model.encode_image(batch["images"].to(device, non_blocking=True))
            txt = model.encode_text(batch["texts"].to(device, non_blocking=True))
        img = torch.nn.functional.normalize(img.float(), dim=-1).cpu().numpy()
        txt = torch.nn.functional.normalize(txt.float(), dim=-1).cpu().numpy()
        if text is None:
            text = np.zeros((len(index), txt.shape[1]), dtype=np.float32)
            image = np.zeros((len(index), img.shape[1]), dtype=np.float32)
            tokens = np.zeros((len(index), batch["texts"].shape[1]), dtype=np.int32)
        r = batch["rows"].numpy()
        assert image is not None and tokens is not None
        text[r], image[r], tokens[r] = txt, img, batch["texts"].numpy()
        done += len(r) + len(batch["bad_rows"])
        if reporter is not None:
            reporter.progress(Stage.EMBEDDING, done, len(rows))
    model.train(was_training)
    if text is None:
        from core.errors import DataError

        raise DataError("no training pair could be read", param="data.train")
    seconds = time.perf_counter() - t0
    assert image is not None and tokens is not None
    return EmbeddedPairs(text, image, tokens, {"pairs": int(len(rows)), "seconds": seconds,
                                               "pairs_per_second": len(rows) / max(seconds, 1e-9)})


def save_embeddings(path: Path, emb: EmbeddedPairs, valid: np.ndarray) -> None:
    """Cache the embeddings in the job's work directory (resume skips the embedding stage)."""
    tmp = Path(str(path) + ".tmp.npz")
    np.savez(tmp, text=emb.text, image=emb.image, tokens=emb.tokens, valid=valid)
    tmp.replace(path)


def load_embeddings(path: Path, n: int) -> tuple[EmbeddedPairs, np.ndarray] | None:
    """The cached embeddings and valid mask, or None when absent or for another data set size."""
    if not Path(path).exists():
        return None
    with np.load(path) as z:
        if z["text"].shape[0] != n:
            return None
        return EmbeddedPairs(z["text"], z["image"], z["tokens"], {"restored": 1}), z["valid"]
