"""The benchmark scripts run at a tiny size and write valid JSON; their own math against slow references.

No timing is asserted anywhere: only that the numbers exist, are finite and are consistent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data as bdata
from bench import e2e as be2e
from bench import gpu as bgpu
from bench import mining as bmining
from bench import report as breport
from bench import step as bstep
from bench.common import fit_exponent, isolated, table

torch.set_num_threads(1)  # (tests/conftest.py has set OMP_NUM_THREADS and HF_HUB_OFFLINE before any import)


def _finite_positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# --- bench/common.py -------------------------------------------------------------------------------


def test_fit_exponent_recovers_a_power_law():
    ns = [1e3, 1e4, 1e5]
    assert fit_exponent(ns, [3 * n**2 for n in ns]) == pytest.approx(2.0)
    assert fit_exponent(ns, [5 * n**1.5 for n in ns]) == pytest.approx(1.5)
    assert math.isnan(fit_exponent([10], [1.0]))


def test_table_is_markdown_with_one_row_per_dict():
    out = table([{"a": 1.23456, "b": None}, {"a": 12345.0, "b": "x"}], ["a", "b"]).splitlines()
    assert out[0] == "| a | b |" and len(out) == 4
    assert out[2] == "| 1.23 | - |" and out[3] == "| 12,345 | x |"


def _child_probe(size_mib: int) -> dict:
    # Every byte written: a zeroed bytearray(n) can be untouched mmap'ed pages that never count in RSS.
    blob = bytearray(b"\x01") * (size_mib * 2**20)
    return {"len": len(blob)}


@pytest.mark.slow
def test_isolated_runs_in_a_fresh_process_and_sees_its_peak():
    small = isolated("tests.test_bench:_child_probe", size_mib=1)
    big = isolated("tests.test_bench:_child_probe", size_mib=200)
    assert big["len"] == 200 * 2**20
    assert big["rss_peak_mib"] - small["rss_peak_mib"] > 150


# --- bench/step.py ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,group", [(16, 4), (12, 3), (8, 2)])
def test_hard_pair_layout_gives_each_target_exactly_its_companions(batch, group):
    from core.sampler import hard_pair_mask

    rows, mined = bstep.hard_pair_layout(batch, group, sample_from=10)
    assert len(set(rows.tolist())) == batch and mined.shape[1] >= 10
    mask = hard_pair_mask(rows, mined, group, 10)
    for i in range(batch):  # the obvious rule, one cell at a time
        for j in range(batch):
            expected = i % group == 0 and i < j < i + group
            assert bool(mask[i, j]) == expected, (i, j)


def test_step_main_writes_valid_json(tmp_path):
    out = tmp_path / "step.json"
    doc = bstep.main(["--batch", "8", "--repeats", "2", "--steps", "1", "--warmup", "1", "--no-memory",
                      "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "step" and saved["config"]["batch"] == 8
    for v in ("plain", "helip"):
        assert _finite_positive(saved[v]["s_per_step"])
        assert saved[v]["samples_per_s"] == pytest.approx(8 / saved[v]["s_per_step"])
        assert len(saved[v]["runs"]) == 2
    assert saved["ratio_time"] == pytest.approx(saved["helip"]["s_per_step"] / saved["plain"]["s_per_step"])
    assert saved["met"]["time"] == (saved["ratio_time"] <= 1.05) and saved["met"]["memory"] is None
    assert doc["ratio_time"] == saved["ratio_time"]


def test_memory_one_reports_growth_from_the_steps():
    res = bstep.memory_one("helip", batch=8, steps=1)
    assert res["variant"] == "helip" and res["step_peak_delta_mib"] >= 0 and res["rss_before_steps_mib"] > 0


def test_step_rejects_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="multiple"):
        bstep.build(batch=10, hard_per_target=3)


# --- bench/mining.py -------------------------------------------------------------------------------


def _loop_topk(t: np.ndarray, v: np.ndarray, k: int) -> list[list[int]]:
    n = len(t)
    out = []
    for i in range(n):
        s = [(float(np.dot(t[i], t[j]) * np.dot(v[i], v[j])), j) for j in range(n) if j != i]
        out.append([j for _, j in sorted(s, key=lambda p: -p[0])[:k]])
    return out


def test_brute_force_full_and_blocked_match_the_loop_reference():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((37, 8)).astype(np.float32)
    v = rng.standard_normal((37, 8)).astype(np.float32)
    ref = _loop_topk(t, v, 5)
    full, mode = bmining.brute_force_topk(torch.from_numpy(t), torch.from_numpy(v), 5)
    blocked, mode_b = bmining.brute_force_topk(torch.from_numpy(t), torch.from_numpy(v), 5, block=7, budget=0)
    assert mode.startswith("full") and mode_b.startswith("blocked")
    assert full.tolist() == ref and blocked.tolist() == ref


def test_recall_at_k_matches_a_set_reference():
    rng = np.random.default_rng(1)
    exact = np.stack([rng.permutation(30)[:6] for _ in range(50)])
    fast = np.stack([rng.permutation(30)[:6] for _ in range(50)])
    exact[3, 4:] = -1  # short list: pads are ignored
    fast[7] = exact[7]
    ref = np.mean([len(set(e[e >= 0]) & set(f[f >= 0])) / len(e[e >= 0]) for e, f in zip(exact, fast, strict=True)])
    assert bmining.recall_at_k(fast, exact) == pytest.approx(ref)
    assert bmining.recall_at_k(exact, exact) == pytest.approx(1.0)


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_synthetic_embeddings_are_normalised_clustered_and_have_planted_duplicates(impl):
    n = 2000
    if impl == "numpy":
        t, v = bmining.synthetic_embeddings(n, 64, seed=3)
        t2, _ = bmining.synthetic_embeddings(n, 64, seed=3)
        assert np.array_equal(t, t2)
    else:
        tt, vv = bmining.synthetic_embeddings_torch(n, 64, seed=3, device="cpu", dtype=torch.float32)
        t, v = tt.numpy(), vv.numpy()
    assert t.shape == v.shape == (n, 64)
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-3) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)
    ct, cv = t @ t.T, v @ v.T
    np.fill_diagonal(ct, 0)
    np.fill_diagonal(cv, 0)
    assert (ct > 0.995).any(), "no shared captions planted"
    assert ((cv > 0.98) & (ct < 0.995)).any(), "no near-duplicate images planted"
    # texts and images of one pair agree more than random pairs (correlated towers)
    assert float((t * v).sum(1).mean()) > float((t * v[::-1]).sum(1).mean()) + 0.1
    assert np.sort(ct, axis=1)[:, -10:].mean() > 0.3  # clustered: every row has close neighbours


def test_blocked_loops_complete_or_extrapolate():
    t, v = bmining.synthetic_embeddings_torch(300, 16, seed=0, device="cpu", dtype=torch.float32)
    full = bmining.blocked_brute_force(t, v, 5, rows=64)
    assert full["complete"] and full["queries_done"] == 300 and not full["full_is_extrapolated"]
    capped = bmining.blocked_brute_force(t, v, 5, rows=64, cap_s=0.0)
    assert not capped["complete"] and capped["queries_done"] == 64 and capped["full_is_extrapolated"]
    assert _finite_positive(capped["seconds_full"])
    exact = bmining.exact_capped(t, v, 5)
    assert exact["complete"] and exact["report"]["method"] == "exact"


@pytest.mark.slow
def test_mining_main_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(bmining, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("HELIP_BENCH_CACHE", str(tmp_path / "cache"))
    out, png = tmp_path / "mining.json", tmp_path / "mining.png"
    bmining.main(["--sizes", "300", "600", "--methods", "exact", "fast", "--d", "32", "--out", str(out),
                  "--plot", str(png)])
    doc = json.loads(out.read_text())
    assert {(r["method"], r["n"]) for r in doc["rows"]} == {(m, n) for m in ("exact", "fast") for n in (300, 600)}
    for r in doc["rows"]:
        assert _finite_positive(r["seconds"]) and r["rss_peak_mib"] >= r["rss_data_mib"] > 0
    fast = [r for r in doc["rows"] if r["method"] == "fast"]
    assert all(0.9 <= r["recall_vs_exact_all_rows"] <= 1.0 for r in fast)
    assert set(doc["exponents"]) == {"exact", "fast"} and "exact_1m_seconds" in doc["extrapolated"]
    assert png.stat().st_size > 1000


# --- bench/data.py ---------------------------------------------------------------------------------


def test_dataset_is_the_same_pairs_as_csv_and_shards(tmp_path):
    from core.data import build_index, load_image
    from core.io import Access

    ds = bdata.write_dataset(tmp_path, 10, size=64, shards=3)
    assert bdata.write_dataset(tmp_path / "again", 10, size=64, shards=3, jobs=2)["mean_jpeg_kib"] == \
        pytest.approx(ds["mean_jpeg_kib"])  # the bytes do not depend on the number of processes
    a = Access()
    csv_idx, tar_idx = build_index(ds["csv"], access=a), build_index(ds["shards"], access=a)
    assert len(csv_idx) == len(tar_idx) == 10 and not csv_idx.bad and not tar_idx.bad
    assert csv_idx.captions == tar_idx.captions
    assert np.array_equal(np.asarray(load_image(csv_idx, 4, a)), np.asarray(load_image(tar_idx, 4, a)))
    assert load_image(csv_idx, 4, a).size == (64, 64)


def test_data_main_writes_json(tmp_path):
    out = tmp_path / "data.json"
    bdata.main(["--models", "tiny", "--images", "24", "--workers", "0", "--batch", "8", "--encode-batch", "4",
                "--no-s3", "--workdir", str(tmp_path / "w"), "--out", str(out), "--plot", str(tmp_path / "d.png")])
    doc = json.loads(out.read_text())
    assert (tmp_path / "d.png").stat().st_size > 1000
    assert [r["source"] for r in doc["rows"]] == ["csv local", "tar local"]
    enc = doc["encode"]["tiny"]["images_per_s"]
    for r in doc["rows"]:
        assert r["images"] == 24 and r["counted"] == 16 and _finite_positive(r["images_per_s"])
        assert r["ratio_to_encode"] == pytest.approx(r["images_per_s"] / enc)


@pytest.mark.slow
def test_data_through_a_real_s3_server(tmp_path):
    pytest.importorskip("minio")
    from tests.services import ServiceMissing

    try:
        bdata.main(["--models", "tiny", "--images", "16", "--workers", "0", "--batch", "8", "--encode-batch", "4",
                    "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "d.json"), "--plot", ""])
    except ServiceMissing as exc:
        pytest.skip(str(exc))
    doc = json.loads((tmp_path / "d.json").read_text())
    s3_rows = [r for r in doc["rows"] if r["source"].endswith("s3")]
    assert len(s3_rows) == 2 and all(_finite_positive(r["images_per_s"]) for r in s3_rows)


# --- bench/gpu.py and bench/report.py --------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu")
    # Everything but torch.compile (minutes on 2 CPU cores).
    bgpu.main(["--smoke", "--out", str(out), "--only", "encode", "step_b32_eager", "step_b16_eager",
               "mining_exact", "mining_fast", "data", "jobpath", "mining_job"])
    return json.loads((out / "gpu.json").read_text())


def test_gpu_smoke_runs_every_phase_without_errors(gpu_smoke):
    assert gpu_smoke["done"] and gpu_smoke["smoke"] and not gpu_smoke["errors"] and not gpu_smoke["skipped"]
    ph = gpu_smoke["phases"]
    assert set(ph) == {"encode", "step_b32_eager", "step_b16_eager", "mining_exact", "mining_fast", "data", "jobpath",
                       "mining_job"}
    rows = ph["jobpath"]["tiny"]
    assert [r["what"] for r in rows][:2] == ["embedding stage (images/s)", "training stage (samples/s)"]
    assert all(_finite_positive(r["ratio"]) for r in rows)
    assert ph["mining_job"]["n"] == 3000 and _finite_positive(ph["mining_job"]["seconds"])
    assert _finite_positive(ph["step_b32_eager"]["helip"]["samples_per_s"])
    m = ph["mining_exact"]
    assert m["exact"]["complete"] and m["reference"]["complete"] and m["anchor_loop"]["single_product"]
    assert m["ratio_exact_to_reference"] == pytest.approx(m["exact"]["seconds_full"] / m["reference"]["seconds_full"])
    assert all(_finite_positive(r["images_per_s"]) for r in ph["data"]["rows"])
    fast = ph["mining_fast"]
    assert fast["exact"]["complete"] and 0.9 <= fast["recall_at_k"] <= 1.0 and fast["recall_queries"] == 2000
    assert fast["speedup_vs_exact"] == pytest.approx(fast["exact"]["seconds_full"] / fast["fast_seconds"])


def test_jobpath_main_times_the_job_against_open_clips_trainer(tmp_path):
    """bench.jobpath on CPU at toy sizes: every row is there, with open_clip_train.main as a reference."""
    from bench import jobpath

    doc = jobpath.main(["--n", "256", "--batch", "32", "--steps", "4", "--bare-steps", "2", "--embed-batch", "64",
                        "--repeats", "2", "--out", str(tmp_path / "jp.json")])
    assert len(doc["repeats"]["open_clip_samples_per_s"]) == 2 and len(doc["repeats"]["job_train_samples_per_s"]) == 2
    rows = {(r["what"], r["reference is"]): r for r in doc["rows"]}
    assert ("training stage (samples/s)", "open_clip_train.main, same data") in rows
    for r in doc["rows"]:
        assert _finite_positive(r["job"]) and _finite_positive(r["reference"])
        assert r["ratio"] == pytest.approx(r["job"] / r["reference"])
    overlap = rows[("mining top-50 overlap, float16 vs float32", "float32 exact on 256 check pairs")]["ratio"]
    assert 0.95 <= overlap <= 1.0
    assert json.loads((tmp_path / "jp.json").read_text())["rows"] == doc["rows"]


def test_gpu_budget_skips_phases_that_do_not_fit(tmp_path):
    doc = bgpu.main(["--smoke", "--out", str(tmp_path), "--budget", "1", "--only", "encode", "mining_exact"])
    assert set(doc["skipped"]) == {"encode", "mining_exact"} and not doc["phases"]
    assert json.loads((tmp_path / "gpu.json").read_text())["skipped"] == doc["skipped"]


def test_report_fills_the_gpu_section_idempotently(gpu_smoke, tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text(f"# before\n\n{breport.BEGIN}\nold text\n{breport.END}\n\n# after\n")
    src = tmp_path / "gpu.json"
    src.write_text(json.dumps(gpu_smoke))
    breport.main([str(src), "--doc", str(md), "--save", str(tmp_path / "saved" / "gpu.json")])
    once = md.read_text()
    assert "old text" not in once and once.startswith("# before") and once.rstrip().endswith("# after")
    assert "smoke run, not a measurement" in once and "**Targets on the GPU**" in once
    assert "| step_b32_eager | tiny | 16 |" in once
    assert "under 30 s" in once and "under 6 s with recall@50 >= 0.99" in once
    assert "**The job's own path**" in once and "- job path, tiny: embedding stage (images/s) at least 0.9x" in once
    assert "the job's mining stage at 3,000 pairs under 30 s" in once
    breport.main([str(src), "--doc", str(md)])
    assert md.read_text() == once
    assert json.loads((tmp_path / "saved" / "gpu.json").read_text()) == gpu_smoke
    with pytest.raises(ValueError, match="markers"):
        breport.fill("no markers here", "x")


def test_run_gpu_script_is_short_and_installs_the_carried_wheels():
    text = (Path(bgpu.__file__).parent / "run_gpu.sh").read_text()
    assert len(text) < 2000
    assert "--target /tmp/site .whl/*.whl" in text and "PYTHONUNBUFFERED=1" in text and "bench/gpu.py" in text


# --- bench/e2e.py ----------------------------------------------------------------------------------


def test_e2e_spec_is_a_valid_job_spec(tmp_path):
    from core.spec import parse_spec

    class _World:
        train_csv = tmp_path / "train.csv"

        def eval_spec(self):
            return {"retrieval": [{"name": "r", "data": str(tmp_path / "r.csv")}]}

    spec = parse_spec(be2e.job_spec(_World(), tmp_path / "base.pt", max_steps=3))
    assert spec.train.max_steps == 3 and spec.control is False and spec.helip.gamma > 0
    env = be2e._env(tmp_path)
    assert env["HELIP_DATA_DIR"] == str(tmp_path) and "HELIP_DATABASE_URL" not in env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_e2e_main_runs_cli_and_service(tmp_path):
    out = tmp_path / "e2e.json"
    be2e.main(["--data-dir", str(tmp_path / "d"), "--n-train", "200", "--pretrain-steps", "3", "--max-steps", "2",
               "--out", str(out)])
    doc = json.loads(out.read_text())
    stages = doc["helip_run"]["stages_s"]
    assert set(stages) == set(be2e.STAGES) and all(s is not None and s >= 0 for s in stages.values())
    assert doc["helip_run"]["wall_s"] >= doc["helip_run"]["run_job_s"] > 0
    assert doc["overhead_s"] == pytest.approx(doc["service"]["submit_to_done_wall_s"] - doc["helip_run"]["wall_s"])
