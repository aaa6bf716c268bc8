"""Sharded exact mining (core.mining.shards): the merged table is mine_exact's, bit for bit, for any shard
count; the loop reference gives the known answers (ties, duplicates, invalid rows). The service side is
tests/test_shards_service.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import DataError, JobCancelled, SpecError
from core.mining.exact import mine_exact
from core.mining.scores import Filters
from core.mining.shards import (
    AUTO_MIN_ROWS,
    AUTO_ROWS_PER_SHARD,
    LocalShards,
    ShardPlan,
    auto_shards,
    merge,
    mine_sharded,
    plan_fingerprint,
    shard_ranges,
)
from core.progress import CollectingReporter
from tests.mining_reference import brute_force, pair_scores_reference
from tests.test_mining import _clustered, _dyadic

COUNTERS = ("same_caption_filtered", "duplicate_filtered", "self_skipped", "short_lists", "valid_rows", "rows")


def test_shard_ranges_cover_every_row_once_and_never_empty() -> None:
    assert shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_ranges(10, 1) == [(0, 10)]
    assert shard_ranges(3, 8) == [(0, 1), (1, 2), (2, 3)]  # no more shards than rows
    assert shard_ranges(0, 4) == []
    for n, s in ((1000, 7), (97, 96), (5, 5)):
        ranges = shard_ranges(n, s)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a < b for a, b in ranges) and all(r[1] == q[0] for r, q in zip(ranges, ranges[1:], strict=False))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n,shards,top_k", [(203, 1, 5), (203, 2, 7), (311, 3, 12), (311, 7, 12), (97, 96, 20),
                                            (150, 4, 149)])
def test_sharded_equals_the_loop_reference_and_mine_exact(n: int, shards: int, top_k: int) -> None:
    """Known answers with many ties and duplicate rows (dyadic embeddings: products exact in fp32): rows,
    neighbours, scores (bit for bit), tie order and the report's counters, for even and uneven shards."""
    text, image = _dyadic(n, seed=n)
    valid = np.random.default_rng(n).random(n) > 0.05
    for filters in ({}, {"clamp_negative": False}, {"duplicate_threshold": 0.5, "same_caption_threshold": 0.75}):
        want, want_vals = brute_force(text, image, valid, top_k, **filters)
        got, results = mine_sharded(text, image, top_k=top_k, shards=shards, valid=valid, **filters)
        np.testing.assert_array_equal(got.neighbors, want)
        np.testing.assert_array_equal(got.scores, want_vals.astype(np.float32))  # NaN pads compare equal
        ref = mine_exact(text, image, top_k=top_k, valid=valid, **filters)
        np.testing.assert_array_equal(got.neighbors, ref.neighbors)
        np.testing.assert_array_equal(got.scores, ref.scores)
        for key in COUNTERS:
            assert got.report[key] == ref.report[key], key
        loops = pair_scores_reference(text, image, **filters)
        both = valid[:, None] & valid[None, :] & ~np.eye(n, dtype=bool)
        assert got.report["same_caption_filtered"] == int(((loops == -1.0) & both).sum())
        assert len(results) == got.report["shards"] == min(shards, int(valid.sum()))
        assert [(r.a, r.b) for r in results] == shard_ranges(int(valid.sum()), shards)


def test_ties_at_the_cut_keep_the_lower_rows_in_every_shard() -> None:
    """Identical images (a probable duplicate: that cosine is zeroed) make every pair score 0: each row's
    list is the k lowest other rows, in whichever shard the row is."""
    n, k = 40, 6
    text = F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    image = F.normalize(torch.ones(n, 8), dim=-1)
    ref = mine_exact(text, image, top_k=k)
    assert ref.neighbors[7].tolist() == [0, 1, 2, 3, 4, 5] and ref.neighbors[2].tolist() == [0, 1, 3, 4, 5, 6]
    assert (ref.scores == 0).all()
    for shards in (1, 3, 5):
        got, _ = mine_sharded(text, image, top_k=k, shards=shards, block_size=3)
        np.testing.assert_array_equal(got.neighbors, ref.neighbors)
        np.testing.assert_array_equal(got.scores, ref.scores)
        assert got.report["duplicate_filtered"] == ref.report["duplicate_filtered"] == n * (n - 1)


@pytest.mark.parametrize("shards", [2, 5, 13])
def test_sharded_equals_mine_exact_on_real_valued_embeddings(shards: int) -> None:
    """Normalised float embeddings (no exact products): the same lists and the same fp32 scores bit for bit,
    with several row blocks and column tiles per shard (block_size 64)."""
    text, image = _clustered(2600, 26, seed=9)
    valid = np.random.default_rng(9).random(2600) > 0.04
    ref = mine_exact(text, image, top_k=15, valid=valid)
    got, _ = mine_sharded(text, image, top_k=15, shards=shards, valid=valid, block_size=64)
    np.testing.assert_array_equal(got.neighbors, ref.neighbors)
    np.testing.assert_array_equal(got.scores, ref.scores)
    for key in COUNTERS:
        assert got.report[key] == ref.report[key], key


def test_fp16_inputs_mine_like_mine_exact() -> None:
    text, image = _clustered(600, 12, seed=2)
    got, _ = mine_sharded(text.half().numpy(), image.half().numpy(), top_k=8, shards=3)
    ref = mine_exact(text.half(), image.half(), top_k=8)
    np.testing.assert_array_equal(got.neighbors, ref.neighbors)
    np.testing.assert_array_equal(got.scores, ref.scores)


def test_merge_refuses_missing_or_overlapping_shards() -> None:
    text, image = _dyadic(60, seed=1)
    _, results = mine_sharded(text, image, top_k=4, shards=3)
    valid = np.ones(60, dtype=bool)
    with pytest.raises(ValueError, match="cover"):
        merge(results[:2], valid, 4)
    with pytest.raises(ValueError, match="starts at row"):
        merge([results[0], results[2]], valid, 4)
    with pytest.raises(ValueError, match="starts at row"):
        merge([results[0], results[0], results[1], results[2]], valid, 4)


def test_bad_inputs_name_the_problem() -> None:
    text, image = _dyadic(20, seed=1)
    with pytest.raises(DataError, match=r"\[N, d\]"):
        mine_sharded(text, image[:10], top_k=2, shards=2)
    bad = image.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        mine_sharded(text, bad, top_k=2, shards=2)
    with pytest.raises(DataError, match="valid"):
        mine_sharded(text, image, top_k=2, shards=2, valid=np.ones(5, dtype=bool))
    with pytest.raises(SpecError) as err:
        mine_sharded(text, image, top_k=0, shards=2)
    assert err.value.param == "mining.top_k"


def test_cancelling_between_shards_stops() -> None:
    text, image = _dyadic(50, seed=3)
    calls: list[int] = []
    with pytest.raises(JobCancelled):
        mine_sharded(text, image, top_k=3, shards=5, on_done=lambda r: calls.append(r.index),
                     should_cancel=lambda: len(calls) >= 2)
    assert calls == [0, 1]


def test_plan_fingerprint_changes_with_what_changes_a_result() -> None:
    t, v = (x.numpy() for x in _dyadic(30, seed=2))
    ranges = shard_ranges(30, 3)
    base = plan_fingerprint(t, v, ranges, 5, Filters())
    assert base == plan_fingerprint(t.copy(), v.copy(), list(ranges), 5, Filters())
    t2 = t.copy()
    t2[3, 1] += 0.25
    others = [plan_fingerprint(t2, v, ranges, 5, Filters()), plan_fingerprint(t, v, shard_ranges(30, 4), 5, Filters()),
              plan_fingerprint(t, v, ranges, 6, Filters()), plan_fingerprint(t, v, ranges, 5, Filters(clamp=False)),
              plan_fingerprint(t, v, ranges, 5, Filters(dup=0.9)), plan_fingerprint(t.astype(np.float16), v, ranges, 5,
                                                                                     Filters())]
    assert base not in others and len(set(others)) == len(others)
    assert ShardPlan(t, v, ranges, 5, Filters()).fingerprint == base


def test_automatic_shard_count_from_rows_and_the_memory_budget() -> None:
    assert auto_shards(AUTO_MIN_ROWS - 1, 512, 50) == 1  # small jobs are not sharded
    assert auto_shards(AUTO_MIN_ROWS, 512, 50) == -(-AUTO_MIN_ROWS // AUTO_ROWS_PER_SHARD)
    assert auto_shards(100_000_000, 512, 50) == 400  # one per 250,000 rows
    # a small budget: each shard's kept lists (48 bytes a pair while cutting) must fit in it
    assert auto_shards(1_000_000, 512, 50, budget=1 << 26) == -(-1_000_000 * 50 * 48 // (1 << 26)) == 36


def test_mining_stage_shards_report_progress_and_workers(tmp_path) -> None:
    from core.mining.stage import mine_stage, shard_count
    from core.spec import parse_spec

    base = {"model": {"name": "x"}, "data": {"train": "a.csv"}}
    spec = parse_spec({**base, "mining": {"top_k": 5, "shards": 4}, "helip": {"sample_from": 5}})
    text, image = (x.numpy() for x in _dyadic(80, seed=5))
    valid = np.random.default_rng(5).random(80) > 0.1
    rep = CollectingReporter()
    mined = mine_stage(spec.mining, text, image, valid, device=torch.device("cpu"), seed=0, reporter=rep,
                       backend=LocalShards())
    ref = mine_exact(torch.as_tensor(text), torch.as_tensor(image), top_k=5, valid=valid)
    np.testing.assert_array_equal(mined.neighbors, ref.neighbors)
    last = rep.events[-1]
    assert "4 shards" in last["message"] and [s["shard"] for s in last["data"]["shards"]] == [0, 1, 2, 3]
    assert all(s["worker"] == "local" and s["seconds"] >= 0 for s in last["data"]["shards"])
    assert shard_count(spec.mining, 80, 6) == 4
    assert shard_count(parse_spec(base).mining, 1000, 6) == 1  # null: automatic, small
    assert shard_count(parse_spec({**base, "mining": {"method": "fast"}}).mining, 10**7, 6) == 1
    unsharded = mine_stage(spec.mining.model_copy(update={"shards": 1}), text, image, valid,
                           device=torch.device("cpu"), seed=0, reporter=CollectingReporter())
    assert "shards" not in unsharded.report
    np.testing.assert_array_equal(unsharded.neighbors, mined.neighbors)


def test_spec_shards_field() -> None:
    from core.spec import parse_spec

    base = {"model": {"name": "x"}, "data": {"train": "a.csv"}}
    assert parse_spec(base).mining.shards is None
    assert parse_spec({**base, "mining": {"shards": 8}}).mining.shards == 8
    for bad in (0, -1, "many", 1.5):
        with pytest.raises(SpecError) as err:
            parse_spec({**base, "mining": {"shards": bad}})
        assert err.value.param == "mining.shards"
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "mining": {"method": "fast", "shards": 2}})
    assert err.value.param == "mining.shards" and "exact" in str(err.value)
    assert parse_spec({**base, "mining": {"method": "fast", "shards": 1}}).mining.shards == 1


def test_normalised_random_embeddings_many_shards_uneven() -> None:
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(700, 24, generator=g), dim=-1)
    image = F.normalize(torch.randn(700, 24, generator=g), dim=-1)
    ref = mine_exact(text, image, top_k=10)
    got, results = mine_sharded(text, image, top_k=10, shards=9)
    assert len({r.b - r.a for r in results}) == 2  # 700 / 9: uneven
    np.testing.assert_array_equal(got.neighbors, ref.neighbors)
    np.testing.assert_array_equal(got.scores, ref.scores)


def test_the_shards_benchmark_runs_and_checks_its_tables(tmp_path) -> None:
    """bench/shards.py at a tiny size: 1 and 2 worker processes through the service's machinery (SQLite, a file
    store, a spawned helper); it asserts itself that every table equals mine_exact's."""
    import json

    from bench import shards as bench_shards

    doc = bench_shards.main(["--rows", "400", "--dim", "16", "--top-k", "5", "--shards", "3",
                             "--out", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [r["workers"] for r in saved["rows"]] == [1, 1, 2] == [r["workers"] for r in doc["rows"]]
    assert sum(saved["rows"][2]["shards_by_worker"].values()) == 3


def test_mine_embeddings_file_honours_shards(tmp_path) -> None:
    from core.mining.embeddings import mine_embeddings_file, mining_options

    text, image = _clustered(300, 6, seed=1)
    path = tmp_path / "emb.npz"
    np.savez(path, text=text.numpy(), image=image.numpy())
    plain, _ = mine_embeddings_file(path, tmp_path / "plain", mining_options(top_k=7))
    spec = tmp_path / "mining.yaml"
    spec.write_text("mining: {shards: 4}\n")
    sharded, dest = mine_embeddings_file(path, tmp_path / "sharded", mining_options(spec, top_k=7))
    assert sharded.report["shards"] == 4 and "shards" not in plain.report and dest.exists()
    np.testing.assert_array_equal(sharded.neighbors, plain.neighbors)
    np.testing.assert_array_equal(sharded.scores, plain.scores)
