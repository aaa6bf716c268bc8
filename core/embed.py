"""Embed every training pair with a CLIP model: normalised text and image features, bad rows recorded."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data import PairDataset, PairIndex, collate_pairs
from core.device_decode import batch_to_device, input_pipeline
from core.io import Access
from core.loading import close_loader, make_loader
from core.models import LoadedModel
from core.progress import Reporter, Stage
from core.train import resolve_precision

# The layout of embeddings.npz (arrays, dtypes): part of every cached entry's key (core.cache), so bump it
# whenever save_embeddings writes something an older load_embeddings would misread.
EMBEDDINGS_FORMAT = 2


@dataclass
class EmbeddedPairs:
    """Normalised embeddings [N, d] aligned with the index rows (zero rows where the image is bad), the
    captions' tokens [N, context] as the model's tokenizer made them, and a small report."""

    text: np.ndarray
    image: np.ndarray
    tokens: np.ndarray
    report: dict[str, Any]


# Embeddings are kept in half precision (float16: 10 mantissa bits, a cosine's rounding error under 1e-3;
# bfloat16 keeps 7). Half the memory and store bytes of float32, and on a GPU the miner's products run on
# tensor cores with float32 accumulation. docs/benchmarks.md reports the top-k overlap with float32.
EMBEDDING_DTYPE = np.float16
# Features stay on the device and cross to the host in chunks of about this many bytes (one wait per chunk,
# not one per batch).
FLUSH_BYTES = 256 << 20


@torch.no_grad()
def embed_pairs(loaded: LoadedModel, index: PairIndex, access: Access, *, device: torch.device,
                batch_size: int, workers: int, precision: str = "auto",
                reporter: Reporter | None = None, uint8: bool | None = None, decode: str = "auto") -> EmbeddedPairs:
    """Embed every valid row; undecodable images are marked bad in the index. `uint8`: images cross to the
    device as uint8 and are normalised there (default: on a GPU); `decode`: data.decode (core.device_decode)."""
    model: Any = loaded.model.to(device)  # an open_clip CLIP: encode_image / encode_text
    was_training = model.training
    model.eval()
    dtype = resolve_precision(precision, device)
    rows = np.flatnonzero(index.valid_mask())
    transform, normalize, decoder = input_pipeline(loaded.preprocess_val, device, decode, uint8=uint8)
    dataset = PairDataset(index, access, transform, loaded.tokenizer, rows=rows, jpeg_passthrough=decoder is not None)
    loader = make_loader(dataset, workers=workers, device=device, batch_size=batch_size,
                         collate_fn=collate_pairs, shuffle=False)
    out = _Features(len(index), device)
    done, t0 = 0, time.perf_counter()
    try:
        for batch in loader:
            n_batch = len(batch["rows"]) + len(batch["bad_rows"])
            images, texts, kept, bad_rows = batch_to_device(batch, device, normalize, decoder)
            for row, reason in bad_rows:
                index.mark_bad(int(row), reason)
            done += n_batch
            if len(kept) == 0:
                continue
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                img = model.encode_image(images)
                txt = model.encode_text(texts)
            out.add(kept.numpy(), torch.nn.functional.normalize(txt.float(), dim=-1),
                    torch.nn.functional.normalize(img.float(), dim=-1), _host_tokens(batch, kept))
            if reporter is not None:
                reporter.progress(Stage.EMBEDDING, done, len(rows))
        out.flush()
    finally:
        close_loader(loader)
    model.train(was_training)
    if out.text is None:
        from core.errors import DataError

        raise DataError("no training pair could be read", param="data.train")
    seconds = time.perf_counter() - t0
    assert out.image is not None and out.tokens is not None
    return EmbeddedPairs(out.text, out.image, out.tokens,
                         {"pairs": int(len(rows)), "seconds": seconds, "pairs_per_second": len(rows) / max(seconds, 1e-9),
                          "dtype": np.dtype(EMBEDDING_DTYPE).name})


def _host_tokens(batch: dict[str, Any], kept: torch.Tensor) -> np.ndarray:
    """The kept rows' tokens from the batch's host copy (reading them back from the device would wait)."""
    rows = batch["rows"].numpy()
    tokens = batch["texts"].numpy()
    return tokens if len(kept) == len(rows) else tokens[np.isin(rows, kept.numpy())]


class _Features:
    """The [N, d] arrays being filled: batches wait on the device (in half precision) until FLUSH_BYTES
    of them are pending, then cross to the host together."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.device = n, device
        self.text: np.ndarray | None = None
        self.image: np.ndarray | None = None
        self.tokens: np.ndarray | None = None
        self.pending: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        self.pending_bytes = 0

    def add(self, rows: np.ndarray, txt: torch.Tensor, img: torch.Tensor, tokens: np.ndarray) -> None:
        if self.text is None:
            self.text = np.zeros((self.n, txt.shape[1]), dtype=EMBEDDING_DTYPE)
            self.image = np.zeros((self.n, img.shape[1]), dtype=EMBEDDING_DTYPE)
            self.tokens = np.zeros((self.n, tokens.shape[1]), dtype=np.int32)
        assert self.tokens is not None
        self.tokens[rows] = tokens
        half = torch.float16
        self.pending.append((rows, txt.to(half), img.to(half)))
        self.pending_bytes += 2 * txt.numel() * 2
        if self.device.type != "cuda" or self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        assert self.text is not None and self.image is not None
        rows = np.concatenate([r for r, _, _ in self.pending])
        self.text[rows] = torch.cat([t for _, t, _ in self.pending]).cpu().numpy()
        self.image[rows] = torch.cat([i for _, _, i in self.pending]).cpu().numpy()
        self.pending, self.pending_bytes = [], 0


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
