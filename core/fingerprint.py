"""What an embedding is a function of, as digests: the model's weights, its preprocessing, and the data.

Used by core.cache to key cached embeddings. Every digest is computed from what the job itself loaded
or read through its own access checks (core.io), never from a location string: two copies of the same
data at different paths have the same fingerprint, and changed bytes always change it.

Image identity: local files (CSV images, tar shards) by the sha256 of their content, read through the
checked file functions; S3 objects by the server's ETag and size (an MD5 of the content, or of its
parts for multipart uploads: only an object with the same bytes has it). Size + mtime would be cheaper,
but a copy gets a new mtime (no reuse) and a file can be rewritten with the same size and a forged mtime
(a stale hit, and a key anyone could aim at another reader's entry), so local content is hashed.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from core import s3
from core.index import PairIndex
from core.io import Access, is_s3, open_binary, split_s3
from core.io.read import _domain_error

FINGERPRINT_VERSION = 1  # bump when what goes into a digest changes
_HASH_CHUNK = 1 << 20
_HASH_THREADS = 8  # hashlib releases the GIL on large buffers: reads and hashes overlap across files
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _field(h: Any, value: str | bytes | int) -> None:
    """Length-prefixed, so no two sequences of fields hash alike."""
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict as loaded (names, dtypes, shapes, bytes): one digest for a tag's file,
    a checkpoint on S3 or disk, or a seeded random initialisation alike; the file's own packaging
    (pickle framing, extra keys) does not count, only the weights the model computes with."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        _field(h, name)
        _field(h, f"{t.dtype}{tuple(tensor.shape)}")
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def describe_transform(transform: Any) -> str:
    """A transform's repr without memory addresses (image size, resize mode, crop, normalisation)."""
    return _ADDRESS.sub("", repr(transform))


def model_description(name: str, config: dict[str, Any] | None, preprocess: Any, tokenizer: Any) -> dict[str, Any]:
    """The architecture (the custom config, or the one open_clip registers under `name`), the preprocessing
    and the tokenizer: with the weights, what turns a pair into an embedding."""
    import open_clip

    arch = config if config is not None else open_clip.get_model_config(name)
    return {"name": name, "config": arch, "preprocess": describe_transform(preprocess),
            "tokenizer": type(tokenizer).__name__, "context_length": getattr(tokenizer, "context_length", None)}


def _local_digest(location: str, access: Access) -> str:
    h = hashlib.sha256()
    with open_binary(location, access, param="data.train") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _s3_identities(locations: list[str], access: Access) -> dict[str, str]:
    """ETag and size of each object, one listing per folder (a stat per object would be one request each)."""
    assert access.s3 is not None  # the index was built through access.check, which refuses s3:// without it
    cfg = access.s3
    client = s3.s3_client(cfg)
    by_dir: dict[tuple[str, str], set[str]] = {}
    for loc in locations:
        bucket, key = split_s3(loc)
        by_dir.setdefault((bucket, key.rpartition("/")[0]), set()).add(key)
    out: dict[str, str] = {}
    for (bucket, folder), keys in by_dir.items():
        prefix = f"{folder}/" if folder else ""

        def listing(bucket: str = bucket, prefix: str = prefix) -> list[Any]:
            return list(client.list_objects(bucket, prefix=prefix))

        try:
            objects = s3.call(listing, cfg, what=f"s3://{bucket}/{prefix}")
        except Exception as exc:
            raise _domain_error(exc, cfg, f"s3://{bucket}/{prefix}", "data.train") from None
        for obj in objects:
            if obj.object_name in keys:
                out[f"s3://{bucket}/{obj.object_name}"] = f"etag:{(obj.etag or '').strip(chr(34))}:{obj.size}"
    return out


def source_identities(sources: Iterable[str], access: Access) -> dict[str, str]:
    """Each distinct source's identity: content sha256 (local) or ETag + size (S3); "missing" when absent."""
    unique = sorted({s for s in sources if s})
    remote = [s for s in unique if is_s3(s)]
    local = [s for s in unique if not is_s3(s)]
    out = _s3_identities(remote, access) if remote else {}
    for loc in remote:
        out.setdefault(loc, "missing")

    def one(loc: str) -> tuple[str, str]:
        from core.errors import LocationError

        try:
            return loc, _local_digest(loc, access)
        except LocationError as exc:
            if "not found" in exc.message:
                return loc, "missing"  # a missing image is a bad row, as the embedding stage finds it
            raise

    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, max(1, len(local)))) as pool:
        out.update(pool.map(one, local))
    return out


def data_fingerprint(index: PairIndex, access: Access) -> tuple[str, dict[str, int]]:
    """sha256 over every row in order: key, caption, why it is bad (if it is), and its image's identity
    (the source's identity, and the byte range inside a tar shard). Locations are left out, so a copy of the
    data elsewhere has the same fingerprint. Returns (digest, {"sources": distinct files hashed or listed})."""
    identities = source_identities(index.sources, access)
    h = hashlib.sha256()
    _field(h, json.dumps({"fingerprint": FINGERPRINT_VERSION, "rows": len(index)}))
    for row in range(len(index)):
        src = index.sources[row]
        _field(h, index.keys[row])
        _field(h, index.captions[row])
        _field(h, index.bad.get(row, ""))
        _field(h, f"{identities.get(src, '') if src else ''}@{int(index.offsets[row])}+{int(index.sizes[row])}")
    return h.hexdigest(), {"sources": len(identities)}
