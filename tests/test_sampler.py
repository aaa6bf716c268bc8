"""core.sampler: batch layout, no duplicates, caption dedupe, DDP slicing, epochs and resume, and the hard pair mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import DataError
from core.sampler import HardPairBatchSampler, hard_pair_mask

torch.set_num_threads(1)

N, K = 240, 20


def _neighbors(n: int = N, k: int = K, seed: int = 0) -> np.ndarray:
    """Each row's neighbours: k distinct other rows, a few -1 pads at the end of some lists."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        others = rng.permutation(np.delete(np.arange(n), i))[:k]
        out[i] = others
        if i % 7 == 0:
            out[i, k - 5:] = -1
    return out


def _groups(batch: list[int], group: int) -> list[list[int]]:
    return [batch[i:i + group] for i in range(0, len(batch), group)]


def test_layout_each_target_followed_by_its_hard_pairs() -> None:
    nb = _neighbors()
    s = HardPairBatchSampler(nb, targets_per_batch=4, hard_per_target=3, sample_from=10, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == N // 4
    hard = fills = 0
    targets = []
    for batch in batches:
        assert len(batch) == 16
        assert len(set(batch)) == 16  # never a row twice in a batch
        for group in _groups(batch, 4):
            targets.append(group[0])
            for row in group[1:]:
                if row in nb[group[0], :10]:
                    hard += 1
                else:
                    fills += 1
    assert len(set(targets)) == len(targets) == N  # every row a target exactly once per epoch
    assert fills == s.stats["filled_random"]
    assert hard > 0.9 * (hard + fills)
    assert s.stats["batches"] == N // 4


def test_draws_are_uniform_over_the_first_sample_from() -> None:
    # One popular target: over many epochs its hard pairs cover the first sample_from and nothing else.
    nb = _neighbors()
    s = HardPairBatchSampler(nb, targets_per_batch=2, hard_per_target=2, sample_from=6)
    seen: dict[int, int] = {}
    for epoch in range(60):
        s.set_epoch(epoch)
        for batch in s:
            for group in _groups(batch, 3):
                if group[0] == 5:
                    for row in group[1:]:
                        seen[row] = seen.get(row, 0) + 1
    in_list = {r: c for r, c in seen.items() if r in nb[5, :6]}
    # Rows outside the list are random fills (the list was used up by the batch): rare here.
    assert sum(seen.values()) - sum(in_list.values()) < 0.1 * sum(seen.values())
    assert set(in_list) == set(nb[5, :6].tolist())
    assert max(in_list.values()) < 3 * min(in_list.values())


def test_caption_dedupe_is_counted_and_effective() -> None:
    nb = _neighbors()
    # 30 distinct captions, written with different case and spaces.
    captions = [(f"  A Photo {i % 30}" if i % 2 else f"a photo {i % 30} ") for i in range(N)]
    norm = [c.strip().lower() for c in captions]
    s = HardPairBatchSampler(nb, targets_per_batch=3, hard_per_target=3, sample_from=20, captions=captions)
    batches = list(s)
    assert s.stats["skipped_same_caption"] > 0
    for batch in batches:
        for pos, row in enumerate(batch):
            if pos % 4:  # a hard pair or fill shares its caption with no other row of the batch
                others = [norm[r] for r in batch if r != row]
                assert norm[row] not in others
    off = HardPairBatchSampler(nb, targets_per_batch=3, hard_per_target=3, sample_from=20, captions=captions,
                               dedupe_captions=False)
    list(off)
    assert off.stats["skipped_same_caption"] == 0


def test_two_ranks_are_disjoint_and_cover_the_single_process_batches() -> None:
    nb = _neighbors()
    valid = np.arange(N) % 11 != 0
    common = dict(hard_per_target=2, sample_from=10, valid=valid, seed=4)
    one = HardPairBatchSampler(nb, targets_per_batch=6, **common)
    r0 = HardPairBatchSampler(nb, targets_per_batch=3, rank=0, world_size=2, **common)
    r1 = HardPairBatchSampler(nb, targets_per_batch=3, rank=1, world_size=2, **common)
    for s in (one, r0, r1):
        s.set_epoch(2)
    b_one, b0, b1 = list(one), list(r0), list(r1)
    assert len(b0) == len(b1) == len(b_one) == valid.sum() // 6
    for full, a, b in zip(b_one, b0, b1, strict=True):
        assert not set(a) & set(b)
        assert a + b == full
        assert all(valid[row] for row in full)
    for key in ("skipped_in_batch", "filled_random"):
        assert r0.stats[key] + r1.stats[key] == one.stats[key]


def test_epochs_change_the_order_and_reproduce() -> None:
    nb = _neighbors()
    s = HardPairBatchSampler(nb, targets_per_batch=4, hard_per_target=1, sample_from=10, seed=7)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    again = HardPairBatchSampler(nb, targets_per_batch=4, hard_per_target=1, sample_from=10, seed=7)
    again.set_epoch(1)
    assert list(again) == e1
    other_seed = HardPairBatchSampler(nb, targets_per_batch=4, hard_per_target=1, sample_from=10, seed=8)
    other_seed.set_epoch(1)
    assert list(other_seed) != e1


def test_start_batch_skips_exactly_those_batches() -> None:
    nb = _neighbors()
    s = HardPairBatchSampler(nb, targets_per_batch=5, hard_per_target=2, sample_from=10, seed=3)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start_batch=7)
    assert len(s) == len(full) - 7
    assert list(s) == full[7:]
    assert s.batches_per_epoch == len(full)


def test_plain_sampler_without_hard_pairs() -> None:
    nb = _neighbors()
    s = HardPairBatchSampler(nb, targets_per_batch=7, hard_per_target=0, seed=2)
    batches = list(s)
    assert len(batches) == N // 7 and all(len(b) == 7 for b in batches)
    rows = [r for b in batches for r in b]
    assert len(set(rows)) == len(rows) == 7 * (N // 7)  # the last incomplete chunk is dropped
    assert rows != sorted(rows)
    assert s.stats["filled_random"] == s.stats["skipped_in_batch"] == 0


def test_runs_out_of_candidates_and_fills() -> None:
    nb = np.full((50, 4), -1, dtype=np.int64)
    nb[:, 0] = (np.arange(50) + 1) % 50  # one neighbour each
    s = HardPairBatchSampler(nb, targets_per_batch=2, hard_per_target=3, sample_from=4)
    for batch in s:
        assert len(set(batch)) == len(batch) == 8
    assert s.stats["filled_random"] >= 2 * 2 * len(s)


def test_too_few_rows_is_a_data_error() -> None:
    with pytest.raises(DataError) as err:
        HardPairBatchSampler(_neighbors(20, 5), targets_per_batch=4, hard_per_target=4, world_size=2)
    assert err.value.param == "train.batch_size"


def _mask_reference(rows: list[int], nb: np.ndarray, group: int, sample_from: int) -> torch.Tensor:
    b = len(rows)
    mask = torch.zeros(b, b, dtype=torch.bool)
    for i in range(b):
        for j in range(b):
            if i % group == 0 and i < j < i + group and rows[j] in nb[rows[i], :sample_from].tolist():
                mask[i, j] = True
    return mask


@pytest.mark.parametrize("group", [1, 2, 4])
def test_hard_pair_mask_matches_loops(group: int) -> None:
    nb = _neighbors()
    s = HardPairBatchSampler(nb, targets_per_batch=5, hard_per_target=group - 1, sample_from=8, seed=5)
    batches = list(s)
    assert s.stats["filled_random"] == 0
    for batch in batches[:6]:
        rows = torch.tensor(batch)
        got = hard_pair_mask(rows, nb, group, 8)
        assert torch.equal(got, _mask_reference(batch, nb, group, 8))
        if group > 1 and s.stats["filled_random"] == 0:
            assert got.sum() == len(batch) // group * (group - 1)  # every non-target is a hard pair
    # A fill (a row that is not a neighbour) is not hard; the mask follows the sample_from cut.
    rows = torch.tensor([0, int(nb[0, 0]), int(nb[0, 9]), 3])
    nb_no3 = nb.copy()
    nb_no3[0][nb_no3[0] == 3] = -1
    mask = hard_pair_mask(rows, nb_no3, 4, 5)
    assert mask[0].tolist() == [False, True, False, False]
    assert hard_pair_mask(rows, torch.as_tensor(nb_no3), 4, 10)[0].tolist() == [False, True, True, False]
    with pytest.raises(ValueError):
        hard_pair_mask(torch.arange(6), nb, 4, 5)
