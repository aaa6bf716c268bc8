"""DDP (2 gloo processes on CPU) from a real Celery prefork worker over real HTTP, and the rank launcher itself:
success, cancel, a rank's HelipError, a crashed or killed rank, a SIGKILLed worker; no rank outlives its job.
(The same launcher without Celery, run_job with 2 processes: tests/test_pipeline.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_service_e2e import FINISHED, MODEL, TINY, Service, assert_steps_once, job_spec, production_service, sha256

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from synthworld.world import generate_world

    return generate_world(tmp_path_factory.mktemp("ddp") / "world", n_train=160, n_retrieval=32,
                          zeroshot_per_class=1, probe_per_class=(1, 1), shards=2, seed=5)


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url: str, s3, world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = production_service("ddp", make_pg_database=make_pg_database, redis_url=redis_url, s3=s3, world=world,
                             tmp_path_factory=tmp_path_factory)
    yield svc
    svc.close()


def ddp_spec(world, *, steps: int, checkpoint_every: int, workers: int = 0, evaluate: bool = False) -> dict:
    spec = job_spec(world, steps=steps, checkpoint_every=checkpoint_every, workers=workers)
    spec["train"]["devices"] = 2
    if not evaluate:
        spec["eval"] = {}
    return spec


def rank_pids(marker: str) -> list[int]:
    """Live (not zombie) rank processes, DataLoader workers they forked included, whose command line names
    `marker` (a job id or a work directory: the ranks' --inputs path holds both)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"core.rank" in argv and any(marker.encode() in a for a in argv):
            found.append(int(proc.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK="))[5:])


def gone(marker: str, timeout: float = 20.0) -> list[int]:
    """Wait for every rank process of `marker` to exit; returns the ones still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := rank_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def step_at_least(n: int):  # noqa: ANN201 - a predicate for Service.wait
    def check(job: dict[str, Any]) -> bool:
        assert job["status"] in ("queued", "running"), json.dumps(job)[:2000]
        return ((job["progress"] or {}).get("step") or 0) >= n

    return check


# -- through the service ---------------------------------------------------------------------------------------


def test_a_two_process_job_from_a_celery_worker_succeeds_and_records_once(service: Service, world, tmp_path):
    worker = service.start_worker("ddp-ok", HELIP_STALE_AFTER_SECONDS="120")
    try:
        # workers=1: each rank also starts a DataLoader worker process of its own
        job_id = service.submit(ddp_spec(world, steps=6, checkpoint_every=3, workers=1, evaluate=True))
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=400, workers=[worker])
        assert not gone(job_id)
    finally:
        service.stop(worker)
    assert job["status"] == "succeeded" and job["attempts"] == 1, json.dumps(job)[:3000]
    assert set(service.http.get(f"/jobs/{job_id}/metrics").json()["eval"]) == {"baseline", "helip"}
    assert_steps_once(service.steps(job_id), "helip", 6)
    messages = [e["message"] for e in service.events(job_id)]
    started = [m for m in messages if m.startswith("helip: training")]
    assert len(started) == 1 and "on 2 process(es), cpu" in started[0]  # rank 0 speaks for the run
    stored = [m for m in messages if "checkpoint at step" in m]
    # the state at 3 and the final weights at 6, once each (no state is stored at the last step: the final
    # weights follow it at once)
    assert sorted(stored) == sorted(set(stored)) and len(stored) == 2, stored
    # the state was deleted once the final weights were stored
    cks = service.http.get(f"/jobs/{job_id}/checkpoints", params={"include": "states"}).json()["data"]
    assert sorted((c["run"], c["step"], c["final"]) for c in cks) == [("helip", 6, True)]
    final = next(c for c in cks if c["final"])
    blob = httpx.get(final["url"], timeout=30).content
    assert sha256(blob) == final["sha256"] and len(blob) == final["size"]
    path = tmp_path / "helip_final.pt"
    path.write_bytes(blob)
    import open_clip
    import torch

    (tmp_path / f"{MODEL}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / f"{MODEL}.json")
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["step"] == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k])


def test_cancelling_a_two_process_job_stops_every_rank(service: Service, world):
    worker = service.start_worker("ddp-cancel", HELIP_STALE_AFTER_SECONDS="120")
    try:
        job_id = service.submit(ddp_spec(world, steps=2000, checkpoint_every=1000))
        service.wait(job_id, step_at_least(2), timeout=300, workers=[worker])
        ranks = rank_pids(job_id)
        assert len(ranks) == 2, ranks  # data.workers 0: exactly the two ranks
        r = service.http.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=120, workers=[worker])
        assert not gone(job_id)
        assert worker.poll() is None
    finally:
        service.stop(worker)
    assert job["status"] == "cancelled", json.dumps(job)[:3000]
    last = max(s["step"] for s in service.steps(job_id))
    assert last < 2000
    # the ranks agreed on the step to stop at (an all_reduce of the flag) and rank 0 saved it on the way out
    page = service.http.get(f"/jobs/{job_id}/checkpoints", params={"include": "states"}).json()["data"]
    saved = [c["step"] for c in page if not c["final"]]
    assert saved == [last], (saved, last)


def test_a_helip_error_in_a_rank_fails_the_job_with_its_code_and_param(service: Service, world):
    worker = service.start_worker("ddp-error", HELIP_STALE_AFTER_SECONDS="120")
    try:
        spec = ddp_spec(world, steps=4, checkpoint_every=2)
        spec["train"]["batch_size"] = 30  # 15 targets per step: not divisible among 2 processes (found by the ranks)
        job_id = service.submit(spec)
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=300, workers=[worker])
        assert not gone(job_id)
        assert worker.poll() is None
    finally:
        service.stop(worker)
    assert job["status"] == "failed", json.dumps(job)[:3000]
    assert job["error"]["code"] == "data_error" and job["error"]["param"] == "train.batch_size", job["error"]
    assert "not divisible by 2 processes" in job["error"]["message"]


def test_a_sigkilled_worker_leaves_no_rank_alive(service: Service, world):
    worker = service.start_worker("ddp-kill", HELIP_STALE_AFTER_SECONDS="120")
    try:
        job_id = service.submit(ddp_spec(world, steps=2000, checkpoint_every=1000, workers=1))
        service.wait(job_id, step_at_least(2), timeout=300, workers=[worker])
        ranks = rank_pids(job_id)
        launchers = {parent_of(p) for p in ranks} - set(ranks)  # the Celery pool child that runs the job
        assert len(ranks) >= 2 and len(launchers) == 1, (ranks, launchers)
        (child,) = launchers
        assert parent_of(child) == worker.pid
        # SIGKILL the worker and its job child only, not the process group (that would take the ranks too)
        os.kill(child, signal.SIGKILL)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(30)
        left = gone(job_id)
    finally:
        service.kill(worker)
    assert not left, f"rank processes outlived their worker: {left}"


# -- the launcher without the service ---------------------------------------------------------------------------


def test_a_crashed_rank_fails_with_its_traceback(tmp_path):
    from core.distributed import train_distributed
    from core.progress import CollectingReporter
    from core.train import RunPlan

    with pytest.raises(RuntimeError) as err:  # spec None: every rank fails with an AttributeError
        train_distributed(2, "cpu", CollectingReporter(), workdir=tmp_path, plan=RunPlan("helip", 1, 2, 8),
                          spec=None, index=None, neighbors=None, tokens=None, access=None)
    assert "a training process failed" in str(err.value)
    assert "Traceback" in str(err.value) and "AttributeError" in str(err.value)
    assert not gone(str(tmp_path), timeout=5)
    assert not list((tmp_path / "ddp").iterdir())  # the ranks' inputs file is removed whatever happened


def test_a_killed_rank_stops_the_other_and_fails_the_run(world, tmp_path):
    """One rank vanishes (the OOM killer): the other must not wait in its collective; the run fails."""
    from core.pipeline import run_job
    from core.progress import CollectingReporter

    rep = CollectingReporter()
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            run_job(ddp_spec(world, steps=2000, checkpoint_every=1000), tmp_path, reporter=rep)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 300
    while len(rep.steps) < 2:
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.2)
    ranks = rank_pids(str(tmp_path))
    assert len(ranks) == 2, ranks
    os.kill(next(p for p in ranks if rank_of(p) == 1), signal.SIGKILL)
    t0 = time.monotonic()
    thread.join(120)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), RuntimeError), outcome
    assert time.monotonic() - t0 < 60
    assert not gone(str(tmp_path), timeout=5)
    assert not list((tmp_path / "ddp").iterdir())
