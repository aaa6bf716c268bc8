"""`helip mine --embeddings`: precomputed embeddings in, hard_pairs.parquet out; bad files get clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.errors import DataError, SpecError
from core.mining import read_hard_pairs
from core.mining.embeddings import load_embeddings_file, mine_embeddings_file, mining_options
from tests.mining_reference import brute_force

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "helip.cli", "mine", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def _embeddings(n: int = 120, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    which = rng.integers(0, 8, n)
    text = centres[which] + 0.4 * rng.standard_normal((n, d))
    image = centres[which] + 0.4 * rng.standard_normal((n, d))
    text[5] = text[7]  # one shared caption
    return text.astype(np.float32), image.astype(np.float32)


def test_cli_mines_unnormalised_embeddings_to_the_known_answer(tmp_path: Path) -> None:
    text, image = _embeddings()
    scale = np.random.default_rng(1).uniform(0.5, 3.0, (len(text), 1)).astype(np.float32)
    keys = np.array([f"img-{i:04d}.jpg" for i in range(len(text))])
    path = tmp_path / "emb.npz"
    np.savez(path, text=(text * scale).astype(np.float16), image=image * scale[::-1], keys=keys)
    r = _cli("--embeddings", str(path), "--out", str(tmp_path / "out"), "--top-k", "7", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    mined, back_keys = read_hard_pairs(tmp_path / "out" / "hard_pairs.parquet")
    # The answer: the loop reference on the normalised rows (of the float16 text as stored).
    t = text * scale
    t = t.astype(np.float16).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    v = image / np.linalg.norm(image, axis=1, keepdims=True)
    want, want_vals = brute_force(t, v, None, 7)
    np.testing.assert_array_equal(mined.neighbors, want)
    np.testing.assert_allclose(mined.scores, want_vals, atol=1e-5)
    assert back_keys == keys.tolist()
    assert mined.report["method"] == "exact" and mined.report["normalised"] is True
    assert mined.report["text_rows_not_unit"] > 100 and mined.report["input_dtype"] == "float16"
    assert 7 not in mined.neighbors[5] and 5 not in mined.neighbors[7]  # the same caption is never hard
    report = json.loads(r.stdout[:r.stdout.rindex("}") + 1])
    assert report["top_k"] == 7


def test_cli_fast_with_a_spec_file_and_its_errors(tmp_path: Path) -> None:
    text, image = _embeddings(n=300)
    path = tmp_path / "emb.npz"
    np.savez(path, text=text, image=image)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": "x"}, "data": {"train": "y"},
                                    "mining": {"top_k": 4, "list_size": 40, "probe": 100, "recall_sample": 50}}))
    r = _cli("--embeddings", str(path), "--out", str(tmp_path / "out"), "--method", "fast", "--spec", str(spec), "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    mined, keys = read_hard_pairs(tmp_path / "out" / "hard_pairs.parquet")
    assert mined.report["method"] == "fast" and mined.report["top_k"] == 4 and keys[3] == "3"
    assert mined.report["recall_at_k"] == 1.0  # every list probed: the fast miner is exact
    bad = _cli("--embeddings", str(path), "--out", str(tmp_path / "o2"), "--top-k", "0")
    assert bad.returncode == 1 and "mining.top_k" in bad.stderr and "Traceback" not in bad.stderr
    # The other refusals through the same command, in this process (typer's runner)
    from typer.testing import CliRunner

    from helip.cli import app

    runner = CliRunner()
    for args, message in ((["--embeddings", str(tmp_path / "nope.npz")], "does not exist"),
                          ([str(spec), "--embeddings", str(path)], "not both"),
                          ([str(spec), "--top-k", "3"], "go with --embeddings")):
        res = runner.invoke(app, ["mine", *args, "--out", str(tmp_path / "o3")])
        assert res.exit_code == 1 and message in res.output, res.output


@pytest.mark.parametrize("arrays,match,param", [
    ({"text": np.ones((4, 3))}, "no `image` array", "embeddings"),
    ({"txt": np.ones((4, 3)), "image": np.ones((4, 3))}, "no `text` array", "embeddings"),
    ({"text": np.ones((4, 3)), "image": np.ones((5, 3))}, "same shape", "embeddings"),
    ({"text": np.ones((4, 3)), "image": np.ones((4, 2))}, "same shape", "embeddings"),
    ({"text": np.ones(4), "image": np.ones(4)}, r"\[N, d\]", "embeddings.text"),
    ({"text": np.ones((4, 3), dtype=np.int32), "image": np.ones((4, 3))}, "float16 or float32", "embeddings.text"),
    ({"text": np.ones((4, 3)), "image": np.where(np.arange(12).reshape(4, 3) == 7, np.nan, 1.0)},
     r"1 rows of `image` hold NaN .*rows \[2\]", "embeddings.image"),
    ({"text": np.vstack([np.ones((3, 3)), np.zeros((1, 3))]), "image": np.ones((4, 3))}, "all zeros",
     "embeddings.text"),
    ({"text": np.ones((4, 3)), "image": np.ones((4, 3)), "keys": np.array(["a", "b"])}, "4 strings",
     "embeddings.keys"),
])
def test_bad_embedding_files_are_named(tmp_path: Path, arrays, match: str, param: str) -> None:
    path = tmp_path / "e.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as err:
        mine_embeddings_file(path, tmp_path / "out", mining_options())
    assert err.value.param == param
    assert not (tmp_path / "out").exists()


def test_not_an_npz_and_mining_options(tmp_path: Path) -> None:
    path = tmp_path / "e.npz"
    path.write_text("text,image\n1,2\n")
    with pytest.raises(DataError, match="cannot read"):
        load_embeddings_file(path)
    np.save(tmp_path / "one.npy", np.ones((3, 3)))
    with pytest.raises(DataError, match="single .npy"):
        load_embeddings_file(tmp_path / "one.npy")
    only = tmp_path / "mining.yaml"
    only.write_text("method: fast\nprobe: 3\n")
    opts = mining_options(only, top_k=9)
    assert (opts.method, opts.probe, opts.top_k) == ("fast", 3, 9)
    only.write_text("probes: 3\n")
    with pytest.raises(SpecError) as err:
        mining_options(only)
    assert err.value.param == "mining.probes"
    with pytest.raises(SpecError) as err:
        mining_options(None, method="fastest")
    assert err.value.param == "mining.method"
