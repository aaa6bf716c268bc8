"""GET /jobs/{id}/guard over a real Postgres and a job whose forgetting guard really ran (core.pipeline.run_job,
its metrics.json stored and recorded the way the worker does): the owner reads the numbers of metrics.json and
the bounds worked out by hand; another key's job, a job without a guard and an unfinished one are 404s that
say why."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from helip import crud, db, transitions
from helip.settings import Settings
from helip.store import FileStore, job_key
from helip.tables import JobStatus

KEY, OTHER = "key-guard-owner", "key-guard-other"
TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
PROTECTED = "retrieval/image_retrieval_recall@5"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guard-allowed")


@pytest.fixture(scope="module")
def world(allowed: Path):
    from synthworld.world import generate_world

    return generate_world(allowed / "world", n_train=64, n_retrieval=16, zeroshot_per_class=1,
                          probe_per_class=(1, 1), shards=1, seed=5, image_size=64)


@pytest.fixture(scope="module")
def settings(make_pg_database, redis_url: str, allowed: Path, tmp_path_factory) -> Settings:
    url = make_pg_database()
    db.upgrade(url)
    state = tmp_path_factory.mktemp("guard-state")
    return Settings(_env_file=None, data_dir=state, database_url=url, broker_url=redis_url,
                    storage_url=(state / "store").as_uri(), allowed_data=str(allowed),
                    api_keys=f"{KEY},{OTHER}", secret_key="s", queue_name="helip-guard-" + uuid.uuid4().hex[:8],
                    rate_limit_per_minute=100_000)


@pytest.fixture(scope="module")
def client(settings: Settings):
    with TestClient(create_app(settings)) as c:
        yield c


def spec_for(world, guard: dict[str, Any] | None) -> dict[str, Any]:
    ev = world.eval_spec()
    return {"model": {"name": "tiny-guard-test", "config": TINY}, "data": {"train": str(world.train_csv), "workers": 0},
            "mining": {"top_k": 6, "batch_size": 32}, "helip": {"hard_per_target": 1, "sample_from": 6},
            "train": {"batch_size": 8, "max_steps": 4, "lr": 1e-3, "seed": 1},
            "eval": {"zeroshot": ev["zeroshot"], "retrieval": ev["retrieval"], "every": 2, "batch_size": 32},
            "guard": guard}


def submit(client: TestClient, spec: dict[str, Any]) -> str:
    r = client.post("/jobs", json=spec, headers=auth(KEY))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def store_metrics(settings: Settings, job_id: str, path: Path, status: JobStatus = JobStatus.SUCCEEDED) -> None:
    """metrics.json stored and recorded as the worker's publish does, and the job finished."""
    store = FileStore(Path(settings.storage_url.removeprefix("file://")))
    with db.session_factory(settings)() as s:
        key = job_key(job_id, "metrics.json")
        sha, size = store.put_file(key, path)
        crud.record_artifact(s, job_id=job_id, name="metrics", key=key, sha256=sha, size=size)
        assert transitions.finish_job(s, job_id=job_id, status=status)
        s.commit()


@pytest.fixture(scope="module")
def guarded(client: TestClient, settings: Settings, world, tmp_path_factory) -> dict[str, Any]:
    from core.pipeline import run_job
    from core.progress import CollectingReporter

    job_id = submit(client, spec_for(world, {"wise_alphas": [0.5], "protect": {PROTECTED: 0.05}}))
    spec = client.get(f"/jobs/{job_id}", headers=auth(KEY)).json()["spec"]
    workdir = tmp_path_factory.mktemp("guard-work")
    run_job(spec, workdir, access=settings.access(), reporter=CollectingReporter())
    store_metrics(settings, job_id, workdir / "metrics.json")
    return {"id": job_id, "doc": json.loads((workdir / "metrics.json").read_text())}


def same(api: dict[str, Any], stored: dict[str, Any]) -> None:
    """Every field metrics.json has, equal; the fields it lacks (an input model has no source) are null."""
    assert {k: api[k] for k in stored} == stored
    assert all(api[k] is None for k in set(api) - set(stored)), api


def test_the_owner_reads_the_curves_and_the_selection_of_metrics_json(client: TestClient, guarded):
    r = client.get(f"/jobs/{guarded['id']}/guard", headers=auth(KEY))
    assert r.status_code == 200, r.text
    body, doc = r.json(), guarded["doc"]
    guard = doc["guard"]
    assert body["objective"] == "mean" and body["protect"] == {PROTECTED: 0.05}
    same(body["input"], guard["input"])
    same(body["final"], guard["final"])
    assert len(body["steps"]) == len(guard["steps"]) == 1 and body["steps"][0]["step"] == 2  # eval.every 2 of 4
    for api, stored in zip(body["steps"], guard["steps"], strict=True):
        same(api, stored)
    assert [w["alpha"] for w in body["wise"]] == [0.0, 0.5, 1.0]
    for api, stored in zip(body["wise"], guard["wise"], strict=True):
        same(api, stored)
    assert body["selected"] == doc["selected"] and body["selected"]["metrics"] == doc["helip_selected"]
    # the bound by hand: the input model's image R@5 less the max_drop
    base = doc["baseline"]["retrieval"]["image_retrieval_recall@5"]
    assert body["bounds"] == {PROTECTED: pytest.approx(base - 0.05, abs=1e-12)}
    # what the bound means: a candidate is ok exactly when its value is at least the bound
    for c in [body["final"], *body["steps"], *body["wise"]]:
        value = c["metrics"]["retrieval"]["image_retrieval_recall@5"]
        assert c["ok"] == (value >= body["bounds"][PROTECTED] - 1e-12), c
    # the objective (unset: the mean over every metric, counts left out) of the input model, recomputed
    values = [v for vals in doc["baseline"].values() for m, v in vals.items() if not m.startswith("n_")]
    assert body["input"]["objective"] == pytest.approx(sum(values) / len(values), abs=1e-12)


def test_another_keys_job_and_no_key_are_refused(client: TestClient, guarded):
    r = client.get(f"/jobs/{guarded['id']}/guard", headers=auth(OTHER))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get(f"/jobs/{guarded['id']}/guard").status_code == 401
    r = client.get("/jobs/job-000000000000000000000000/guard", headers=auth(KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_job_without_a_guard_or_not_finished_says_why(client: TestClient, settings: Settings, world, guarded,
                                                        tmp_path: Path):
    plain = submit(client, spec_for(world, None))
    r = client.get(f"/jobs/{plain}/guard", headers=auth(KEY))
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "no_guard" and err["param"] == "guard" and "no guard" in err["message"]
    # the same job finished, with a metrics.json but no guard section in it: still no_guard
    (tmp_path / "metrics.json").write_text(json.dumps({"helip": {}, "baseline": {}}))
    store_metrics(settings, plain, tmp_path / "metrics.json")
    assert client.get(f"/jobs/{plain}/guard", headers=auth(KEY)).json()["error"]["code"] == "no_guard"
    queued = submit(client, spec_for(world, {"wise_alphas": [0.5]}))
    r = client.get(f"/jobs/{queued}/guard", headers=auth(KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_available"
    assert "when the job finishes (the job is queued)" in r.json()["error"]["message"]
    with db.session_factory(settings)() as s:
        assert transitions.finish_job(s, job_id=queued, status=JobStatus.FAILED,
                                      error={"code": "x", "message": "x", "param": None})
        s.commit()
    r = client.get(f"/jobs/{queued}/guard", headers=auth(KEY))
    assert r.status_code == 404 and "ended before its guard ran (the job is failed)" in r.json()["error"]["message"]


def test_a_value_that_is_not_a_number_is_null_not_an_error(client: TestClient, settings: Settings, world, guarded,
                                                          tmp_path: Path):
    doc = json.loads(json.dumps(guarded["doc"]))
    doc["guard"]["wise"][1]["objective"] = math.nan  # metrics.json is written by json.dumps: NaN is written as is
    doc["guard"]["wise"][1]["metrics"]["shapes"]["acc1"] = math.inf
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    job = submit(client, spec_for(world, {"wise_alphas": [0.5]}))
    store_metrics(settings, job, tmp_path / "metrics.json")
    r = client.get(f"/jobs/{job}/guard", headers=auth(KEY))
    assert r.status_code == 200, r.text
    wise = r.json()["wise"][1]
    assert wise["objective"] is None and wise["metrics"]["shapes"]["acc1"] is None
    assert r.json()["wise"][0] == client.get(f"/jobs/{guarded['id']}/guard", headers=auth(KEY)).json()["wise"][0]
