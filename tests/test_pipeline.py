"""End to end through core.pipeline.run_job and the `helip run` / `helip mine` CLI on a tiny synthetic world."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from core.data import build_index
from core.errors import DataError, JobCancelled, ModelError
from core.io import Access
from core.mining import read_hard_pairs
from core.models import load_model
from core.pipeline import run_job
from core.progress import CollectingReporter
from synthworld.world import generate_world

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
NAME = "helip-test-tiny"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world") / "w", n_train=240, n_retrieval=48,
                          zeroshot_per_class=1, probe_per_class=(2, 1), seed=3, shards=2)


def tiny_spec(world, **over) -> dict:
    spec = {
        "model": {"name": NAME, "config": TINY, "pretrained": None},
        "data": {"train": str(world.train_csv), "workers": 0},
        "mining": {"top_k": 10, "method": "exact"},
        "helip": {"hard_per_target": 3, "sample_from": 10, "gamma": 0.3},
        "train": {"max_steps": 4, "batch_size": 32, "lr": 1e-4, "checkpoint_every": 2, "log_every": 1, "seed": 7},
        "eval": world.eval_spec(),
        "control": True,
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            spec[section][field] = value
        else:
            spec[section] = value
    return spec


def test_run_job_end_to_end_and_checkpoint_loads_with_open_clip(world, tmp_path):
    import open_clip

    rep = CollectingReporter()
    res = run_job(tiny_spec(world), tmp_path, reporter=rep)

    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert set(doc) >= {"baseline", "helip", "control", "lift"}
    for model in ("baseline", "helip", "control"):
        assert set(doc[model]) == {"shapes", "retrieval", "probe"}
        assert 0.0 <= doc[model]["shapes"]["acc1"] <= 1.0
        assert "image_retrieval_recall@1" in doc[model]["retrieval"]
        assert "lp_acc1" in doc[model]["probe"]
    lift = doc["lift"]["helip_minus_baseline"]["shapes"]["acc1"]
    assert lift == pytest.approx(doc["helip"]["shapes"]["acc1"] - doc["baseline"]["shapes"]["acc1"])
    assert rep.stages == ["embedding", "mining", "training", "evaluating"]
    assert {s["run"] for s in rep.steps} == {"helip", "control"}
    assert all({"contrastive_loss", "margin_loss", "lr", "samples_per_second"} <= set(s) for s in rep.steps
               if s["run"] == "helip")
    assert max(s["step"] for s in rep.steps if s["run"] == "control") == 4  # same steps as HELIP

    # The checkpoint is open_clip's own format: it loads by name + path after registering the config.
    ckpt = res.artifacts["checkpoint:helip"]
    model, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=str(ckpt))
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    base = open_clip.create_model(NAME, pretrained=None)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in saved.items())


def test_mined_rows_are_the_rows_the_trainer_reads(world, tmp_path):
    res = run_job(tiny_spec(world, train__max_steps=1, control=False, eval={}), tmp_path,
                  reporter=CollectingReporter(), mine_only=True)
    mined, keys = read_hard_pairs(res.artifacts["hard_pairs"])
    index = build_index(str(world.train_csv), access=Access())
    table = pq.read_table(res.artifacts["hard_pairs"]).to_pydict()
    assert table["row"] == list(range(len(index)))
    assert table["key"] == index.keys
    assert keys == index.keys
    nb = mined.neighbors
    assert nb.shape == (len(index), 10)
    assert ((nb >= 0) & (nb < len(index)) | (nb == -1)).all()
    assert not (nb == np.arange(len(index))[:, None]).any()
    scores = mined.scores
    finite = ~np.isnan(scores)
    assert (np.diff(np.where(finite, scores, -np.inf), axis=1)[finite[:, 1:]] <= 1e-6).all()  # best first


def test_cancel_then_resume_from_the_saved_state(world, tmp_path):
    spec = tiny_spec(world, control=False, train__max_steps=6, train__checkpoint_every=100,
                     eval={"zeroshot": world.eval_spec()["zeroshot"]})
    with pytest.raises(JobCancelled):
        run_job(spec, tmp_path, reporter=CollectingReporter(cancel_after_steps=3))
    assert (tmp_path / "checkpoints" / "helip_latest.pt").exists()
    saved_step = torch.load(tmp_path / "checkpoints" / "helip_latest.pt", weights_only=True)["step"]
    assert saved_step >= 2
    rep = CollectingReporter()
    run_job(spec, tmp_path, reporter=rep)
    resumed = [e for e in rep.events if "resumed_step" in e["data"]]
    assert resumed and resumed[0]["data"]["resumed_step"] == saved_step
    assert min(s["step"] for s in rep.steps) == saved_step + 1
    assert any("restored" in e["message"] for e in rep.events)  # embeddings and hard pairs reused


def test_ddp_two_cpu_processes_with_gloo(world, tmp_path):
    spec = tiny_spec(world, control=False, train__devices=2, train__max_steps=3,
                     eval={"zeroshot": world.eval_spec()["zeroshot"]})
    rep = CollectingReporter()
    res = run_job(spec, tmp_path, reporter=rep)
    assert res.artifacts["checkpoint:helip"].exists()
    assert [s["step"] for s in rep.steps if s["run"] == "helip"][-1] == 3
    started = [e for e in rep.events if e["message"].startswith("helip: training")]
    assert "2 process(es)" in started[0]["message"]
    assert {c["final"] for c in rep.checkpoints} == {True, False}


def test_offline_tag_fails_before_any_data_is_read(tmp_path):
    spec = {"model": {"name": "ViT-B-32", "pretrained": "openai"},
            "data": {"train": str(tmp_path / "does-not-exist.csv")}}
    t0 = time.time()
    with pytest.raises(ModelError) as err:
        run_job(spec, tmp_path / "job", reporter=CollectingReporter())
    assert err.value.param == "model.pretrained"
    assert "offline" in err.value.message
    assert time.time() - t0 < 30


def test_too_many_bad_samples_fail_with_the_field_named(world, tmp_path):
    rows = world.train_csv.read_text().splitlines()
    broken = tmp_path / "broken"
    broken.mkdir()
    out = [rows[0]]
    for i, line in enumerate(rows[1:121]):
        path, caption = line.split("\t")
        if i % 4 == 0:  # a quarter of the images are not images
            fake = broken / f"{i}.jpg"
            fake.write_bytes(b"not a jpeg at all")
            path = str(fake)
        else:
            path = str(world.train_csv.parent / path)
        out.append(f"{path}\t{caption}")
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(out) + "\n")
    spec = tiny_spec(world, data={"train": str(csv), "workers": 0}, control=False, eval={})
    with pytest.raises(DataError) as err:
        run_job(spec, tmp_path / "job", reporter=CollectingReporter())
    assert err.value.param == "data.max_bad_fraction"
    rep = CollectingReporter()
    spec["data"]["max_bad_fraction"] = 0.5
    spec["train"]["max_steps"] = 1
    run_job(spec, tmp_path / "job2", reporter=rep, mine_only=True)
    warn = [e for e in rep.events if e["level"] == "warning"]
    assert warn and warn[0]["data"]["bad"] == 30


def test_cli_run_and_mine(world, tmp_path):
    spec = tiny_spec(world, control=False, train__max_steps=2, eval={"zeroshot": world.eval_spec()["zeroshot"]})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env_cmd = [sys.executable, "-m", "helip.cli"]
    r = subprocess.run([*env_cmd, "run", str(path), "--out", str(tmp_path / "run"), "-q"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "acc1" in r.stdout
    assert (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "helip_final.pt").exists()
    r = subprocess.run([*env_cmd, "mine", str(path), "--out", str(tmp_path / "mine"), "-q"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "mine" / "hard_pairs.parquet").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "helip": {"hard_per_target": 3, "sampel_from": 5}}))
    r = subprocess.run([*env_cmd, "run", str(bad), "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "helip.sampel_from" in r.stderr


def test_ssl_term_accumulation_separate_miner_and_fast_mining(world, tmp_path):
    """The less travelled options in one small job: SLIP's SimCLR term, gradient accumulation, a separate
    open_clip model as the miner (its tokens are not reused), and the fast (faiss) mining path."""
    spec = tiny_spec(world, control=False, eval={"zeroshot": world.eval_spec()["zeroshot"]},
                     train={"max_steps": 3, "batch_size": 32, "accum_steps": 2, "ssl_weight": 0.5, "lr": 1e-4,
                            "log_every": 1, "seed": 3},
                     mining={"top_k": 10, "method": "fast", "encoder": NAME, "recall_sample": 50})
    rep = CollectingReporter()
    run_job(spec, tmp_path, reporter=rep)
    steps = [s for s in rep.steps if s["run"] == "helip"]
    assert len(steps) == 3
    assert all(s["ssl_loss"] > 0 and s["contrastive_loss"] > 0 for s in steps)
    assert all(s["loss"] == pytest.approx(s["contrastive_loss"] + s["margin_loss"] + s["ssl_loss"]) for s in steps)
    mined = [e for e in rep.events if e["message"].startswith("mined")]
    assert mined[0]["data"]["method"] == "fast"
    assert 0.0 <= mined[0]["data"]["recall_at_k"] <= 1.0


def test_siglip_job_with_locked_image_tower_accumulation_and_checkpointing(world, tmp_path):
    """A SigLIP model (learned logit_bias) trains with the sigmoid loss through the whole job; the locked
    image tower comes back unchanged while the text tower and the bias move."""
    config = {**TINY, "init_logit_bias": -10.0}
    spec = tiny_spec(world, control=False, eval={"zeroshot": world.eval_spec()["zeroshot"]},
                     model={"name": "helip-test-sigmoid", "config": config, "pretrained": None},
                     train={"max_steps": 2, "batch_size": 32, "accum_steps": 2, "lr": 1e-3, "log_every": 1, "seed": 3,
                            "lock_image": True, "grad_checkpointing": True, "warmup": 1})
    rep = CollectingReporter()
    res = run_job(spec, tmp_path, reporter=rep)
    notes = [e["message"] for e in rep.events]
    assert "helip: image tower locked (0 last group(s) trainable)" in notes
    assert "helip: gradient checkpointing on" in notes
    assert len([s for s in rep.steps if s["run"] == "helip"]) == 2
    saved = torch.load(res.artifacts["checkpoint:helip"], weights_only=True)["state_dict"]
    # load_model starts from a fixed seed: the same input model again, to compare with
    base = load_model("helip-test-sigmoid", config=config).model.state_dict()
    moved = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert moved and not any(k.startswith("visual.") for k in moved)
    assert "logit_bias" in moved
