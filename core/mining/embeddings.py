"""Mining precomputed embeddings (`helip mine --embeddings`): read and check an .npz, mine it, write the table.

The file holds `text` and `image` arrays [N, d] (float16 or float32; float64 is accepted too) and
optionally `keys` (N strings). Rows are L2-normalised before mining, so inputs need not be unit
vectors (clip-retrieval writes normalised ones, other tools may not): the score is always a
product of cosines, and the thresholds mean what they say. A row of zeros, NaN or infinity is an
error that names the rows.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import DataError
from core.mining.exact import mine_exact
from core.mining.fast import mine_fast
from core.mining.scores import MinedPairs, Progress
from core.mining.table import write_hard_pairs


def _bad_rows(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.isfinite(x).all(axis=1))


def load_embeddings_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(text, image, keys, notes) from an .npz file, rows normalised; DataError naming what is wrong."""
    p = Path(path)
    where = "embeddings"
    try:
        z = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"embeddings file {p} does not exist", param=where) from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read embeddings file {p} as .npz: {exc}", param=where) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"embeddings file {p} is a single .npy array; expected an .npz with `text` and `image`",
                        param=where)
    with z:
        missing = [name for name in ("text", "image") if name not in z.files]
        if missing:
            raise DataError(f"embeddings file {p} has no {' and no '.join(f'`{m}`' for m in missing)} array "
                            f"(it holds: {', '.join(z.files) or 'nothing'})", param=where)
        try:
            text, image = z["text"], z["image"]
            keys_arr = z["keys"] if "keys" in z.files else None
        except ValueError as exc:  # object arrays need pickle, which is never allowed here
            raise DataError(f"embeddings file {p}: {exc}", param=where) from None
    for name, x in (("text", text), ("image", image)):
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise DataError(f"`{name}` must be a non-empty [N, d] array, got shape {x.shape}", param=f"{where}.{name}")
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"`{name}` must hold float16 or float32 values, got {x.dtype}", param=f"{where}.{name}")
    if text.shape != image.shape:
        raise DataError(f"`text` {text.shape} and `image` {image.shape} must have the same shape [N, d]",
                        param=where)
    n = text.shape[0]
    notes: dict[str, Any] = {"input_dtype": str(text.dtype)}
    out = []
    for name, x in (("text", text), ("image", image)):
        x = x.astype(np.float32)
        bad = _bad_rows(x)
        if len(bad):
            raise DataError(f"{len(bad)} rows of `{name}` hold NaN or infinite values (rows {bad[:5].tolist()})",
                            param=f"{where}.{name}")
        norm = np.linalg.norm(x, axis=1)
        zero = np.flatnonzero(norm == 0)
        if len(zero):
            raise DataError(f"{len(zero)} rows of `{name}` are all zeros (rows {zero[:5].tolist()})",
                            param=f"{where}.{name}")
        notes[f"{name}_rows_not_unit"] = int((np.abs(norm - 1) > 1e-3).sum())
        out.append(x / norm[:, None])
    if keys_arr is None:
        keys = [str(i) for i in range(n)]
    else:
        if keys_arr.ndim != 1 or len(keys_arr) != n:
            raise DataError(f"`keys` must be a vector of {n} strings, got shape {keys_arr.shape}",
                            param=f"{where}.keys")
        keys = [str(k) for k in keys_arr.tolist()]
    return out[0], out[1], keys, notes


def mining_options(spec_file: str | Path | None = None, *, method: str | None = None,
                   top_k: int | None = None) -> Any:
    """core.spec.MiningSpec from a spec file (a job spec's `mining` section, or a file that is only that
    section) with --method / --top-k on top; SpecError naming the field (`mining.top_k`, ...)."""
    import yaml
    from pydantic import ValidationError

    from core.errors import SpecError
    from core.spec import MiningSpec

    doc: Any = {}
    if spec_file is not None:
        try:
            doc = yaml.safe_load(Path(spec_file).read_text()) or {}
        except OSError as exc:
            raise SpecError(f"cannot read spec file {spec_file}: {exc.strerror}", param=None) from None
        except yaml.YAMLError as exc:
            raise SpecError(f"spec file {spec_file} is neither valid JSON nor YAML: {exc}", param=None) from None
        if isinstance(doc, dict) and ("mining" in doc or "model" in doc or "data" in doc):
            doc = doc.get("mining") or {}
        if not isinstance(doc, dict):
            raise SpecError(f"spec file {spec_file}: `mining` must be a mapping of options", param="mining")
    doc = dict(doc)
    if method is not None:
        doc["method"] = method
    if top_k is not None:
        doc["top_k"] = top_k
    try:
        return MiningSpec.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(["mining", *(str(x) for x in err.get("loc", ()))])
        msg = f"unknown field '{param}'" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid value")
        raise SpecError(f"{param}: {msg.replace('Value error, ', '')}", param=param) from None


def mine_arrays(text: np.ndarray | torch.Tensor, image: np.ndarray | torch.Tensor, mining: Any, *,
                valid: np.ndarray | None = None, device: str | torch.device = "cpu", seed: int = 0,
                progress: Progress = None) -> MinedPairs:
    """Mine with a spec's `mining` options (core.spec.MiningSpec): exact or fast."""
    m = mining
    t, v = torch.as_tensor(text), torch.as_tensor(image)
    kw = dict(top_k=m.top_k, valid=valid, same_caption_threshold=m.same_caption_threshold,
              duplicate_threshold=m.duplicate_threshold, clamp_negative=m.clamp_negative, device=device,
              progress=progress)
    if m.method == "exact":
        return mine_exact(t, v, block_size=m.block_size, **kw)
    return mine_fast(t, v, list_size=m.list_size, probe=m.probe, recall_sample=m.recall_sample, seed=seed, **kw)


def mine_embeddings_file(path: str | Path, out_dir: str | Path, mining: Any, *, device: str | torch.device = "cpu",
                         seed: int = 0, progress: Progress = None) -> tuple[MinedPairs, Path]:
    """Read, normalise, mine and write OUT/hard_pairs.parquet (row, key, neighbors, scores)."""
    from core.mining.stage import shard_count

    text, image, keys, notes = load_embeddings_file(path)
    if shard_count(mining, len(text), text.shape[1]) > 1:  # mining.shards: the same table, shard by shard here
        from core.mining.shards import mine_sharded

        mined, _ = mine_sharded(text, image, top_k=mining.top_k, shards=shard_count(mining, len(text), text.shape[1]),
                                same_caption_threshold=mining.same_caption_threshold,
                                duplicate_threshold=mining.duplicate_threshold, clamp_negative=mining.clamp_negative,
                                block_size=mining.block_size, device=device)
    else:
        mined = mine_arrays(text, image, mining, device=device, seed=seed, progress=progress)
    mined.report.update(notes, normalised=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "hard_pairs.parquet"
    write_hard_pairs(dest, mined, keys)
    return mined, dest
