"""The forgetting guard: WiSE interpolation, selection under protect bounds, eval.every, and `helip run` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from core.errors import SpecError
from core.evaluate import evaluate
from core.guard import SELECTED_RUN, judge, select, violations, wise_state
from core.io import Access
from core.models import load_model
from core.pipeline import run_job
from core.progress import CollectingReporter
from core.spec import GuardSpec, parse_spec
from synthworld.world import generate_world
from worker.files import checkpoint_workdir_path
from worker.retention import final_key

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
NAME = "helip-test-tiny"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world") / "w", n_train=240, n_retrieval=48,
                          zeroshot_per_class=1, probe_per_class=(2, 1), seed=3, shards=2)


def guard_spec(world, **guard) -> dict:
    ev = world.eval_spec()
    return {
        "model": {"name": NAME, "config": TINY, "pretrained": None},
        "data": {"train": str(world.train_csv), "workers": 0},
        "mining": {"top_k": 10, "method": "exact"},
        "helip": {"hard_per_target": 3, "sample_from": 10, "gamma": 0.3},
        "train": {"max_steps": 4, "batch_size": 32, "lr": 3e-4, "checkpoint_every": 100, "log_every": 1, "seed": 7},
        "eval": {"zeroshot": ev["zeroshot"], "retrieval": ev["retrieval"], "every": 2},
        "guard": {"wise_alphas": [0.5], **guard},
        "control": False,  # the guard concerns the HELIP run only
    }


def test_wise_state_ends_are_exact_and_middle_is_the_mean():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(5, 3, generator=g), "n": torch.tensor(3)}
    b = {"w": torch.randn(5, 3, generator=g), "n": torch.tensor(7)}
    assert torch.equal(wise_state(a, b, 0.0)["w"], a["w"]) and int(wise_state(a, b, 0.0)["n"]) == 3
    assert torch.equal(wise_state(a, b, 1.0)["w"], b["w"]) and int(wise_state(a, b, 1.0)["n"]) == 7
    torch.testing.assert_close(wise_state(a, b, 0.5)["w"], (a["w"] + b["w"]) / 2)
    torch.testing.assert_close(wise_state(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])


def test_selection_keeps_the_protect_bounds():
    base = {"target": {"acc1": 0.5}, "general": {"acc1": 0.8, "n_samples": 10}}
    g = GuardSpec(objective="target/acc1", protect={"general/acc1": 0.05})
    final = {"source": "final", **judge({"target": {"acc1": 0.9}, "general": {"acc1": 0.6}}, base, g)}
    step = {"source": "step", **judge({"target": {"acc1": 0.7}, "general": {"acc1": 0.76}}, base, g)}
    wise = {"source": "wise", **judge({"target": {"acc1": 0.75}, "general": {"acc1": 0.74}}, base, g)}
    zero = {"source": "wise", **judge(base, base, g)}
    assert violations(final["metrics"], base, g.protect) == {"general/acc1": pytest.approx(0.2)}
    assert not final["ok"] and step["ok"] and not wise["ok"] and zero["ok"]
    assert select([final, step, wise, zero]) is step
    assert select([final, wise, zero]) is zero  # nothing else keeps the bound: the input model
    # the default objective: the mean over every metric (counts left out)
    assert judge(base, base, GuardSpec())["objective"] == pytest.approx((0.5 + 0.8) / 2)


def test_guard_spec_errors_name_the_field(world):
    spec = guard_spec(world)
    for guard, param in [({"objective": "nope/acc1"}, "guard.objective"),
                         ({"objective": "shapes/recall"}, "guard.objective"),
                         ({"protect": {"retrieval/acc1": 0.1}}, "guard.protect"),
                         ({"protect": {"shapes/acc1": -0.1}}, "guard.protect"),
                         ({"wise_alphas": [1.5]}, "guard.wise_alphas")]:
        with pytest.raises(SpecError) as err:
            parse_spec({**spec, "guard": guard})
        assert err.value.param == param, (guard, err.value.param, str(err.value))
    with pytest.raises(SpecError) as err:
        parse_spec({**spec, "eval": {}})
    assert err.value.param == "guard"
    assert parse_spec({k: v for k, v in spec.items() if k != "guard"}).guard is None  # off unless asked


def test_selected_checkpoint_is_stored_as_helip_selected(tmp_path):
    # the workdir file and the store key carry the same name (the key keeps the file name core wrote)
    path = checkpoint_workdir_path(tmp_path, SELECTED_RUN, final=True)
    assert path == tmp_path / "checkpoints" / "helip_selected.pt"
    assert final_key("job-1", SELECTED_RUN, path.name) == "jobs/job-1/checkpoints/helip_selected.pt"
    assert checkpoint_workdir_path(tmp_path, "helip", final=True).name == "helip_final.pt"


def test_guard_in_run_job_wise_ends_reproduce_input_and_boosted(world, tmp_path):
    rep = CollectingReporter()
    res = run_job(guard_spec(world, protect={"retrieval/image_retrieval_recall@5": 0.0}), tmp_path, reporter=rep)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    curves = doc["guard"]
    by_alpha = {w["alpha"]: w["metrics"] for w in curves["wise"]}
    assert set(by_alpha) == {0.0, 0.5, 1.0}
    assert by_alpha[0.0] == doc["baseline"] and by_alpha[1.0] == doc["helip"]  # the job reuses those evaluations
    assert doc["baseline"] != doc["helip"]
    # ... because the interpolation's ends are those models: evaluated here, alpha 0 gives the input model's
    # metrics and alpha 1 the boosted model's, exactly, not approximately
    spec = parse_spec(guard_spec(world, protect={"retrieval/image_retrieval_recall@5": 0.0}))
    m = load_model(NAME, config=TINY, pretrained=None)
    input_state = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
    boosted = torch.load(res.artifacts["checkpoint:helip"], weights_only=True)["state_dict"]
    for alpha, want in ((0.0, doc["baseline"]), (1.0, doc["helip"])):
        m.model.load_state_dict(wise_state(input_state, boosted, alpha))
        assert evaluate(m.model, m.preprocess_val, m.tokenizer, spec.eval, access=Access(), device="cpu",
                        batch_size=256) == want, alpha
    # eval.every: steps 2 and 4 evaluated, on the step metrics and on the checkpoint rows
    evaluated = [s for s in rep.steps if s["run"] == "helip" and "shapes/acc1" in s]
    assert [s["step"] for s in evaluated] == [2, 4]
    assert evaluated[-1]["shapes/acc1"] == doc["helip"]["shapes"]["acc1"]
    rows = {(c["run"], c["step"], c["final"]): c["metrics"] for c in rep.checkpoints}
    assert rows[("helip", 2, False)]["shapes"]["acc1"] == evaluated[0]["shapes/acc1"]
    assert rows[("helip", 4, True)] == doc["helip"]
    assert [s["step"] for s in curves["steps"]] == [2]
    # the selection: the best objective among candidates that keep the bound
    sel = doc["selected"]
    cands = [curves["final"], *curves["steps"], *curves["wise"]]
    assert all(c["ok"] == (c["metrics"]["retrieval"]["image_retrieval_recall@5"]
                           >= doc["baseline"]["retrieval"]["image_retrieval_recall@5"] - 1e-12) for c in cands)
    assert sel["objective"] == max(c["objective"] for c in cands if c["ok"])
    assert sel["source"] in ("final", "step", "wise") and (sel["alpha"] is None) == (sel["source"] != "wise")
    selected = tmp_path / "checkpoints" / "helip_selected.pt"
    assert res.artifacts[f"checkpoint:{SELECTED_RUN}"] == selected and selected.exists()
    row = [c for c in rep.checkpoints if c["run"] == SELECTED_RUN]
    assert len(row) == 1 and row[0]["final"] and row[0]["metrics"] == sel["metrics"]
    reported = {e["model"] for e in rep.evals}
    assert reported == {"baseline", "helip", SELECTED_RUN}  # WiSE points live in the curve, not as eval rows
    assert doc[SELECTED_RUN] == sel["metrics"]
    with Image.open(res.artifacts["guard_curve"]) as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_helip_run_with_a_guard_selection_reproduces_on_a_separate_evaluation(world, tmp_path):
    spec = guard_spec(world, objective="shapes/acc1", protect={"retrieval/text_retrieval_recall@5": 0.02})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "helip.cli", "run", str(path), "--out", str(out), "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "helip_selected checkpoint" in r.stdout
    sel = json.loads((out / "metrics.json").read_text())["selected"]
    assert sel["objective"] == sel["metrics"]["shapes"]["acc1"]
    ckpt = out / "checkpoints" / "helip_selected.pt"
    assert torch.load(ckpt, weights_only=True)["run"] == SELECTED_RUN
    loaded = load_model(NAME, config=TINY, pretrained=str(ckpt))
    again = evaluate(loaded.model, loaded.preprocess_val, loaded.tokenizer, parse_spec(spec).eval, access=Access(),
                     device="cpu", batch_size=256)
    assert again == sel["metrics"]


@pytest.fixture(scope="module")
def sessions(make_pg_database):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from helip import db

    url = make_pg_database()
    db.upgrade(url)
    engine = create_engine(url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def test_the_worker_records_the_selection_as_a_final_helip_selected_row(sessions, tmp_path):
    """Real Postgres and the worker's reporter: the row, its metrics, its key, and resume puts it back."""
    from helip import crud, transitions
    from helip.store import FileStore
    from worker.files import JobFiles
    from worker.reporter import DbReporter, Lease

    with sessions() as s:
        job_id = transitions.create_job(s, owner="local", spec={"model": {"name": "x"}, "data": {"train": "y"}}, seed=1).id
        s.commit()
    store = FileStore(tmp_path / "store", retries=0)
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    selected = work / "checkpoints" / "helip_selected.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "run": SELECTED_RUN}, selected)
    files = JobFiles(store=store, sessions=sessions, job_id=job_id, workdir=work)
    rep = DbReporter(sessions=sessions, lease=Lease(job_id, "w1"), files=files)
    metrics = {"shapes": {"acc1": 0.5}}
    rep.checkpoint(SELECTED_RUN, 4, selected, final=True, metrics=metrics)
    with sessions() as s:
        rows, _ = crud.list_checkpoints(s, job_id=job_id)
    assert [(r.run, r.step, r.final, r.metrics) for r in rows] == [(SELECTED_RUN, 4, True, metrics)]
    assert rows[0].key.endswith(f"{job_id}/checkpoints/helip_selected.pt")
    # publishing the artifact reuses the object (same key), and a new attempt restores it where it was
    assert files.publish({f"checkpoint:{SELECTED_RUN}": selected})[f"checkpoint:{SELECTED_RUN}"]["key"] == rows[0].key
    again = tmp_path / "again"
    JobFiles(store=store, sessions=sessions, job_id=job_id, workdir=again).restore()
    assert (again / "checkpoints" / "helip_selected.pt").read_bytes() == selected.read_bytes()


def test_eval_every_default_is_on_for_small_eval_sets_only(world):
    from core.pipeline import _eval_every

    spec = parse_spec({**guard_spec(world), "eval": {"zeroshot": world.eval_spec()["zeroshot"]}})
    size = 48  # one image per class
    spec.train.batch_size = 256
    assert _eval_every(spec, 100, Access()) == 25  # 48 images <= a tenth of 25 x 256 trained on
    spec.train.batch_size = 16
    assert 0.1 * 25 * 16 < size and _eval_every(spec, 100, Access()) == 0
    spec.eval.every = 7
    assert _eval_every(spec, 100, Access()) == 7  # given: always that
    spec.eval.every = 0
    assert _eval_every(spec, 100, Access()) == 0
