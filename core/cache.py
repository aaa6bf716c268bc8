"""Mine once, reuse: embeddings and hard-pair tables cached in the service's store, keyed by their inputs.

A sweep of settings and seeds over one model and one data set would otherwise embed and mine again in
every job. An entry's key is the sha256 of everything its content is a function of:

- embeddings: the miner's weights (core.fingerprint.weights_digest), its architecture, preprocessing and
  tokenizer, the data fingerprint (keys, captions, bad rows, each image's content identity), the
  autocast dtype it ran under, and EMBEDDINGS_FORMAT (the file's layout);
- hard pairs: the embeddings key, the mining options that change the table (method, top_k, thresholds,
  clamp; for `fast` also list_size, probe, recall_sample and the seed) and PAIRS_FORMAT. Not block_size,
  batch_size or the kernel: they only change the speed (tests/test_cache.py mines with several and
  compares the tables).

An entry is `cache/<kind>/<key>/` in the store: data.<ext>, meta.json (the data's sha256 and size, written
last: an entry without it is incomplete) and used.json (when a job last used it; worker.retention's cache
round reads it). Every read is checked against meta.json and loaded before it is trusted; a corrupt,
truncated or foreign entry is deleted, recomputed and written again. A store failure during a lookup is a
miss, during a write a warning: the cache never fails a job.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Protocol

from core.errors import HelipError, StorageError

# Imported by the worker's main process (worker.retention's cache round), where torch must never load:
# core.fingerprint (torch) and numpy are imported where they are used.

CACHE_DIR = "cache"
EMBEDDINGS = "embeddings"
HARD_PAIRS = "hard_pairs"
EXTENSIONS = {EMBEDDINGS: "npz", HARD_PAIRS: "parquet"}
META, USED = "meta.json", "used.json"
PAIRS_FORMAT = 1  # bump when hard_pairs.parquet's layout (core.mining.table) changes


class BlobStore(Protocol):
    """What the cache needs of a store (helip.store.Store has it; core never imports the service)."""

    def put_file(self, key: str, path: Path | str) -> tuple[str, int]: ...
    def put_bytes(self, key: str, data: bytes) -> tuple[str, int]: ...
    def get_file(self, key: str, dest: Path | str) -> Path: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def entry_prefix(kind: str, key: str) -> str:
    return f"{CACHE_DIR}/{kind}/{key}"


def embeddings_inputs(*, weights: str, model: dict[str, Any], data: str, precision: str,
                      decode: str = "workers") -> dict[str, Any]:
    """`decode`: where JPEGs were decoded (`workers` with PIL, `device` with nvJPEG/torchvision: the pixels
    differ by resampling rounding, so the embeddings do too)."""
    from core.embed import EMBEDDINGS_FORMAT

    return {"kind": EMBEDDINGS, "format": EMBEDDINGS_FORMAT, "weights": weights, "model": model, "data": data,
            "precision": precision, "decode": decode}


def pairs_inputs(embeddings_key: str, mining: Any, seed: int) -> dict[str, Any]:
    """The options of a core.spec.MiningSpec that change the mined table (see the module docstring)."""
    m = mining
    out = {"kind": HARD_PAIRS, "format": PAIRS_FORMAT, "embeddings": embeddings_key, "method": m.method,
           "top_k": m.top_k, "same_caption_threshold": m.same_caption_threshold,
           "duplicate_threshold": m.duplicate_threshold, "clamp_negative": m.clamp_negative}
    if m.method == "fast":
        out.update(list_size=m.list_size, probe=m.probe, recall_sample=m.recall_sample, seed=seed)
    return out


class CorruptEntry(Exception):
    """A cache entry that does not match its meta.json or does not load."""


class StageCache:
    """Entries in a store: look up (checked), write, delete."""

    def __init__(self, store: BlobStore):
        self.store = store

    def touch(self, kind: str, key: str) -> None:
        self.store.put_bytes(f"{entry_prefix(kind, key)}/{USED}", json.dumps({"at": time.time()}).encode())

    def fetch(self, kind: str, key: str, dest: Path) -> bool:
        """Copy the entry's data to `dest` after checking it against meta.json; False when there is none.
        CorruptEntry (after deleting it) when it does not match; StorageError when the store fails (an
        entry deleted by the cache round between the check and the download is one: the caller computes)."""
        prefix = entry_prefix(kind, key)
        if not self.store.exists(f"{prefix}/{META}"):
            return False
        self.touch(kind, key)  # before the download: the reaper leaves an entry used this recently alone
        try:
            meta = json.loads(self.store.get_bytes(f"{prefix}/{META}"))
            if not isinstance(meta, dict) or meta.get("kind") != kind or meta.get("key") != key:
                raise CorruptEntry("meta.json names another entry")
            self.store.get_file(f"{prefix}/data.{EXTENSIONS[kind]}", dest)
        except ValueError as exc:  # meta.json is not JSON (a StorageError is raised as it is: the store failed)
            self.delete(kind, key)
            raise CorruptEntry(f"meta.json unreadable ({str(exc)[:200]})") from None
        except CorruptEntry:
            self.delete(kind, key)
            raise
        h, size = hashlib.sha256(), 0
        with open(dest, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        if h.hexdigest() != meta.get("sha256") or size != meta.get("size"):
            self.delete(kind, key)
            Path(dest).unlink(missing_ok=True)
            raise CorruptEntry(f"{size} bytes with sha256 {h.hexdigest()[:12]}, meta.json says {meta.get('size')} "
                               f"bytes with {str(meta.get('sha256'))[:12]}")
        return True

    def put(self, kind: str, key: str, path: Path, inputs: dict[str, Any]) -> dict[str, Any]:
        """Write `path` as the entry's data, then its meta.json (the entry is complete once that exists)."""
        prefix = entry_prefix(kind, key)
        self.touch(kind, key)
        sha, size = self.store.put_file(f"{prefix}/data.{EXTENSIONS[kind]}", path)
        meta = {"kind": kind, "key": key, "sha256": sha, "size": size, "created": time.time(), "inputs": inputs}
        self.store.put_bytes(f"{prefix}/{META}", json.dumps(meta, default=str).encode())
        return meta

    def delete(self, kind: str, key: str) -> None:
        self.store.delete_prefix(entry_prefix(kind, key))


class JobCache:
    """The cache as one job uses it: keys from the job's own inputs, an event for each use, the summary.

    Built only after the job's model and data passed their access checks (core.pipeline.run_job loads the
    model and indexes the data first), and every digest is computed from what this job read itself.
    """

    def __init__(self, store: BlobStore | None, reporter: Any, *, enabled: bool):
        self.cache = StageCache(store) if store is not None and enabled else None
        self.reporter = reporter
        self.why_off = "mining.cache is false" if store is not None else "no store (a local run)"
        self.keys: dict[str, str] = {}
        self.inputs: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str] = {}

    @property
    def active(self) -> bool:
        return self.cache is not None

    def key_embeddings(self, spec: Any, miner: Any, index: Any, access: Any, device: Any) -> None:
        """Compute the embeddings key (weights digest, data fingerprint) of this job's miner and data."""
        if self.cache is None:
            return
        import torch

        from core.device_decode import input_pipeline
        from core.fingerprint import data_fingerprint, model_description, weights_digest
        from core.train import resolve_precision

        t0 = time.perf_counter()
        fingerprint, info = data_fingerprint(index, access)
        config = spec.model.config if spec.mining.encoder == "self" else None
        dtype = resolve_precision(spec.train.precision, device)
        inputs = embeddings_inputs(
            weights=weights_digest(miner.model),
            model=model_description(miner.name, config, miner.preprocess_val, miner.tokenizer),
            data=fingerprint, precision=str(dtype).removeprefix("torch.") if dtype is not None else "float32",
            # where embed_pairs will decode, decided by the same function it uses
            decode="device" if input_pipeline(miner.preprocess_val, torch.device(device), spec.data.decode)[2]
            else "workers")
        self.inputs[EMBEDDINGS], self.keys[EMBEDDINGS] = inputs, digest(inputs)
        self.inputs[HARD_PAIRS] = pairs_inputs(self.keys[EMBEDDINGS], spec.mining, int(spec.train.seed or 0))
        self.keys[HARD_PAIRS] = digest(self.inputs[HARD_PAIRS])
        self.fingerprint_seconds = time.perf_counter() - t0
        self.reporter.event(f"cache keys computed in {self.fingerprint_seconds:.1f} s",
                            data={"cache": {"keys": dict(self.keys), "sources_hashed": info["sources"]}})

    def fetch(self, kind: str, dest: Path, load: Any) -> Any:
        """The stage's result from the cache, loaded by `load(dest)` (None or an exception: not trusted), or None."""
        if self.cache is None or kind not in self.keys:
            return None
        key = self.keys[kind]
        try:
            if not self.cache.fetch(kind, key, dest):
                self.reporter.event(f"{kind}: not in the cache", data={"cache": {"stage": kind, "key": key,
                                                                                 "action": "miss"}})
                return None
            try:
                value = load(dest)
            except (HelipError, ValueError, OSError, EOFError, KeyError) as exc:
                raise CorruptEntry(f"does not load ({type(exc).__name__}: {str(exc)[:200]})") from None
            if value is None:
                raise CorruptEntry("does not fit this job's data (row count or keys differ)")
        except CorruptEntry as exc:
            Path(dest).unlink(missing_ok=True)
            self._safe_delete(kind, key)
            self.reporter.event(f"{kind}: the cache entry {key[:12]} is corrupt ({exc}); ignored, recomputed and "
                                "rewritten", level="warning", data={"cache": {"stage": kind, "key": key,
                                                                              "action": "corrupt"}})
            return None
        except StorageError as exc:
            self.reporter.event(f"{kind}: the cache could not be read ({exc.message}); computed instead",
                                level="warning", data={"cache": {"stage": kind, "key": key, "action": "error"}})
            return None
        self.status[kind] = "cached"
        self.reporter.event(f"{kind} from the cache (key {key[:12]})",
                            data={"cache": {"stage": kind, "key": key, "action": "hit"}})
        return value

    def _safe_delete(self, kind: str, key: str) -> None:
        try:
            assert self.cache is not None
            self.cache.delete(kind, key)
        except StorageError:
            pass  # the entry is rewritten after the stage anyway

    def put(self, kind: str, path: Path) -> None:
        """Write the stage's freshly computed file to the cache."""
        if self.cache is None or kind not in self.keys:
            self.status.setdefault(kind, "computed")
            return
        key = self.keys[kind]
        try:
            meta = self.cache.put(kind, key, path, self.inputs[kind])
        except StorageError as exc:
            self.status[kind] = "computed"
            self.reporter.event(f"{kind}: could not be written to the cache ({exc.message})", level="warning",
                                data={"cache": {"stage": kind, "key": key, "action": "error"}})
            return
        self.status[kind] = "stored"
        self.reporter.event(f"{kind} written to the cache (key {key[:12]}, {meta['size']} bytes)",
                            data={"cache": {"stage": kind, "key": key, "action": "write", "bytes": meta["size"]}})

    def restored(self, kind: str) -> None:
        self.status[kind] = "restored"

    def summary(self) -> dict[str, Any]:
        """For job.result.summary: which stages came from the cache, and each stage's status and key."""
        stages = {kind: {"status": self.status.get(kind, "computed"), "key": self.keys.get(kind)}
                  for kind in (EMBEDDINGS, HARD_PAIRS)}
        out: dict[str, Any] = {"cached": [k for k, v in stages.items() if v["status"] == "cached"], "stages": stages}
        if self.cache is None:
            out["off"] = self.why_off
        return out


def check_pairs(mined: Any, table_keys: list[str], index: Any) -> Any:
    """A cached table fits this job's index: same row count, and the same key on every mined row."""
    import numpy as np

    valid = np.asarray(mined.valid)
    if mined.neighbors.shape[0] != len(index):
        return None
    if any(table_keys[r] != index.keys[r] for r in np.flatnonzero(valid).tolist()):
        return None
    return mined
