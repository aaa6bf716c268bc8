"""The whole service end to end: uvicorn API + real Celery workers on Postgres, Redis and S3, with tiny real jobs."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helip import db
from tests.services import free_ports
from worker.celery_app import worker_argv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-e2e"
TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
KEY = "key-e2e"
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from synthworld.world import generate_world

    return generate_world(tmp_path_factory.mktemp("e2e") / "world", n_train=240, n_retrieval=40,
                          zeroshot_per_class=1, probe_per_class=(1, 1), shards=2, seed=3)


def job_spec(world, *, steps: int, checkpoint_every: int, workers: int = 0) -> dict[str, Any]:
    ev = world.eval_spec()
    ev.pop("linear_probe")  # zero-shot and retrieval are enough here; the probe has its own tests
    return {
        "model": {"name": MODEL, "config": TINY},
        "data": {"train": str(world.train_csv), "workers": workers},
        "mining": {"top_k": 8, "batch_size": 64},
        "helip": {"hard_per_target": 1, "sample_from": 8},
        "train": {"batch_size": 32, "epochs": 100, "max_steps": steps, "lr": 1e-3, "warmup": 2,
                  "checkpoint_every": checkpoint_every, "log_every": 1, "seed": 11},
        "eval": {**ev, "batch_size": 64},
        "control": False,  # one run is enough here; tests/test_pipeline.py and test_storage.py run the control
    }


class Service:
    """The API process plus any number of worker processes, sharing one environment."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen] = []
        port = free_ports(1)[0]
        self.base = f"http://127.0.0.1:{port}"
        self.api = self._spawn("api", [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
                                       "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env)
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.api.poll() is None and time.monotonic() < deadline, self.log_tail("api")
            time.sleep(0.2)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        # Its own session: a SIGKILL to the group takes the Celery parent and its child down together,
        # like a machine that dies.
        proc = subprocess.Popen(cmd, env=env, cwd=self.logs, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, n: int = 6000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"

    def start_worker(self, name: str, **helip: str) -> subprocess.Popen:
        # the command `helip worker` runs
        cmd = [sys.executable, "-m", "celery", *worker_argv(1, self.env["HELIP_QUEUE_NAME"], "INFO"),
               f"--hostname={name}@%h"]
        return self._spawn(name, cmd, {**self.env, **helip})

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.kill(proc)  # whatever is left of its group (a child still finishing a job)

    def close(self) -> None:
        self.http.close()
        for proc in reversed(self.procs):
            self.stop(proc)

    # -- API helpers -------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> str:
        r = self.http.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        out, after = [], None
        while True:
            params = {"limit": 1000, **({"after": after} if after else {})}
            page = self.http.get(f"/jobs/{job_id}/events", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            out += body["data"]
            if not body["has_more"]:
                return out
            after = out[-1]["id"]

    def steps(self, job_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/jobs/{job_id}/metrics", params={"limit": 10000})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float, workers=()) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            alive = all(w.poll() is None for w in workers)
            assert alive and time.monotonic() < deadline, (
                f"{'timed out' if alive else 'a worker exited'}; job {json.dumps(job)[:1500]}\n"
                + "\n".join(f"--- {p.stem}\n{self.log_tail(p.stem)}" for p in self.logs.glob("*.log")))
            time.sleep(0.25)


def production_service(name: str, *, make_pg_database, redis_url: str, s3, world,
                       tmp_path_factory: pytest.TempPathFactory, **helip: str) -> Service:
    """The API on a fresh Postgres database (migrated first, as in production), the session's Redis and an S3
    store in a bucket of its own; jobs may read the world; `helip` adds or overrides HELIP_* settings."""
    url = make_pg_database()
    db.upgrade(url)
    bucket = s3.make_bucket(f"helip-{name}")
    run = secrets.token_hex(4)
    logs = tmp_path_factory.mktemp(f"{name}-logs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        HELIP_ENVIRONMENT="production", HELIP_DATABASE_URL=url, HELIP_BROKER_URL=redis_url,
        HELIP_STORAGE_URL=f"s3://{bucket}/{run}", HELIP_S3_ENDPOINT_URL=s3.endpoint_url,
        HELIP_S3_ACCESS_KEY=s3.access_key, HELIP_S3_SECRET_KEY=s3.secret_key, HELIP_S3_REGION="us-east-1",
        HELIP_API_KEYS=KEY, HELIP_SECRET_KEY=f"{name}-secret", HELIP_ALLOWED_DATA=str(world.root),
        HELIP_DATA_DIR=str(logs / "data"),
        # a queue of our own: other tests' messages on the shared Redis never reach these workers
        HELIP_QUEUE_NAME=f"{name}-{run}", HELIP_HEARTBEAT_SECONDS="1",
    )
    env.update(helip)  # after the defaults: a setting given here overrides them
    return Service(env, logs)


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url, s3, world, tmp_path_factory) -> Iterator[Service]:
    svc = production_service("e2e", make_pg_database=make_pg_database, redis_url=redis_url, s3=s3, world=world,
                             tmp_path_factory=tmp_path_factory)
    yield svc
    svc.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_steps_once(steps: list[dict[str, Any]], run: str, total: int) -> None:
    mine = [(s["run"], s["step"]) for s in steps if s["run"] == run]
    assert len(mine) == len(set(mine)), "a step was stored twice"
    assert sorted(s for _, s in mine) == list(range(1, total + 1))


def test_a_job_runs_to_succeeded_and_its_checkpoint_loads(service: Service, world, tmp_path: Path):
    worker = service.start_worker("ok", HELIP_STALE_AFTER_SECONDS="120")
    try:
        # DataLoader worker processes inside the Celery pool's (daemonic) child: they must be allowed
        job_id = service.submit(job_spec(world, steps=12, checkpoint_every=4, workers=1))
        live_steps = live_events = 0

        def watch(job: dict[str, Any]) -> bool:
            nonlocal live_steps, live_events
            if job["status"] == "running" and job["stage"] in ("training", "evaluating"):
                # readable while the job runs, not only once it is done
                live_steps = max(live_steps, len(service.steps(job_id)))
                live_events = max(live_events, len(service.events(job_id)))
            return job["status"] in FINISHED

        job = service.wait(job_id, watch, timeout=400, workers=[worker])
    finally:
        service.stop(worker)
    assert job["status"] == "succeeded", json.dumps(job)[:3000]
    assert job["attempts"] == 1 and job["error"] is None and job["finished_at"] is not None
    assert live_steps > 0 and live_events > 0
    metrics = service.http.get(f"/jobs/{job_id}/metrics").json()
    assert set(metrics["eval"]) == {"baseline", "helip"}
    helip = metrics["eval"]["helip"]
    assert set(helip) == {"shapes", "retrieval"} and 0.0 <= helip["shapes"]["acc1"] <= 1.0
    assert_steps_once(service.steps(job_id), "helip", 12)
    assert "metrics" not in job["result"] and job["result"]["artifacts"]["metrics"]["sha256"]  # recorded once
    messages = [e["message"] for e in service.events(job_id)]
    assert [m for m in messages if m.startswith("stage: ")] == [
        "stage: embedding", "stage: mining", "stage: training", "stage: evaluating"]

    # states at 4 and 8 were stored and deleted once the final weights were: only those are left
    stored = [e["data"]["step"] for e in service.events(job_id) if e["message"].startswith("helip: checkpoint at")]
    assert stored == [4, 8]
    cks = service.http.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    with_states = service.http.get(f"/jobs/{job_id}/checkpoints", params={"include": "states"}).json()["data"]
    assert [c["id"] for c in with_states] == [c["id"] for c in cks]
    assert [(c["run"], c["step"], c["final"]) for c in cks] == [("helip", 12, True)]
    final = cks[0]
    blob = httpx.get(final["url"], timeout=30).content  # a presigned URL: no API key needed
    assert sha256(blob) == final["sha256"] and len(blob) == final["size"]
    path = tmp_path / "helip_final.pt"
    path.write_bytes(blob)
    import open_clip
    import torch

    (tmp_path / f"{MODEL}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / f"{MODEL}.json")
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["text_projection"], saved["text_projection"])

    pairs = service.http.get(f"/jobs/{job_id}/hard-pairs").json()
    table = httpx.get(pairs["url"], timeout=30).content
    assert sha256(table) == pairs["sha256"]
    assert pairs["num_rows"] == 240 and len(pairs["sample"]) == 20
    first = pairs["sample"][0]
    assert len(first["neighbors"]) == 8 and len(first["neighbor_keys"]) == 8 and first["key"]
    assert first["row"] not in first["neighbors"]


def test_cancelling_a_running_job_ends_it_cancelled(service: Service, world):
    worker = service.start_worker("cancel", HELIP_STALE_AFTER_SECONDS="120")
    try:
        job_id = service.submit(job_spec(world, steps=2000, checkpoint_every=1000))
        service.wait(job_id, lambda j: j["status"] == "running" and (j["progress"] or {}).get("step"),
                     timeout=300, workers=[worker])
        r = service.http.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=120, workers=[worker])
    finally:
        service.stop(worker)
    assert job["status"] == "cancelled" and job["cancel_requested"] is True
    assert max(s["step"] for s in service.steps(job_id)) < 2000
    # the run saved its state on the way out, so a checkpoint exists
    cks = service.http.get(f"/jobs/{job_id}/checkpoints", params={"include": "states"}).json()["data"]
    assert any(not c["final"] for c in cks)
    assert service.http.get(f"/jobs/{job_id}/checkpoints").json()["data"] == []  # states only when asked
    assert service.http.post(f"/jobs/{job_id}/cancel").status_code == 409


def test_a_killed_worker_job_is_finished_by_another_from_its_checkpoint(service: Service, world):
    fast = {"HELIP_STALE_AFTER_SECONDS": "6"}  # the reaper declares a silent worker dead after 6 s
    first = service.start_worker("first", **fast)
    second = None
    try:
        job_id = service.submit(job_spec(world, steps=60, checkpoint_every=5))

        def mid_training(job: dict[str, Any]) -> bool:
            assert job["status"] == "running" or job["status"] == "queued", job["status"]
            steps = [s["step"] for s in service.steps(job_id)]
            cks = service.http.get(f"/jobs/{job_id}/checkpoints", params={"include": "states"}).json()["data"]
            return bool(cks) and max(steps) > max(c["step"] for c in cks)

        service.wait(job_id, mid_training, timeout=400, workers=[first])
        service.kill(first)  # SIGKILL to the parent and the child running the job
        killed_at = max(s["step"] for s in service.steps(job_id))
        assert killed_at < 60
        second = service.start_worker("second", **fast)
        job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=400, workers=[second])
    finally:
        service.kill(first)
        if second is not None:
            service.stop(second)
    assert job["status"] == "succeeded", json.dumps(job)[:3000]
    assert job["attempts"] == 2
    events = service.events(job_id)
    resumed = [e["data"]["resumed_step"] for e in events if "resumed_step" in (e["data"] or {})]
    assert len(resumed) == 1 and 0 < resumed[0] <= killed_at
    assert any("re-queued" in e["message"] for e in events)
    assert sum(e["message"] == "job finished" for e in events) == 1  # executed to the end once
    assert_steps_once(service.steps(job_id), "helip", 60)


def test_embedded_defaults_run_a_worker_without_servers(world, tmp_path: Path):
    """SQLite database, SQLite broker, file store: the worker picks the job up and records its failure."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from helip.settings import Settings

    data_dir = tmp_path / "helip"
    train = data_dir / "datasets" / "train.tsv"  # the one folder of the data directory jobs may read
    train.parent.mkdir(parents=True)
    train.write_text(world.train_csv.read_text())
    spec = job_spec(world, steps=2, checkpoint_every=1)
    spec["data"]["train"] = str(train)
    spec["eval"] = {}
    allowed = f"{data_dir},{world.root}"
    client = TestClient(create_app(Settings(_env_file=None, data_dir=data_dir, allowed_data=allowed)))
    r = client.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    # The file vanishes between submission and the run: the job must fail naming the field, not hang.
    train.write_text("filepath\ttitle\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HELIP_DATA_DIR=str(data_dir),
               HELIP_ALLOWED_DATA=f"{data_dir},{world.root}")
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", *worker_argv(1, None, "INFO")], env=env,
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (job := client.get(f"/jobs/{job_id}").json())["status"] not in FINISHED:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-4000:]
            time.sleep(0.25)
    finally:
        Service.kill(proc)
    assert job["status"] == "failed" and job["attempts"] == 1, json.dumps(job)[:2000]
    assert job["error"]["param"] == "data.train" and job["error"]["code"] != "internal_error", job["error"]
    assert "empty" in job["error"]["message"]
