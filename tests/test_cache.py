"""The embeddings / hard-pairs cache (core.cache, core.fingerprint): keys, checked reads, the pipeline, the reaper."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core import embed
from core.cache import CACHE_DIR, EMBEDDINGS, HARD_PAIRS, JobCache, entry_prefix
from core.data import build_index
from core.io import Access
from core.mining.exact import mine_exact, score_tolerance
from core.models import load_model
from core.pipeline import run_job
from core.progress import CollectingReporter
from core.spec import resolve_spec
from helip.store import FileStore
from synthworld.world import generate_world
from worker.retention import reap_cache

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
NAME = "helip-cache-tiny"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world") / "w", n_train=120, n_retrieval=16,
                          zeroshot_per_class=1, probe_per_class=(1, 1), seed=5, shards=1)


@pytest.fixture(scope="module")
def model():
    return load_model(NAME, config=TINY)


def spec_for(csv: Path, mining: dict | None = None, **train) -> dict:
    return {"model": {"name": NAME, "config": TINY}, "data": {"train": str(csv), "workers": 0},
            "mining": {"top_k": 5, "batch_size": 64, **(mining or {})}, "helip": {"sample_from": 5},
            "train": {"seed": 7, **train}, "control": False}


def keys(csv: Path, miner, mining: dict | None = None, **train) -> dict[str, str]:
    spec = resolve_spec(spec_for(csv, mining, **train))
    jc = JobCache(FileStore("/nonexistent-store"), CollectingReporter(), enabled=True)
    jc.key_embeddings(spec, miner, build_index(str(csv), access=Access()), Access(), CPU)
    return jc.keys


def copy_world(world, dest: Path) -> Path:
    # copyfile: new mtimes, as a copy made by another user would have
    shutil.copytree(world.root, dest, copy_function=shutil.copyfile)
    return dest / world.train_csv.relative_to(world.root)


def test_the_embeddings_key_follows_every_determinant_and_not_the_location(world, model, tmp_path, monkeypatch):
    base = keys(world.train_csv, model)
    # B's own copy of the same data, elsewhere, with other mtimes: the same key
    assert keys(copy_world(world, tmp_path / "copy"), model) == base

    # one image rewritten with the same size and mtime: changed data must miss
    csv = copy_world(world, tmp_path / "img")
    image = csv.parent / csv.read_text().splitlines()[1].split("\t")[0]
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size
    assert keys(csv, model)[EMBEDDINGS] != base[EMBEDDINGS]

    csv = copy_world(world, tmp_path / "caption")  # one caption changed
    lines = csv.read_text().splitlines()
    lines[1] = lines[1] + " indeed"
    csv.write_text("\n".join(lines) + "\n")
    assert keys(csv, model)[EMBEDDINGS] != base[EMBEDDINGS]

    other = load_model(NAME, config=TINY)  # the same weights loaded again: the same key
    assert keys(world.train_csv, other) == base
    with torch.no_grad():
        next(other.model.parameters()).view(-1)[0] += 1e-3  # one weight changed
    assert keys(world.train_csv, other)[EMBEDDINGS] != base[EMBEDDINGS]

    import torchvision.transforms as T

    pre = load_model(NAME, config=TINY)  # the preprocessing alone: another normalisation
    pre.preprocess_val = T.Compose([*pre.preprocess_val.transforms[:-1], T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert keys(world.train_csv, pre)[EMBEDDINGS] != base[EMBEDDINGS]

    bigger = load_model(NAME + "-b", config={**TINY, "vision_cfg": {**TINY["vision_cfg"], "image_size": 48}})
    assert keys(world.train_csv, bigger)[EMBEDDINGS] != base[EMBEDDINGS]  # architecture and image size

    assert keys(world.train_csv, model, precision="bf16")[EMBEDDINGS] != base[EMBEDDINGS]
    monkeypatch.setattr(embed, "EMBEDDINGS_FORMAT", embed.EMBEDDINGS_FORMAT + 1)
    assert keys(world.train_csv, model)[EMBEDDINGS] != base[EMBEDDINGS]


def test_the_pairs_key_follows_the_mining_options_that_change_the_table_only(world, model):
    base = keys(world.train_csv, model)
    same = [({"block_size": 7}, {}), ({"batch_size": 3}, {}), ({}, {"seed": 8}), ({"recall_sample": 5}, {}),
            ({"list_size": 3, "probe": 2}, {})]  # exact mining: speed options, the seed and fast's options
    for mining, train in same:
        k = keys(world.train_csv, model, mining, **train)
        assert k == base, (mining, train)
    for mining in ({"top_k": 6}, {"method": "fast"}, {"same_caption_threshold": 0.9}, {"duplicate_threshold": 0.9},
                   {"clamp_negative": False}):
        k = keys(world.train_csv, model, mining)
        assert k[EMBEDDINGS] == base[EMBEDDINGS] and k[HARD_PAIRS] != base[HARD_PAIRS], mining
    fast = keys(world.train_csv, model, {"method": "fast"})
    for mining, train in (({"list_size": 3}, {}), ({"probe": 2}, {}), ({"recall_sample": 5}, {}), ({}, {"seed": 8})):
        k = keys(world.train_csv, model, {"method": "fast", **mining}, **train)
        assert k[HARD_PAIRS] != fast[HARD_PAIRS], (mining, train)
    assert keys(world.train_csv, model, {"method": "fast", "block_size": 7}) == fast


def test_exact_mining_gives_the_same_table_for_every_block_size():
    """Why block_size is not in the key: ties (duplicated rows) and all, the neighbours do not move and the
    scores only by rounding (a GPU's column tiles follow its free memory: no two runs promise more)."""
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    t[100:140], v[100:140] = t[:40].clone(), v[:40].clone()  # exact ties between rows
    t[200:210] = t[0]  # captions equal to row 0's, images not
    valid = np.ones(300, dtype=bool)
    valid[[5, 77, 250]] = False
    tables = {bs: mine_exact(t, v, top_k=12, valid=valid, block_size=bs) for bs in (1, 7, 64, 256, 4096)}
    ref = tables[4096]
    for bs, m in tables.items():
        np.testing.assert_array_equal(m.neighbors, ref.neighbors, err_msg=f"block_size {bs}")
        # The products of another tiling round differently in the last bits (a tile of 1 row is a
        # matrix-vector product): within the tolerance the miner itself allows between two computations.
        np.testing.assert_allclose(m.scores, ref.scores, rtol=0, atol=score_tolerance(torch.float32),
                                   err_msg=f"block_size {bs}")
    np.testing.assert_array_equal(tables[256].scores, ref.scores)  # CPU tiles hold at most 256 rows
    assert (ref.neighbors[valid] >= 0).all()


def mine(world, workdir: Path, store, **mining) -> tuple[CollectingReporter, dict]:
    rep = CollectingReporter()
    res = run_job(spec_for(world.train_csv, mining), workdir, reporter=rep, mine_only=True, cache=store)
    return rep, res.summary


def actions(rep: CollectingReporter) -> list[tuple[str, str]]:
    return [(e["data"]["cache"]["stage"], e["data"]["cache"]["action"]) for e in rep.events
            if "stage" in e["data"].get("cache", {})]


def test_a_second_run_reuses_and_a_corrupt_or_truncated_entry_is_rewritten_never_trusted(world, tmp_path):
    store = FileStore(tmp_path / "store", retries=0)
    rep1, s1 = mine(world, tmp_path / "a", store)
    assert actions(rep1) == [(EMBEDDINGS, "miss"), (EMBEDDINGS, "write"), (HARD_PAIRS, "miss"), (HARD_PAIRS, "write")]
    assert s1["cache"]["cached"] == [] and s1["cache"]["stages"][EMBEDDINGS]["status"] == "stored"
    rep2, s2 = mine(world, tmp_path / "b", store)
    assert actions(rep2) == [(EMBEDDINGS, "hit"), (HARD_PAIRS, "hit")]
    assert s2["cache"]["cached"] == [EMBEDDINGS, HARD_PAIRS]
    assert pq.read_table(tmp_path / "b" / "hard_pairs.parquet").equals(pq.read_table(tmp_path / "a" / "hard_pairs.parquet"))
    keys_ = {k: s2["cache"]["stages"][k]["key"] for k in (EMBEDDINGS, HARD_PAIRS)}

    emb = store.local_path(f"{entry_prefix(EMBEDDINGS, keys_[EMBEDDINGS])}/data.npz")
    pairs = store.local_path(f"{entry_prefix(HARD_PAIRS, keys_[HARD_PAIRS])}/data.parquet")
    good_emb, good_pairs = emb.read_bytes(), pairs.read_bytes()
    emb.write_bytes(good_emb[: len(good_emb) // 2])  # truncated
    broken = bytearray(good_pairs)
    broken[len(broken) // 2] ^= 0xFF  # one byte flipped, same size
    pairs.write_bytes(bytes(broken))
    rep3, s3 = mine(world, tmp_path / "c", store)
    assert actions(rep3) == [(EMBEDDINGS, "corrupt"), (EMBEDDINGS, "write"), (HARD_PAIRS, "corrupt"),
                             (HARD_PAIRS, "write")]
    assert [e["level"] for e in rep3.events if "corrupt" in e["message"]] == ["warning", "warning"]
    assert s3["cache"]["cached"] == []
    assert pq.read_table(tmp_path / "c" / "hard_pairs.parquet").equals(pq.read_table(tmp_path / "a" / "hard_pairs.parquet"))
    assert emb.read_bytes() == (tmp_path / "c" / "embeddings.npz").read_bytes()  # rewritten whole

    # a file that matches its meta.json but does not load (a writer's bug) is not trusted either
    meta_path = emb.parent / "meta.json"
    emb.write_bytes(b"not an npz")
    meta = json.loads(meta_path.read_text())
    import hashlib

    meta.update(sha256=hashlib.sha256(b"not an npz").hexdigest(), size=10)
    meta_path.write_text(json.dumps(meta))
    rep4, _ = mine(world, tmp_path / "d", store)
    assert actions(rep4)[:2] == [(EMBEDDINGS, "corrupt"), (EMBEDDINGS, "write")]
    assert actions(rep4)[2] == (HARD_PAIRS, "hit")
    rep5, s5 = mine(world, tmp_path / "e", store)
    assert s5["cache"]["cached"] == [EMBEDDINGS, HARD_PAIRS]


def test_other_mining_options_reuse_the_embeddings_and_cache_false_bypasses_both(world, tmp_path):
    store = FileStore(tmp_path / "store", retries=0)
    mine(world, tmp_path / "a", store)
    rep, s = mine(world, tmp_path / "b", store, top_k=7)
    assert actions(rep) == [(EMBEDDINGS, "hit"), (HARD_PAIRS, "miss"), (HARD_PAIRS, "write")]
    assert s["cache"]["cached"] == [EMBEDDINGS] and s["mining"]["top_k"] == 7
    before = sorted(store.list_keys(f"{CACHE_DIR}/"))
    rep, s = mine(world, tmp_path / "c", store, cache=False)
    assert actions(rep) == [] and s["cache"]["cached"] == [] and s["cache"]["off"] == "mining.cache is false"
    assert sorted(store.list_keys(f"{CACHE_DIR}/")) == before  # nothing written, nothing touched but reads
    rep, s = mine(world, tmp_path / "d", None)  # a local run without a store
    assert s["cache"]["off"] == "no store (a local run)"


def put_entry(store: FileStore, kind: str, key: str, *, size: int, created: float, used: float | None,
              meta: bool = True) -> str:
    prefix = entry_prefix(kind, key)
    store.put_bytes(f"{prefix}/data.bin", b"x" * size)
    if meta:
        store.put_bytes(f"{prefix}/meta.json", json.dumps({"kind": kind, "key": key, "size": size,
                                                           "created": created}).encode())
    if used is not None:
        store.put_bytes(f"{prefix}/used.json", json.dumps({"at": used}).encode())
    return prefix


def test_the_cache_round_keeps_entries_in_use_and_bounds_age_and_size(tmp_path):
    store = FileStore(tmp_path / "store", retries=0)
    now, day = 1_000_000.0, 86400.0
    old = put_entry(store, EMBEDDINGS, "old", size=10, created=now - 40 * day, used=now - 31 * day)
    reused = put_entry(store, EMBEDDINGS, "reused", size=10, created=now - 40 * day, used=now - 2 * day)
    lru = put_entry(store, HARD_PAIRS, "lru", size=100, created=now - 5 * day, used=None)
    mru = put_entry(store, HARD_PAIRS, "mru", size=100, created=now - day, used=None)
    busy = put_entry(store, EMBEDDINGS, "busy", size=1000, created=now - 50 * day, used=now - 60)  # in use
    partial = put_entry(store, EMBEDDINGS, "partial", size=5, created=0, used=now - 2 * day, meta=False)
    writing = put_entry(store, EMBEDDINGS, "writing", size=5, created=0, used=now - 30, meta=False)
    store.put_bytes("jobs/j1/embeddings.npz", b"a job's own file")
    report = reap_cache(store, max_age_seconds=30 * day, max_bytes=1150, in_use_seconds=3600, now=now)
    assert report.expired == [old] and report.incomplete == [partial] and report.evicted == [lru]
    left = {k.rsplit("/", 1)[0] for k in store.list_keys(f"{CACHE_DIR}/")}
    assert left == {reused, mru, busy, writing}
    assert report.kept_bytes == 1110  # over 1150 only with the entry in use, which stays
    assert store.exists("jobs/j1/embeddings.npz")
    # nothing beyond the bounds: a second round removes nothing
    assert not reap_cache(store, max_age_seconds=30 * day, max_bytes=1150, in_use_seconds=3600, now=now)


class VanishingStore(FileStore):
    """An entry deleted (by the cache round of another worker) between the lookup and the download."""

    def get_file(self, key, dest):
        if key.startswith(f"{CACHE_DIR}/"):
            self.delete_prefix(key.rsplit("/", 1)[0])
        return super().get_file(key, dest)


def test_an_entry_that_vanishes_mid_lookup_is_computed_and_never_fails_the_job(world, tmp_path):
    mine(world, tmp_path / "a", FileStore(tmp_path / "store", retries=0))
    rep, s = mine(world, tmp_path / "b", VanishingStore(tmp_path / "store", retries=0))
    assert actions(rep) == [(EMBEDDINGS, "error"), (EMBEDDINGS, "write"), (HARD_PAIRS, "error"), (HARD_PAIRS, "write")]
    assert s["cache"]["cached"] == []
    _, s = mine(world, tmp_path / "c", FileStore(tmp_path / "store", retries=0))  # written again, whole
    assert s["cache"]["cached"] == [EMBEDDINGS, HARD_PAIRS]
