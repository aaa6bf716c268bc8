"""The worker without Celery: claim, lease, DbReporter rows, uploads, resume, outcomes, reaper (real Postgres)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker

from core.errors import DataError, JobCancelled
from helip import crud, db, transitions
from helip.settings import Settings
from helip.store import FileStore
from helip.tables import Artifact, Checkpoint, Event, Job, StepMetric, utcnow
from worker.celery_app import make_celery, worker_argv
from worker.files import JobFiles
from worker.reaper import reap, reap_stale_jobs
from worker.reporter import DbReporter, Heartbeat, Lease
from worker.runner import execute_job

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"model": {"name": "tiny"}, "data": {"train": "/nowhere/train.csv"}}


@pytest.fixture(scope="module")
def db_url(make_pg_database) -> str:
    url = make_pg_database()
    db.upgrade(url)  # the real migration, not create_all
    return url


@pytest.fixture(scope="module")
def sessions(db_url: str):
    engine = create_engine(db_url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(_env_file=None, database_url=db_url, broker_url="memory://",
                    storage_url=(tmp_path / "store").as_uri(), data_dir=tmp_path / "data",
                    heartbeat_seconds=0.05, stale_after_seconds=30, max_attempts=3)


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store", retries=0)


def new_job(sessions, **values: Any) -> str:
    with sessions() as s:
        job = transitions.create_job(s, owner="local", spec=SPEC, seed=7)
        if values:
            s.execute(update(Job).where(Job.id == job.id).values(**values))
        s.commit()
        return job.id


def get(sessions, job_id: str) -> Job:
    with sessions() as s:
        return crud.get_job(s, job_id=job_id)


def rows(sessions, table, job_id: str) -> list:
    with sessions() as s:
        return list(s.scalars(select(table).where(table.job_id == job_id).order_by(table.id)))


@dataclass
class Result:
    metrics: dict
    artifacts: dict[str, Path]
    summary: dict = field(default_factory=dict)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fake_job(calls: list, *, die_after_checkpoint: bool = False):
    """A pipeline with the real one's calls and files, minus the ML: embed, mine, 3 checkpoints, evaluate."""

    def pipeline(spec, workdir: Path, *, access, reporter, device=None, **options):
        calls.append({"workdir": workdir, "files": sorted(p.relative_to(workdir).as_posix()
                                                          for p in workdir.rglob("*") if p.is_file())})
        reporter.stage("embedding")
        reporter.progress("embedding", 5, 10)
        write(workdir / "embeddings.npz", b"emb")
        reporter.stage("mining")
        write(workdir / "hard_pairs.parquet", b"pairs")
        reporter.stage("training")
        latest = workdir / "checkpoints" / "helip_latest.pt"
        start = 0
        if latest.exists():
            start = int(latest.read_bytes().split(b"=")[1])
            reporter.event(f"helip: resumed from step {start}", data={"run": "helip", "resumed_step": start})
        for step in range(start + 1, 7):
            reporter.step("helip", step, 6, {"loss": 1.0 / step, "lr": float("nan") if step == 1 else 0.1})
            if step % 2 == 0:
                write(latest, f"state={step}".encode())
                reporter.checkpoint("helip", step, latest, final=False)
                if die_after_checkpoint and step == 4:
                    raise KeyboardInterrupt  # not an Exception: like a killed process, nothing is recorded
        final = write(workdir / "checkpoints" / "helip_final.pt", b"final")
        reporter.checkpoint("helip", 6, final, final=True)
        reporter.stage("evaluating")
        reporter.eval_result("baseline", "shapes", {"acc1": 0.5})
        write(workdir / "eval_baseline.json", b"{}")
        reporter.eval_result("helip", "shapes", {"acc1": 0.75})
        metrics = write(workdir / "metrics.json", b'{"helip": {}}')
        return Result(metrics={"baseline": {"shapes": {"acc1": 0.5}}, "helip": {"shapes": {"acc1": 0.75}}},
                      artifacts={"hard_pairs": workdir / "hard_pairs.parquet", "metrics": metrics,
                                 "checkpoint:helip": final},
                      summary={"steps": 6, "where": workdir})

    return pipeline


def test_a_job_runs_once_and_records_rows_files_and_result(sessions, settings, store):
    job_id = new_job(sessions)
    calls: list = []
    status = execute_job(job_id, settings=settings, sessions=sessions, store=store, pipeline=fake_job(calls),
                         worker_id="w1")
    assert status == "succeeded"
    job = get(sessions, job_id)
    assert (job.status, job.attempts, job.worker_id, job.stage) == ("succeeded", 1, "w1", "evaluating")
    assert job.started_at is not None and job.finished_at is not None
    assert job.progress["step"] == 6 and job.progress["total_steps"] == 6
    # NaN is not JSON: it is stored as null rather than failing the write
    steps = rows(sessions, StepMetric, job_id)
    assert [r.step for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0].values["lr"] is None and steps[1].values["loss"] == 0.5
    with sessions() as s:
        assert crud.eval_results(s, job_id=job_id) == {"baseline": {"shapes": {"acc1": 0.5}},
                                                      "helip": {"shapes": {"acc1": 0.75}}}
    # the states at steps 2 and 4 were stored, then deleted once the final weights were (the state at the
    # last step was not uploaded at all: the final weights follow it at once)
    cks = rows(sessions, Checkpoint, job_id)
    assert [(c.step, c.final) for c in cks] == [(6, True)]
    stored = [e.data for e in rows(sessions, Event, job_id) if e.message.endswith("stored")]
    assert [(d["step"], d["final"]) for d in stored] == [(2, False), (4, False), (6, True)]
    assert not store.exists(stored[0]["key"]) and not store.exists(stored[1]["key"])
    assert not (store.root / "jobs" / job_id / "states").exists() or not any(
        p.is_file() for p in (store.root / "jobs" / job_id / "states").rglob("*"))
    path = store.local_path(cks[0].key)
    assert sha(path) == cks[0].sha256 and path.stat().st_size == cks[0].size and path.read_bytes() == b"final"
    arts = {a.name: a for a in rows(sessions, Artifact, job_id)}
    # the final weights are a checkpoint row only, not also an artifact row
    assert set(arts) == {"embeddings", "hard_pairs", "eval:baseline", "metrics"}
    assert job.result["artifacts"]["checkpoint:helip"]["key"] == cks[0].key  # not uploaded twice
    assert store.local_path(arts["hard_pairs"].key).read_bytes() == b"pairs"
    assert job.result["artifacts"]["metrics"]["sha256"] == hashlib.sha256(b'{"helip": {}}').hexdigest()
    assert "metrics" not in job.result  # the metrics are the eval rows and metrics.json, once each
    assert job.stored_bytes == cks[0].size + sum(a.size for a in arts.values())
    assert isinstance(job.result["summary"]["where"], str)
    messages = [e.message for e in rows(sessions, Event, job_id)]
    assert "stage: training" in messages and "attempt 1 started" in messages
    assert not calls[0]["workdir"].exists()  # the workdir is cleaned up
    # a redelivered message finds nothing to claim and runs nothing
    assert execute_job(job_id, settings=settings, sessions=sessions, store=store, pipeline=fake_job(calls)) is None
    assert len(calls) == 1 and get(sessions, job_id).attempts == 1


def test_a_running_job_with_a_live_heartbeat_is_not_claimed(sessions, settings, store):
    job_id = new_job(sessions, status="running", worker_id="other", attempts=1, heartbeat_at=utcnow())
    calls: list = []
    assert execute_job(job_id, settings=settings, sessions=sessions, store=store, pipeline=fake_job(calls)) is None
    assert calls == [] and get(sessions, job_id).worker_id == "other"


@pytest.mark.parametrize("exc, code, param", [
    (DataError("12 of 40 samples are unusable", param="data.max_bad_fraction"), "data_error", "data.max_bad_fraction"),
    (ZeroDivisionError("division by zero"), "internal_error", None),
])
def test_failures_end_failed_with_the_error(sessions, settings, store, exc, code, param):
    job_id = new_job(sessions)

    def pipeline(spec, workdir, *, access, reporter, device=None, **options):
        reporter.stage("embedding")
        raise exc

    assert execute_job(job_id, settings=settings, sessions=sessions, store=store, pipeline=pipeline) == "failed"
    job = get(sessions, job_id)
    assert job.status == "failed" and job.error["code"] == code and job.error["param"] == param
    last = rows(sessions, Event, job_id)[-1]
    assert last.level == "error"
    if code == "internal_error":  # the type only: the traceback and the text go to the worker log
        assert job.error["message"] == "internal error (ZeroDivisionError), see the worker log"
        assert last.data["exception"] == "ZeroDivisionError" and "traceback" not in last.data
        assert "division by zero" not in json.dumps(last.data) + last.message
    else:
        assert str(exc) in job.error["message"]


def test_cancel_while_running_ends_cancelled(sessions, settings, store):
    job_id = new_job(sessions)
    polls: list[int] = []

    def pipeline(spec, workdir, *, access, reporter, device=None, **options):
        reporter.stage("training")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            polls.append(1)
            if len(polls) == 3:  # the user cancels through the API's data function
                with sessions() as s:
                    assert transitions.request_cancel(s, job_id=job_id) == "cancelling"
                    s.commit()
            if reporter.should_cancel():
                raise JobCancelled("helip: cancelled at step 3; state saved")
            time.sleep(0.02)
        raise AssertionError("should_cancel never turned True")

    status = execute_job(job_id, settings=settings, sessions=sessions, store=store, pipeline=pipeline)
    assert status == "cancelled" and get(sessions, job_id).status == "cancelled"
    assert rows(sessions, Event, job_id)[-1].message.startswith("cancelled: helip: cancelled at step 3")


def test_a_lost_lease_stops_the_run_and_records_nothing(sessions, settings, store):
    job_id = new_job(sessions)

    def pipeline(spec, workdir, *, access, reporter, device=None, **options):
        with sessions() as s:  # another worker took the job over
            s.execute(update(Job).where(Job.id == job_id).values(worker_id="thief", attempts=2))
            s.commit()
        deadline = time.monotonic() + 10
        while not reporter.should_cancel():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        path = write(workdir / "checkpoints" / "helip_latest.pt", b"stale")
        reporter.checkpoint("helip", 2, path, final=False)  # must not overwrite the new owner's state
        raise JobCancelled("stopped")

    assert execute_job(job_id, settings=settings, sessions=sessions, store=store, pipeline=pipeline,
                       worker_id="w1") is None
    job = get(sessions, job_id)
    assert (job.status, job.worker_id) == ("running", "thief")
    assert rows(sessions, Checkpoint, job_id) == []


def test_heartbeat_refreshes_and_notices_a_takeover(sessions):
    job_id = new_job(sessions, status="running", worker_id="w1", attempts=1,
                     heartbeat_at=utcnow() - timedelta(hours=1))
    lease = Lease(job_id, "w1")
    hb = Heartbeat(sessions=sessions, lease=lease, interval=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while get(sessions, job_id).heartbeat_at < utcnow() - timedelta(minutes=1):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with sessions() as s:
            s.execute(update(Job).where(Job.id == job_id).values(worker_id="w2"))
            s.commit()
        assert lease.lost.wait(10)
    finally:
        hb.stop()


def test_progress_writes_are_throttled_and_eta_follows_the_pace(sessions, store, tmp_path):
    job_id = new_job(sessions, status="running", worker_id="w1", attempts=1)
    now = [100.0]
    rep = DbReporter(sessions=sessions, lease=Lease(job_id, "w1"),
                     files=JobFiles(store=store, sessions=sessions, job_id=job_id, workdir=tmp_path),
                     progress_seconds=5.0, clock=lambda: now[0])
    rep.stage("embedding")
    now[0] += 2
    rep.progress("embedding", 25, 100)  # within 5 s of the stage write: kept in memory only
    assert get(sessions, job_id).progress["done"] == 0
    now[0] += 18
    rep.progress("embedding", 50, 100)  # 20 s for 50 items: 20 s for the other 50
    assert get(sessions, job_id).progress == {"stage": "embedding", "done": 50, "total": 100, "step": None,
                                              "total_steps": None, "eta_seconds": 20.0}
    rep.stage("training")
    rep.step("helip", 10, 110, {"loss": 1.0})  # a resumed run: its first step here sets the pace's origin
    now[0] += 10
    rep.step("helip", 20, 110, {"loss": 0.9})
    rep.step("helip", 20, 110, {"loss": 0.1})  # re-logged after a resume: kept once, first value wins
    p = get(sessions, job_id).progress
    assert (p["stage"], p["step"], p["total_steps"], p["eta_seconds"]) == ("training", 20, 110, 90.0)
    assert (p["run"], p["loss"]) == ("helip", 0.9)  # the loss of the last progress write (throttled)
    assert [(r.step, r.values["loss"]) for r in rows(sessions, StepMetric, job_id)] == [(10, 1.0), (20, 0.9)]
    # should_cancel answers from the lease, which the heartbeat (one UPDATE ... RETURNING) keeps current
    assert rep.should_cancel() is False
    with sessions() as s:
        transitions.request_cancel(s, job_id=job_id)
        s.commit()
    assert rep.should_cancel() is False  # not until the next heartbeat
    hb = Heartbeat(sessions=sessions, lease=rep.lease, interval=60)
    assert hb.beat() is True and rep.should_cancel() is True


def test_a_killed_attempt_resumes_from_its_checkpoint_after_the_reaper(sessions, settings, store):
    job_id = new_job(sessions)
    first: list = []
    with pytest.raises(KeyboardInterrupt):
        execute_job(job_id, settings=settings, sessions=sessions, store=store, worker_id="w1",
                    pipeline=fake_job(first, die_after_checkpoint=True))
    assert get(sessions, job_id).status == "running"  # nobody recorded an outcome: the process "died"
    with sessions() as s:  # its heartbeat goes stale
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
        s.commit()
    sent: list[str] = []
    report = reap(settings=settings, sessions=sessions, send=sent.append)
    # (other tests' jobs in this database may be reaped too: only this job matters here)
    assert job_id in report.requeued and sent.count(job_id) == 1 and get(sessions, job_id).status == "queued"

    second: list = []
    assert execute_job(job_id, settings=settings, sessions=sessions, store=store, worker_id="w2",
                       pipeline=fake_job(second)) == "succeeded"
    # the second attempt started from the first one's files, fetched from the store
    assert second[0]["files"] == ["checkpoints/helip_latest.pt", "embeddings.npz", "hard_pairs.parquet"]
    job = get(sessions, job_id)
    assert (job.status, job.attempts, job.worker_id) == ("succeeded", 2, "w2")
    assert [r.step for r in rows(sessions, StepMetric, job_id)] == [1, 2, 3, 4, 5, 6]
    events = rows(sessions, Event, job_id)
    resumed = [e.data["resumed_step"] for e in events if "resumed_step" in (e.data or {})]
    restored = [e.data["resumed_steps"] for e in events if "resumed_steps" in (e.data or {})]
    assert resumed == [4] and restored == [{"helip": 4}]


def test_reaper_requeues_fails_and_cancels_stale_jobs_only(sessions, settings):
    old = utcnow() - timedelta(minutes=5)
    retry = new_job(sessions, status="running", worker_id="a", attempts=1, heartbeat_at=old)
    spent = new_job(sessions, status="running", worker_id="b", attempts=3, heartbeat_at=old)
    stopping = new_job(sessions, status="cancelling", worker_id="c", attempts=1, heartbeat_at=old,
                       cancel_requested=True)
    alive = new_job(sessions, status="running", worker_id="d", attempts=1, heartbeat_at=utcnow())
    sent: list[str] = []
    report = reap(settings=settings, sessions=sessions, send=sent.append)
    assert retry in report.requeued and retry in sent
    assert spent in report.failed and stopping in report.cancelled and alive not in sent
    assert get(sessions, retry).status == "queued" and get(sessions, retry).attempts == 1
    assert get(sessions, spent).status == "failed" and get(sessions, spent).error["code"] == "worker_lost"
    assert get(sessions, stopping).status == "cancelled"
    assert get(sessions, alive).status == "running"
    assert spent not in sent and stopping not in sent


def test_reaper_leaves_the_job_stale_when_the_broker_is_down(sessions, settings):
    job_id = new_job(sessions, status="running", worker_id="a", attempts=1,
                     heartbeat_at=utcnow() - timedelta(minutes=5))

    def down(_: str) -> None:
        raise ConnectionError("broker down")

    report = reap(settings=settings, sessions=sessions, send=down)
    assert job_id in report.send_failed and get(sessions, job_id).status == "running"
    sent: list[str] = []
    assert job_id in reap(settings=settings, sessions=sessions, send=sent.append).requeued  # next round


def test_helip_reap_sends_the_task_through_the_configured_broker(sessions, settings):
    job_id = new_job(sessions, status="running", worker_id="a", attempts=1,
                     heartbeat_at=utcnow() - timedelta(minutes=5))
    report = reap_stale_jobs(settings)  # what `helip reap` prints, as JSON
    assert job_id in report["requeued"] and report["send_failed"] == []
    assert get(sessions, job_id).status == "queued"
    # the message is on the broker's queue (Celery's in-memory transport here), by task name, id only
    app = make_celery(settings)
    with app.connection_for_read() as conn:
        msgs = []
        queue = conn.SimpleQueue(settings.queue_name)
        while True:
            try:
                msgs.append(queue.get(timeout=0.5))
            except Empty:
                break
        queue.close()
    bodies = [(m.headers["task"], m.payload[0]) for m in msgs]
    assert ("helip.run_job", [job_id]) in bodies


def test_concurrent_claims_let_exactly_one_worker_win(sessions, settings, store):
    job_id = new_job(sessions)
    started = threading.Barrier(4)
    ran: list[str] = []
    outcomes: list = []

    def pipeline(spec, workdir, *, access, reporter, device=None, **options):
        ran.append(str(workdir))
        return Result(metrics={}, artifacts={})

    def one(i: int) -> None:
        started.wait()
        outcomes.append(execute_job(job_id, settings=settings, sessions=sessions, store=store,
                                    pipeline=pipeline, worker_id=f"w{i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ran) == 1 and sorted(map(str, outcomes)) == ["None", "None", "None", "succeeded"]


def test_celery_app_is_configured_for_long_jobs(tmp_path: Path):
    app = make_celery(Settings(_env_file=None, broker_url="redis://127.0.0.1:1/0", data_dir=tmp_path))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
    assert conf.task_ignore_result and conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.broker_transport_options["visibility_timeout"] >= 6 * 3600
    assert worker_argv(2, "gpu", "WARNING") == [
        "-A", "worker.celery_app", "worker", "--pool=prefork", "--concurrency=2", "--loglevel=WARNING",
        "--without-gossip", "--without-mingle", "--queues=gpu"]


def test_the_worker_parent_does_not_import_torch(tmp_path: Path):
    code = ("import sys, worker.celery_app, worker.tasks, worker.reaper;"
            "from worker.celery_app import app;"
            "assert 'helip.run_job' in app.tasks, sorted(app.tasks);"
            "print('torch' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HELIP_DATA_DIR": str(tmp_path),
           "HELIP_BROKER_URL": "memory://"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
