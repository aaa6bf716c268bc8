"""experiments/paired_zeroshot.py's statistic: the paired difference of two per-image correctness vectors and its
standard error, against the obvious reference (mean and population deviation of the per-image differences)."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paired():
    spec = importlib.util.spec_from_file_location("paired_zeroshot", ROOT / "experiments" / "paired_zeroshot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paired_zeroshot"] = module
    spec.loader.exec_module(module)
    return module


def test_known_answer(paired):
    a = torch.tensor([True, True, True, False, False, True])
    b = torch.tensor([True, False, False, True, False, True])
    diff, se, only_a, only_b = paired.paired_difference(a, b)
    assert (only_a, only_b) == (2, 1)
    assert diff == pytest.approx(1 / 6)
    # d = [0, 1, 1, -1, 0, 0]: mean 1/6, mean of squares 3/6, population variance 1/2 - 1/36 = 17/36
    assert se == pytest.approx(math.sqrt(17 / 36 / 6))


def test_matches_the_reference_on_random_vectors(paired):
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 500):
        a, b = torch.rand(n, generator=g) < 0.4, torch.rand(n, generator=g) < 0.35
        d = [int(x) - int(y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
        diff, se, _, _ = paired.paired_difference(a, b)
        assert diff == pytest.approx(statistics.fmean(d))
        assert se == pytest.approx(statistics.pstdev(d) / math.sqrt(n), abs=1e-12)


def test_identical_predictions_have_no_difference(paired):
    a = torch.tensor([True, False, True])
    assert paired.paired_difference(a, a.clone()) == (0.0, 0.0, 0, 0)
