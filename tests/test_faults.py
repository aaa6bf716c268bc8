"""Faults with real processes: a SIGKILL'd worker, Redis, Postgres and S3 restarts or outages, a vanished
worker found by the reaper. Each job must end right, run once, and lose nothing that was saved."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from core.spec import resolve_spec
from helip import db, transitions
from helip.settings import Settings
from helip.tables import Job, utcnow
from tests.test_service_e2e import FINISHED, KEY, Service, assert_steps_once, job_spec, production_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
OWNER = hashlib.sha256(KEY.encode()).hexdigest()  # the owner id the API derives from KEY


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from synthworld.world import generate_world

    return generate_world(tmp_path_factory.mktemp("faults") / "world", n_train=200, n_retrieval=40,
                          zeroshot_per_class=1, probe_per_class=(1, 1), shards=2, seed=7)


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url: str, s3, world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = production_service("faults", make_pg_database=make_pg_database, redis_url=redis_url, s3=s3, world=world,
                             tmp_path_factory=tmp_path_factory)
    yield svc
    svc.close()


def small(world, *, steps: int, checkpoint_every: int) -> dict[str, Any]:
    """A tiny job without evaluation: the faults are about running once and keeping state, not metrics."""
    spec = job_spec(world, steps=steps, checkpoint_every=checkpoint_every)
    spec["eval"] = {}
    return spec


def finished_once(svc: Service, job_id: str) -> list[dict[str, Any]]:
    events = svc.events(job_id)
    # "job finished" ends a successful run (core.pipeline); a failed or cancelled one ends with its status event
    ends = [e for e in events if e["message"] == "job finished" or (e["data"] or {}).get("status") in FINISHED]
    assert len(ends) == 1, [e["message"] for e in ends]  # one outcome recorded: the job ran to its end once
    return events


def checkpoints(svc: Service, job_id: str) -> list[dict[str, Any]]:
    """The checkpoints the store keeps, training states included (the newest train.keep_states of a run)."""
    r = svc.http.get(f"/jobs/{job_id}/checkpoints", params={"include": "states", "limit": 100})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def training_past_a_checkpoint(svc: Service, job_id: str) -> Callable[[dict[str, Any]], bool]:
    def check(job: dict[str, Any]) -> bool:
        assert job["status"] in ("queued", "running"), json.dumps(job)[:2000]
        steps = [s["step"] for s in svc.steps(job_id)]
        cks = [c["step"] for c in checkpoints(svc, job_id) if not c["final"]]
        return bool(cks and steps) and max(steps) > max(cks)

    return check


# -- a worker killed mid-training ---------------------------------------------------------------------------


def test_sigkilled_worker_resumes_on_another_once_losing_at_most_one_interval(service: Service, world):
    every = 5
    first = service.start_worker("kill-first", HELIP_STALE_AFTER_SECONDS="6")
    second = None
    try:
        job_id = service.submit(small(world, steps=30, checkpoint_every=every))
        service.wait(job_id, training_past_a_checkpoint(service, job_id), timeout=400, workers=[first])
        service.kill(first)  # SIGKILL to the worker's process group: parent and job child
        killed_at = max(s["step"] for s in service.steps(job_id))
        saved_at = max(c["step"] for c in checkpoints(service, job_id))
        second = service.start_worker("kill-second", HELIP_STALE_AFTER_SECONDS="6")
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=400, workers=[second])
    finally:
        service.kill(first)
        if second is not None:
            service.stop(second)
    assert job["status"] == "succeeded" and job["attempts"] == 2, json.dumps(job)[:3000]
    events = finished_once(service, job_id)
    resumed = [e["data"]["resumed_step"] for e in events if "resumed_step" in (e["data"] or {})]
    assert resumed == [saved_at]  # resumed from the last checkpoint the first worker stored
    lost = killed_at - resumed[0]
    assert 0 < lost <= every, (killed_at, resumed)  # recomputed steps: at most one checkpoint interval
    assert_steps_once(service.steps(job_id), "helip", 30)  # the re-done steps were not stored twice


# -- the broker restarted (no persistence: queued messages are gone) ----------------------------------------


def test_redis_restart_loses_no_job_and_doubles_none(service: Service, world, redis_server):
    # requeue after 5 s: the reaper re-sends queued jobs whose messages the restart wiped
    worker = service.start_worker("redis", HELIP_STALE_AFTER_SECONDS="60", HELIP_REQUEUE_QUEUED_AFTER_SECONDS="5")
    try:
        running = service.submit(small(world, steps=30, checkpoint_every=10))
        service.wait(running, lambda j: j["status"] == "running" and j["stage"] == "training", timeout=300,
                     workers=[worker])
        queued = [service.submit(small(world, steps=2, checkpoint_every=1)) for _ in range(2)]
        redis_server.restart()  # no persistence: the two queued messages and the running one's are lost
        jobs = {i: service.wait(i, lambda j: j["status"] in FINISHED, timeout=400, workers=[worker])
                for i in [running, *queued]}
        assert worker.poll() is None
    finally:
        service.stop(worker)
    for job_id, job in jobs.items():
        assert job["status"] == "succeeded" and job["attempts"] == 1, json.dumps(job)[:2000]
        finished_once(service, job_id)
    for job_id in queued:  # their messages were lost and sent again by the reaper
        assert any(e["message"].startswith("re-sent to the queue") for e in service.events(job_id))
    assert_steps_once(service.steps(running), "helip", 30)


# -- the database restarted under a running job ----------------------------------------------------------------


def test_postgres_restart_while_a_job_runs(service: Service, world, pg_server):
    worker = service.start_worker("pg", HELIP_STALE_AFTER_SECONDS="60")
    try:
        job_id = service.submit(small(world, steps=24, checkpoint_every=6))
        service.wait(job_id, lambda j: j["status"] == "running" and ((j["progress"] or {}).get("step") or 0) >= 3,
                     timeout=300, workers=[worker])
        t0 = time.monotonic()
        pg_server.restart()  # fast shutdown: every open connection is cut, then the same data comes back
        down_s = time.monotonic() - t0
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=400, workers=[worker])
    finally:
        service.stop(worker)
    assert job["status"] == "succeeded" and job["attempts"] == 1, json.dumps(job)[:3000]
    finished_once(service, job_id)
    assert_steps_once(service.steps(job_id), "helip", 24)  # writes during the outage were retried, not dropped
    # every interval's state was stored (the last step's is not: the final weights follow it at once)
    stored = [e["data"]["step"] for e in service.events(job_id) if e["message"].startswith("helip: checkpoint at")]
    assert stored == [6, 12, 18]
    print(f"\npostgres was down for {down_s:.1f} s")


# -- the object store down during checkpoint uploads ------------------------------------------------------------


def test_store_outage_is_retried_and_a_lasting_one_fails_clearly_keeping_the_checkpoint(service: Service, world,
                                                                                          s3_server, tmp_path):
    import torch

    # 6 retries from 0.5 s: a store that is back within ~30 s costs nothing but the wait
    worker = service.start_worker("s3", HELIP_STALE_AFTER_SECONDS="120", HELIP_STORE_RETRIES="6",
                                  HELIP_STORE_BACKOFF_SECONDS="0.5")
    try:
        job_id = service.submit(small(world, steps=400, checkpoint_every=3))
        service.wait(job_id, training_past_a_checkpoint(service, job_id), timeout=300, workers=[worker])
        s3_server.stop()  # a short outage: uploads fail and are retried until it is back
        time.sleep(3)
        s3_server.start()
        resumed_after = max(c["step"] for c in checkpoints(service, job_id))
        service.wait(job_id, lambda j: max([c["step"] for c in checkpoints(service, job_id)]) >= resumed_after + 6,
                     timeout=120, workers=[worker])
        s3_server.stop()  # now it stays down: the job must fail, not hang or lose its state
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=300, workers=[worker])
        assert worker.poll() is None
    finally:
        s3_server.start()
        service.stop(worker)
    assert "retrying" in service.log_tail("s3", 200_000)  # the first outage was ridden out by retries
    assert job["status"] == "failed" and job["attempts"] == 1, json.dumps(job)[:3000]
    assert job["error"]["code"] == "storage_error" and "upload" in job["error"]["message"], job["error"]
    assert "kept on" in job["error"]["message"]
    kept = next(e["data"] for e in finished_once(service, job_id) if (e["data"] or {}).get("kept_checkpoints"))
    folder = Path(service.env["HELIP_DATA_DIR"]) / "kept" / job_id / "attempt-1"  # named in the worker log only
    assert str(folder) not in json.dumps(kept) + job["error"]["message"] and str(folder) in service.log_tail("s3", 10**7)
    assert sorted(p.name for p in folder.glob("*.pt")) == kept["kept_checkpoints"]
    newest = max(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    state = torch.load(newest, map_location="cpu", weights_only=True)  # a real, loadable training state
    stored = max(c["step"] for c in checkpoints(service, job_id))
    assert state["step"] >= stored  # the local one is at least as new as the last one the store holds
    # every checkpoint the store acknowledged is intact there (weed answers 500 for a few seconds after a
    # restart while its volume server re-registers: wait for it as a client would)
    for ck in sorted(checkpoints(service, job_id), key=lambda c: c["step"]):
        deadline = time.monotonic() + 60
        while (r := httpx.get(ck["url"], timeout=30)).status_code >= 500 and time.monotonic() < deadline:
            time.sleep(1)
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == ck["sha256"], (ck["step"], r.text[:300])


# -- a worker that vanished without a trace -----------------------------------------------------------------------


def _insert(settings: Settings, spec: dict[str, Any], **values: Any) -> str:
    """A job row as a vanished worker would leave it (no queue message: only the reaper can move it)."""
    resolved = resolve_spec(spec).model_dump(mode="json")
    with db.session_scope(settings) as s:
        job = transitions.create_job(s, owner=OWNER, spec=resolved, seed=int(resolved["train"]["seed"]))
        s.execute(update(Job).where(Job.id == job.id).values(**values))
        return job.id


def test_reaper_finds_vanished_workers_and_lost_messages(service: Service, world):
    settings = Settings(_env_file=None, database_url=service.env["HELIP_DATABASE_URL"],
                        data_dir=Path(service.env["HELIP_DATA_DIR"]))
    old = utcnow() - timedelta(minutes=10)
    spec = small(world, steps=2, checkpoint_every=1)
    ghost = {"status": "running", "worker_id": "ghost:1:dead", "heartbeat_at": old, "started_at": old}
    retry = _insert(settings, spec, attempts=1, **ghost)
    spent = _insert(settings, spec, attempts=3, **ghost)
    stopping = _insert(settings, spec, attempts=1, cancel_requested=True, **{**ghost, "status": "cancelling"})
    lost = _insert(settings, spec, created_at=old)  # queued, but its message never reached a worker
    worker = service.start_worker("reaper", HELIP_STALE_AFTER_SECONDS="6", HELIP_MAX_ATTEMPTS="3",
                                  HELIP_REQUEUE_QUEUED_AFTER_SECONDS="5")
    try:
        jobs = {i: service.wait(i, lambda j: j["status"] in FINISHED, timeout=400, workers=[worker])
                for i in (retry, spent, stopping, lost)}
    finally:
        service.stop(worker)
    assert jobs[retry]["status"] == "succeeded" and jobs[retry]["attempts"] == 2, json.dumps(jobs[retry])[:2000]
    assert any("re-queued" in e["message"] for e in service.events(retry))
    assert jobs[spent]["status"] == "failed" and jobs[spent]["error"]["code"] == "worker_lost"
    assert jobs[stopping]["status"] == "cancelled"
    assert jobs[lost]["status"] == "succeeded" and jobs[lost]["attempts"] == 1
    assert any(e["message"].startswith("re-sent to the queue") for e in service.events(lost))
    for job_id in (retry, lost):
        finished_once(service, job_id)


def test_resend_waits_double_after_each_send_and_stop_doubling():
    from worker.reaper import MAX_RESEND_DOUBLINGS, resend_due

    t0 = utcnow()
    for sends in range(10):
        wait = 5 * 2 ** min(sends, MAX_RESEND_DOUBLINGS)  # the obvious reference: 5, 10, 20, ... 320, 320
        last = t0 if sends else None
        assert not resend_due(created_at=t0, sends=sends, last_sent=last, now=t0 + timedelta(seconds=wait - 0.5),
                              after_seconds=5)
        assert resend_due(created_at=t0, sends=sends, last_sent=last, now=t0 + timedelta(seconds=wait + 0.5),
                          after_seconds=5)
    # the newest of creation and last send counts: a job re-queued a moment ago is not overdue
    assert not resend_due(created_at=t0 - timedelta(hours=1), sends=1, last_sent=t0, now=t0 + timedelta(seconds=6),
                          after_seconds=5)
