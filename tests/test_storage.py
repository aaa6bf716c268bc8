"""Storage lifecycle with real processes (uvicorn API, Celery workers, Postgres, Redis, S3): the store holds at
most `train.keep_states` states per run plus the final weights, a worker killed while storing a state loses
nothing and leaves nothing once the reaper ran, DELETE removes every object and row, and the per-key quota."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from helip.tables import Artifact, Checkpoint, EvalResult, Event, Job, StepMetric
from tests.test_service_e2e import FINISHED, KEY, Service, job_spec, production_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
OTHER_KEY = "key-storage-other"
QUOTA = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from synthworld.world import generate_world

    return generate_world(tmp_path_factory.mktemp("storage") / "world", n_train=160, n_retrieval=40,
                          zeroshot_per_class=1, probe_per_class=(1, 1), shards=2, seed=5)


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url: str, s3, world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = production_service("storage", make_pg_database=make_pg_database, redis_url=redis_url, s3=s3, world=world,
                             tmp_path_factory=tmp_path_factory, HELIP_API_KEYS=f"{KEY},{OTHER_KEY}",
                             HELIP_MAX_ACTIVE_JOBS_PER_KEY=str(QUOTA), HELIP_STORE_REAP_SECONDS="2")
    bucket, _, run = svc.env["HELIP_STORAGE_URL"].removeprefix("s3://").partition("/")
    svc.bucket, svc.prefix = bucket, run  # type: ignore[attr-defined]
    yield svc
    svc.close()


def spec(world, *, steps: int, every: int, keep: int = 2, control: bool = False) -> dict[str, Any]:
    out = job_spec(world, steps=steps, checkpoint_every=every)
    out["eval"] = {}
    out["train"]["keep_states"] = keep
    out["control"] = control
    return out


def objects(svc: Service, s3, job_id: str) -> dict[str, int]:
    """{key inside the job's prefix: size} of every object the store holds for the job."""
    base = f"{svc.prefix}/jobs/{job_id}/"  # type: ignore[attr-defined]
    return {o.object_name[len(base):]: o.size
            for o in s3.client().list_objects(svc.bucket, prefix=base, recursive=True)}  # type: ignore[attr-defined]


def checkpoint_page(svc: Service, job_id: str, *, states: bool = False) -> list[dict[str, Any]]:
    out, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"include": "states"} if states else {}),
                                  **({"after": after} if after else {})}
        r = svc.http.get(f"/jobs/{job_id}/checkpoints", params=params)
        assert r.status_code == 200, r.text
        out += r.json()["data"]
        if not r.json()["has_more"]:
            return out
        after = out[-1]["id"]


def row_counts(svc: Service, job_id: str) -> dict[str, int]:
    engine = create_engine(svc.env["HELIP_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return {t.__tablename__: conn.scalar(select(func.count()).select_from(t).where(
                (t.id if t is Job else t.job_id) == job_id))
                for t in (Job, Event, StepMetric, EvalResult, Checkpoint, Artifact)}
    finally:
        engine.dispose()


# -- the per-key quota (first: no worker runs, so submitted jobs stay queued) -------------------------------


def test_quota_of_queued_and_running_jobs_per_key(service: Service, world):
    job = spec(world, steps=2, every=1)
    ids = [service.submit(job) for _ in range(QUOTA)]
    r = service.http.post("/jobs", json=job)
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_active_jobs" and str(QUOTA) in err["message"] and r.headers["retry-after"]
    other = httpx.post(f"{service.base}/jobs", json=job, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert other.status_code == 201, other.text  # another key has its own quota
    assert service.http.delete(f"/jobs/{ids[0]}").status_code == 409  # queued: cancel first
    assert service.http.post(f"/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
    ids.append(service.submit(job))  # a finished job no longer counts
    for job_id in [*ids[1:], other.json()["id"]]:
        http = service.http if job_id != other.json()["id"] else httpx.Client(
            base_url=service.base, headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    for job_id in ids:  # finished jobs are deleted with every row
        assert service.http.delete(f"/jobs/{job_id}").status_code == 204
        assert service.http.get(f"/jobs/{job_id}").status_code == 404
        assert sum(row_counts(service, job_id).values()) == 0


# -- a long job with frequent states -----------------------------------------------------------------------


def test_store_holds_at_most_keep_states_plus_finals_at_every_poll(service: Service, s3, world):
    keep, runs = 2, ("helip", "control")
    worker = service.start_worker("keep", HELIP_STALE_AFTER_SECONDS="120")
    most: dict[str, int] = {}
    polls = 0

    def held(job: dict[str, Any]) -> bool:
        nonlocal polls
        keys = [k for k in objects(service, s3, job["id"]) if k.startswith(("states/", "checkpoints/"))]
        polls += 1
        assert len(keys) <= keep + len(runs), keys  # at every poll
        for run in runs:
            n = sum(k.startswith(f"states/{run}/") for k in keys)
            most[run] = max(most.get(run, 0), n)
        return job["status"] in FINISHED

    try:
        job_id = service.submit(spec(world, steps=24, every=2, keep=keep, control=True))
        job = service.wait(job_id, held, timeout=600, workers=[worker])
    finally:
        service.stop(worker)
    assert job["status"] == "succeeded", json.dumps(job)[:3000]
    # each run reached its keep_states (one more only between a new state's upload and the old one's deletion)
    assert set(most) == set(runs) and all(keep <= n <= keep + 1 for n in most.values()), most
    stored = [e["data"] for e in service.events(job_id)
              if e["message"].endswith(" stored") and "final" in (e["data"] or {})]
    assert sorted((d["run"], d["step"]) for d in stored if not d["final"]) == sorted(
        (r, s) for r in runs for s in range(2, 24, 2))  # every interval stored (not the last step: final follows)
    left = objects(service, s3, job_id)
    assert sorted(k for k in left if k.startswith(("states/", "checkpoints/"))) == [
        "checkpoints/control_final.pt", "checkpoints/helip_final.pt"]  # the finals, always; no state
    finals = checkpoint_page(service, job_id)
    assert sorted((c["run"], c["step"], c["final"]) for c in finals) == [("control", 24, True), ("helip", 24, True)]
    with_states = checkpoint_page(service, job_id, states=True)
    assert [c["id"] for c in with_states] == [c["id"] for c in finals]  # no state is left to offer
    for c in finals:
        blob = httpx.get(c["url"], timeout=30).content
        assert hashlib.sha256(blob).hexdigest() == c["sha256"]
    assert job["stored_bytes"] == sum(left.values())  # every object the job holds is counted, once
    assert not any(n.startswith("checkpoint:") for n in row_names(service, job_id))  # a final is one row, not two


def row_names(svc: Service, job_id: str) -> list[str]:
    engine = create_engine(svc.env["HELIP_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return list(conn.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
    finally:
        engine.dispose()


# -- a worker killed between storing a new state and deleting the old one -------------------------------------


@pytest.mark.parametrize("point", ["after_state_upload", "after_state_record"])
def test_worker_killed_while_storing_a_state_loses_nothing_and_the_reaper_leaves_nothing(
        service: Service, s3, world, point: str):
    keep = 2
    # the hook sleeps at `point` on every state; one attempt only: the reaper fails the job, then cleans up
    first = service.start_worker(f"kill-{point}", HELIP_STALE_AFTER_SECONDS="6", HELIP_MAX_ATTEMPTS="1",
                                 HELIP_TEST_PAUSE=f"{point}=6")
    reaper = None
    try:
        job_id = service.submit(spec(world, steps=40, every=2, keep=keep))

        def caught(job: dict[str, Any]) -> bool:  # the third state's object is stored, no state deleted yet
            assert job["status"] in ("queued", "running"), json.dumps(job)[:2000]
            states = [k for k in objects(service, s3, job_id) if k.startswith("states/")]
            recorded = [c for c in checkpoint_page(service, job_id, states=True) if not c["final"]]
            want_rows = keep if point == "after_state_upload" else keep + 1
            return len(states) == keep + 1 and len(recorded) == want_rows

        service.wait(job_id, caught, timeout=400, workers=[first])
        before = objects(service, s3, job_id)
        assert service.http.delete(f"/jobs/{job_id}").status_code == 409  # running: not deletable
        service.kill(first)  # SIGKILL inside the hook's sleep
        recorded = {c["step"]: c for c in checkpoint_page(service, job_id, states=True)}
        reaper = service.start_worker(f"reaper-{point}", HELIP_STALE_AFTER_SECONDS="6", HELIP_MAX_ATTEMPTS="1")
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=300, workers=[reaper])
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", json.dumps(job)[:2000]

        def tidy(job: dict[str, Any]) -> bool:  # the store reaper's rounds run every 2 s
            states = [k for k in objects(service, s3, job_id) if k.startswith("states/")]
            return len(states) == keep and len(checkpoint_page(service, job_id, states=True)) == keep

        service.wait(job_id, tidy, timeout=120, workers=[reaper])
    finally:
        service.kill(first)
        if reaper is not None:
            service.stop(reaper)
    newest = sorted(recorded)[-keep:]
    kept = checkpoint_page(service, job_id, states=True)
    # nothing lost: the newest recorded states are all there, byte for byte
    assert sorted(c["step"] for c in kept) == newest, (sorted(recorded), kept)
    for c in kept:
        blob = httpx.get(c["url"], timeout=30).content
        assert hashlib.sha256(blob).hexdigest() == c["sha256"] == recorded[c["step"]]["sha256"]
    # nothing left behind: each state object in the store is a kept row, and the row count matches
    left = objects(service, s3, job_id)
    state_keys = sorted(k for k in left if k.startswith("states/"))
    assert len(state_keys) == keep and all(f"/{c['step']:09d}/" in "".join(state_keys) for c in kept)
    assert len([k for k in before if k.startswith("states/")]) == keep + 1
    assert service.job(job_id)["stored_bytes"] == sum(left.values())

    # DELETE: another key cannot, the owner removes every object and row
    other = httpx.delete(f"{service.base}/jobs/{job_id}", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert other.status_code == 404
    assert service.http.delete(f"/jobs/{job_id}").status_code == 204
    assert objects(service, s3, job_id) == {}
    assert sum(row_counts(service, job_id).values()) == 0
    assert service.http.get(f"/jobs/{job_id}").status_code == 404
