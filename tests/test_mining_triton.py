"""core.mining.exact_triton: the fused CUDA tile kernel equals the torch path, run in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before Triton compiles anything, so the comparison runs in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import numpy as np, torch
from core.mining import mine_exact
from tests.mining_reference import brute_force
from tests.test_mining import _dyadic, _planted

# Bit-exact products (ties everywhere, duplicate rows), then random unit vectors; several filters;
# stripes that do not divide N and tiles that straddle the diagonal and the last row.
text, image = _dyadic(97, seed=1)
valid = np.random.default_rng(1).random(97) > 0.05
for filters in ({}, {"clamp_negative": False}, {"duplicate_threshold": 0.5, "same_caption_threshold": 0.75}):
    want, want_vals = brute_force(text, image, valid, 9, **filters)
    got = mine_exact(text, image, top_k=9, valid=valid, kernel="triton", block_size=40, window=30, buffer=40,
                     **filters)
    ref = mine_exact(text, image, top_k=9, valid=valid, kernel="torch", block_size=40, window=30, **filters)
    assert got.report["kernel"] == "triton" and ref.report["kernel"] == "torch"
    np.testing.assert_array_equal(got.neighbors, want)
    np.testing.assert_array_equal(got.scores, want_vals.astype(np.float32))
    for key in ("same_caption_filtered", "duplicate_filtered"):
        assert got.report[key] == ref.report[key], (key, got.report[key], ref.report[key])
text, image, valid = _planted(n=280)
got = mine_exact(text, image, top_k=10, valid=valid, kernel="triton", block_size=90)
ref = mine_exact(text, image, top_k=10, valid=valid, kernel="torch", block_size=90)
np.testing.assert_array_equal(got.neighbors, ref.neighbors)
np.testing.assert_allclose(got.scores, ref.scores, atol=1e-6)
assert got.report["same_caption_filtered"] == ref.report["same_caption_filtered"] > 0
assert got.report["duplicate_filtered"] == ref.report["duplicate_filtered"] > 0
print("ok")
"""


def test_triton_kernel_equals_the_torch_path_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
