"""core.mining: scores and filters by hand, exact == brute force (ties, duplicates, tiles), fast recall, the parquet table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import DataError, SpecError
from core.mining import MinedPairs, mine_exact, mine_fast, read_hard_pairs, write_hard_pairs
from tests.mining_reference import brute_force, pair_scores_reference

torch.set_num_threads(1)


@pytest.fixture(params=["dense", "tiled"])
def exact_path(request, monkeypatch) -> str:
    """Run a test on each of mine_exact's two paths: the threshold moved so that the named one is taken."""
    import core.mining.exact as exact

    monkeypatch.setattr(exact, "DENSE_MAX_ROWS", 10**9 if request.param == "dense" else 0)
    return request.param


@pytest.fixture
def tiled(monkeypatch) -> None:
    import core.mining.exact as exact

    monkeypatch.setattr(exact, "DENSE_MAX_ROWS", 0)


# Five pairs in 2-D whose cosines are easy to read off.
TEXT = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [-0.6, -0.8]])
IMAGE = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])


def test_pair_scores_by_hand() -> None:
    s = pair_scores_reference(TEXT, IMAGE)
    assert s[0, 1] == pytest.approx(0.6 * 0.8)  # plain product
    assert s[0, 2] == pytest.approx(0.0)  # text cosine 0
    assert s[0, 3] == -1.0  # same caption (text cosine 1) is never hard
    assert s[3, 0] == -1.0
    assert s[0, 4] == pytest.approx(0.0)  # (-0.6) * (-1.0): both negative, clamped to 0 first
    assert s[1, 2] == pytest.approx(0.8 * 0.96)
    assert np.all(np.diag(s) == -1.0)  # never its own neighbour
    unclamped = pair_scores_reference(TEXT, IMAGE, clamp_negative=False)
    assert unclamped[0, 4] == pytest.approx(0.6)  # negative * negative would look like a hard pair
    # Duplicate filter: image cosine 0.96 of pairs 1 and 2 above a 0.95 threshold -> that cosine is 0.
    dup = pair_scores_reference(TEXT, IMAGE, duplicate_threshold=0.95)
    assert dup[1, 2] == 0.0 and dup[0, 1] == pytest.approx(0.48)


def test_mine_exact_by_hand(exact_path: str) -> None:
    mined = mine_exact(TEXT, IMAGE, top_k=4)
    assert mined.report["path"] == exact_path
    # Row 0: 1 (0.48), then the 0-score ties 2 and 4 by lower index; 3 (same caption) removed; padded.
    assert mined.neighbors[0].tolist() == [1, 2, 4, -1]
    np.testing.assert_allclose(mined.scores[0, :3], [0.48, 0.0, 0.0], atol=1e-6)
    assert np.isnan(mined.scores[0, 3])
    assert mined.neighbors[1].tolist() == [2, 0, 3, 4]
    unclamped = mine_exact(TEXT, IMAGE, top_k=4, clamp_negative=False)
    assert unclamped.neighbors[0].tolist() == [4, 1, 2, -1]
    r = mined.report
    assert r["rows"] == 5 and r["valid_rows"] == 5 and r["self_skipped"] == 5
    assert r["same_caption_filtered"] == 2  # (0, 3) and (3, 0)
    assert r["short_lists"] == 2  # rows 0 and 3 lost their same-caption partner
    assert r["duplicate_filtered"] == 0
    assert mine_exact(TEXT, IMAGE, top_k=4, duplicate_threshold=0.95).report["duplicate_filtered"] == 2


def test_invalid_rows_are_neither_queries_nor_candidates(exact_path: str) -> None:
    valid = np.array([True, False, True, True, True])
    mined = mine_exact(TEXT, IMAGE, top_k=4, valid=valid)
    assert mined.neighbors[1].tolist() == [-1, -1, -1, -1]
    assert 1 not in mined.neighbors
    assert mined.report["valid_rows"] == 4


def test_ties_at_the_cut_keep_the_lowest_indices(exact_path: str) -> None:
    n = 3000
    text = torch.zeros(n, 2)
    text[:, 1] = 1.0
    text[0] = torch.tensor([1.0, 0.0])  # text cosine 0 with everyone: every score of row 0 is 0
    image = F.normalize(torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), dim=-1)
    mined = mine_exact(text, image, top_k=7, block_size=16)
    assert mined.neighbors[0].tolist() == [1, 2, 3, 4, 5, 6, 7] and mined.report["path"] == exact_path


@pytest.mark.parametrize("k", [1, 3, 10, 40, 200])
def test_topk_window_and_tie_rule_match_a_full_sort(k: int) -> None:
    from core.mining.scores import _topk_lowest_index
    from core.mining.select import TopK

    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (30, 200), generator=g).float() / 5  # few distinct values: ties everywhere
    scores[:5, 100:] = -float("inf")  # short rows
    scores[5:10] = torch.rand(5, 200, generator=g)  # no ties: the window alone is exact
    scores[10:12] = -scores[10:12]  # negative scores order the same way
    vals, idx = _topk_lowest_index(scores, k)
    sel = TopK(30, k, torch.device("cpu"), buffer=50)  # a tiny buffer: many cuts along the way
    rows = torch.arange(30)[:, None].expand_as(idx)
    ok = torch.isfinite(vals)
    perm = torch.randperm(int(ok.sum()), generator=g)  # emission order must not matter
    sel.add(rows[ok][perm], idx[ok][perm], vals[ok][perm])
    got_idx, got_vals = sel.result()
    for row in range(30):
        s = scores[row].tolist()
        want = sorted((j for j in range(200) if s[j] != -float("inf")), key=lambda j: (-s[j], j))[:k]
        assert got_idx[row, :len(want)].tolist() == want
        assert (got_idx[row, len(want):] == -1).all()
        np.testing.assert_array_equal(got_vals[row, :len(want)].numpy(), np.float32([s[j] for j in want]))
        assert sel.threshold[row] == (s[want[-1]] if len(want) == k else torch.finfo(torch.float32).min)


def _planted(n: int = 300, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, d, generator=g)
    image = torch.randn(n, d, generator=g)
    # Planted same captions (identical texts) and near-duplicate images.
    text[10:20] = text[0]
    text[100:110] = text[200:210]
    image[250:260] = image[260:270] + 0.01 * torch.randn(10, d, generator=g)
    valid = np.random.default_rng(seed).random(n) > 0.1
    return F.normalize(text, dim=-1), F.normalize(image, dim=-1), valid


@pytest.fixture(scope="module")
def planted():
    text, image, valid = _planted()
    return text, image, valid, brute_force(text, image, valid, 10)[0]


@pytest.mark.parametrize("block_size,tile_cols", [(1, None), (37, 50), (128, 7), (300, None), (4096, 64)])
def test_mine_exact_equals_brute_force(planted, tiled, block_size: int, tile_cols) -> None:
    text, image, valid, want = planted
    calls = []
    mined = mine_exact(text, image, top_k=10, valid=valid, block_size=block_size, tile_cols=tile_cols,
                       progress=lambda done, total: calls.append((done, total)))
    assert mined.report["bounded_rows"] > 0.8 * valid.sum()  # most bounds positive: the sparse path ran
    np.testing.assert_array_equal(mined.neighbors, want)
    ref = pair_scores_reference(text, image)
    rows = np.flatnonzero(valid)
    np.testing.assert_allclose(mined.scores[rows], np.take_along_axis(ref[rows], want[rows], 1), atol=1e-5)
    assert calls[-1] == (valid.sum(), valid.sum())
    r = mined.report
    # Over all valid ordered pairs: 10 rows of one caption + their source (11 -> 110 ordered pairs), and
    # 10 planted pairs 100..109 ~ 200..209 (20 ordered pairs), counting valid rows only.
    same_groups = [[0, *range(10, 20)]] + [[100 + i, 200 + i] for i in range(10)]
    want_same = sum(len([x for x in g if valid[x]]) * (len([x for x in g if valid[x]]) - 1) for g in same_groups)
    assert r["same_caption_filtered"] == want_same
    assert r["duplicate_filtered"] >= 2 * int(sum(valid[250 + i] and valid[260 + i] for i in range(10)))
    assert r["valid_rows"] == valid.sum() and r["short_lists"] == 0


def test_mine_exact_dense_path_equals_brute_force(planted) -> None:
    text, image, valid, want = planted
    calls = []
    mined = mine_exact(text, image, top_k=10, valid=valid, progress=lambda done, total: calls.append((done, total)))
    assert mined.report["path"] == "dense" and len(valid) <= 300  # the default threshold picks it at this N
    np.testing.assert_array_equal(mined.neighbors, want)
    ref = pair_scores_reference(text, image)
    rows = np.flatnonzero(valid)
    np.testing.assert_allclose(mined.scores[rows], np.take_along_axis(ref[rows], want[rows], 1), atol=1e-5)
    assert calls[-1] == (valid.sum(), valid.sum())
    both = valid[:, None] & valid[None, :] & ~np.eye(len(valid), dtype=bool)
    assert mined.report["same_caption_filtered"] == int(((ref == -1.0) & both).sum())


def test_dense_rank_window_orders_ties_by_column() -> None:
    from core.mining.dense import rank_window

    vals = torch.tensor([[0.75, 0.5, 0.5, 0.5, 0.0, -0.0, -float("inf")], [1.0, 1.0, 0.2, 0.2, 0.1, 0.1, 0.1]])
    idx = torch.tensor([[4, 9, 2, 7, 8, 3, 1], [6, 5, 3, 0, 9, 2, 4]])
    got_v, got_i = rank_window(vals, idx, 6)
    assert got_i.tolist() == [[4, 2, 7, 9, 3, 8], [5, 6, 0, 3, 2, 4]]
    assert got_v[0].tolist() == [0.75, 0.5, 0.5, 0.5, 0.0, 0.0] and got_v[1, :2].tolist() == [1.0, 1.0]


def test_mine_exact_unclamped_equals_brute_force(planted, exact_path: str) -> None:
    text, image, valid, _ = planted
    want = brute_force(text, image, valid, 5, clamp_negative=False, duplicate_threshold=0.9)[0]
    mined = mine_exact(text, image, top_k=5, valid=valid, block_size=64, clamp_negative=False, duplicate_threshold=0.9)
    np.testing.assert_array_equal(mined.neighbors, want)


def test_mine_rejects_bad_input() -> None:
    with pytest.raises(SpecError) as err:
        mine_exact(TEXT, IMAGE, top_k=0)
    assert err.value.param == "mining.top_k"
    with pytest.raises(DataError):
        mine_exact(TEXT, IMAGE[:4], top_k=2)
    bad = IMAGE.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        mine_exact(TEXT, bad, top_k=2)
    with pytest.raises(SpecError) as err:
        mine_fast(TEXT, IMAGE, top_k=3, probe=0)
    assert err.value.param == "mining.probe"


def _dyadic(n: int, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose dot products are exact in fp32 (multiples of 1/16): scores equal the float64
    reference bit for bit, and many are tied. Some rows are exact copies of others (duplicates)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(-2, 3, (n, d), generator=g).float() / 4
    image = torch.randint(-2, 3, (n, d), generator=g).float() / 4
    src = torch.randint(0, n, (n // 10,), generator=g)
    dst = torch.randint(0, n, (n // 10,), generator=g)
    text[dst], image[dst] = text[src], image[src]  # duplicate rows: same caption, never hard
    image[dst[:5]] = image[src[:5] + 1 if int(src[:5].max()) + 1 < n else src[:5]]
    return text, image


_BRUTE: dict = {}


@pytest.mark.parametrize("n,block_size,tile_cols,top_k", [(203, 1, 17, 5), (203, 16, None, 7), (311, 64, 33, 12),
                                                          (97, 4096, None, 20), (150, 13, 150, 149)])
def test_exact_known_answers_with_ties_and_duplicates(n: int, block_size: int, tile_cols, top_k: int,
                                                     exact_path: str) -> None:
    """Rows, neighbours, scores (bit for bit) and tie order equal the loop reference, on both paths."""
    text, image = _dyadic(n, seed=n)
    valid = np.random.default_rng(n).random(n) > 0.05
    for filters in ({}, {"clamp_negative": False}, {"duplicate_threshold": 0.5, "same_caption_threshold": 0.75}):
        key = (n, top_k, tuple(sorted(filters.items())))
        if key not in _BRUTE:  # the loop reference, once for both paths
            _BRUTE[key] = brute_force(text, image, valid, top_k, **filters)
        want, want_vals = _BRUTE[key]
        for buffer in (None, 3 * top_k) if exact_path == "tiled" else (None,):  # one cut at the end, or many
            mined = mine_exact(text, image, top_k=top_k, valid=valid, block_size=block_size, tile_cols=tile_cols,
                               window=3 * top_k, buffer=buffer, **filters)
            np.testing.assert_array_equal(mined.neighbors, want)
            np.testing.assert_array_equal(mined.scores, want_vals.astype(np.float32))  # NaN pads compare equal
            assert mined.report["path"] == exact_path
            assert buffer is None or mined.report["cuts"] >= 2
        ref = pair_scores_reference(text, image, **filters)
        both = valid[:, None] & valid[None, :] & ~np.eye(n, dtype=bool)
        assert mined.report["same_caption_filtered"] == int(((ref == -1.0) & both).sum())
        dup_thr = filters.get("duplicate_threshold", 0.98)
        dup = both & (ref != -1.0) & ((text @ text.T > dup_thr) | (image @ image.T > dup_thr)).numpy()
        assert mined.report["duplicate_filtered"] == int(dup.sum())


def test_exact_counts_agree_between_the_dense_and_sparse_tile_paths(planted, tiled) -> None:
    text, image, valid, _ = planted
    sparse = mine_exact(text, image, top_k=10, valid=valid, block_size=32, tile_cols=40)
    dense = mine_exact(text, image, top_k=10, valid=valid, block_size=32, tile_cols=40, window=5)  # no bound
    assert sparse.report["dense_lines"] < dense.report["dense_lines"]
    np.testing.assert_array_equal(sparse.neighbors, dense.neighbors)
    for key in ("same_caption_filtered", "duplicate_filtered"):
        assert sparse.report[key] == dense.report[key]


def test_candidate_bounds_never_exceed_the_true_kth_score(planted) -> None:
    from core.mining.exact import candidate_bounds
    from core.mining.scores import Filters

    text, image, valid, _ = planted
    t, v = text[torch.from_numpy(valid)], image[torch.from_numpy(valid)]
    bound = candidate_bounds(t, v, 10, Filters(), window=40, rows=16)
    _, want_vals = brute_force(t, v, None, 10)
    assert (bound.numpy() <= want_vals[:, 9]).all()
    assert (bound.numpy() > 0).mean() > 0.8  # and they are useful bounds, not all "none"


def _clustered(n: int, clusters: int, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centre_t = torch.randn(clusters, d, generator=g)
    centre_v = torch.randn(clusters, d, generator=g)
    which = torch.randint(clusters, (n,), generator=g)
    text = F.normalize(centre_t[which] + 0.35 * torch.randn(n, d, generator=g), dim=-1)
    image = F.normalize(centre_v[which] + 0.35 * torch.randn(n, d, generator=g), dim=-1)
    return text, image


def test_mine_fast_probing_every_list_equals_exact(planted) -> None:
    text, image, valid, want = planted
    mined = mine_fast(text, image, top_k=10, valid=valid, list_size=30, probe=1000, recall_sample=50)
    np.testing.assert_array_equal(mined.neighbors, want)
    assert mined.report["recall_at_k"] == 1.0 and mined.report["probe"] == mined.report["lists"]
    exact = mine_exact(text, image, top_k=10, valid=valid)
    np.testing.assert_array_equal(mined.scores, exact.scores)
    assert mined.report["same_caption_filtered"] == exact.report["same_caption_filtered"]
    assert mined.report["duplicate_filtered"] == exact.report["duplicate_filtered"]


def test_mine_fast_recall_on_clustered_data() -> None:
    text, image = _clustered(6000, 60)
    mined = mine_fast(text, image, top_k=10, list_size=64, probe=8, recall_sample=400, seed=1)
    exact = mine_exact(text, image, top_k=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(mined.neighbors, exact.neighbors, strict=True)])
    assert overlap >= 0.95
    assert mined.report["recall_at_k"] >= 0.95 and mined.report["recall_queries"] == 400
    assert abs(mined.report["recall_at_k"] - overlap) < 0.03  # the sampled estimate tracks the truth
    assert mined.report["compared_fraction"] < 0.2  # and it compared a small part of all pairs
    for key in ("rows", "valid_rows", "same_caption_filtered", "duplicate_filtered", "self_skipped",
                "short_lists", "seconds", "method", "lists", "probe", "index"):
        assert key in mined.report
    # Found neighbours carry their exact scores, best first with the tie rule.
    ref = pair_scores_reference(text[:300], image[:300])
    rows = [i for i in range(300) if (mined.neighbors[i] < 300).all()]
    for i in rows[:20]:
        np.testing.assert_allclose(mined.scores[i], ref[i, mined.neighbors[i]], atol=1e-5)
    assert (np.diff(mined.scores, axis=1) <= 0).all()


def test_hard_pairs_parquet_round_trip(tmp_path, planted) -> None:
    text, image, valid, _ = planted
    mined = mine_exact(text[:40], image[:40], top_k=45, valid=valid[:40])  # short lists: pads at the end
    keys = [f"shard-{i:05d}.jpg" for i in range(40)]
    path = tmp_path / "hard_pairs.parquet"
    write_hard_pairs(path, mined, keys)
    back, back_keys = read_hard_pairs(path)
    np.testing.assert_array_equal(back.neighbors, mined.neighbors)
    np.testing.assert_array_equal(back.scores, mined.scores)  # NaN pads compare equal here
    np.testing.assert_array_equal(back.valid, valid[:40])
    assert back_keys == [k if v else "" for k, v in zip(keys, valid[:40], strict=True)]
    assert back.report["method"] == "exact"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.num_rows == valid[:40].sum()
    assert table.schema.field("neighbors").type.value_type == pa.int64()
    assert table.schema.field("scores").type.value_type == pa.float32()
    first = table.slice(0, 1).to_pylist()[0]
    row = first["row"]
    assert first["neighbors"] == [x for x in mined.neighbors[row].tolist() if x >= 0]
    with pytest.raises(DataError):
        write_hard_pairs(path, mined, keys[:3])
    with pytest.raises(DataError):
        read_hard_pairs(tmp_path / "missing.parquet")


def test_mined_pairs_valid_defaults_to_all() -> None:
    mined = MinedPairs(neighbors=np.zeros((3, 2), dtype=np.int64), scores=np.zeros((3, 2), dtype=np.float32))
    assert mined.valid_rows().tolist() == [True, True, True]


def test_spec_mining_options_and_removed_fields() -> None:
    from core.spec import parse_spec

    base = {"model": {"name": "x"}, "data": {"train": "a.csv"}}
    m = parse_spec({**base, "mining": {"method": "fast", "probe": 8, "list_size": 100}}).mining
    assert (m.probe, m.list_size) == (8, 100)
    assert "reference_size" not in parse_spec(base).model_dump()["mining"]
    for field in ("reference_size", "candidates"):
        with pytest.raises(SpecError) as err:
            parse_spec({**base, "mining": {field: 1000}})
        assert err.value.param == f"mining.{field}" and "removed" in str(err.value)
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "mining": {"probe": 0}})
    assert err.value.param == "mining.probe"


def test_exact_equals_the_plain_query_path_at_scale(exact_path: str) -> None:
    """Thousands of rows, several stripes and column tiles, many cuts, invalid rows: the bounded, symmetric
    miner gives exactly the lists of the plain path (every query against every column, no bounds)."""
    from core.mining.exact import exact_rows
    from core.mining.scores import Filters

    text, image = _clustered(3000, 30, seed=4)
    valid = np.random.default_rng(4).random(3000) > 0.03
    mined = mine_exact(text, image, top_k=20, valid=valid, block_size=128, tile_cols=700, buffer=5000)
    assert mined.report["path"] == "dense" or (mined.report["cuts"] > 5 and mined.report["tiles"] > 20)
    rows = np.flatnonzero(valid)
    sub = torch.from_numpy(rows)
    want = exact_rows(text[sub], image[sub], torch.arange(len(rows)), 20, Filters()).numpy()
    want = np.where(want >= 0, rows[np.clip(want, 0, None)], -1)
    np.testing.assert_array_equal(mined.neighbors[rows], want)
