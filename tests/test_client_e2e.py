"""helip.client and `helip jobs` against a real API, Celery worker, Postgres and Redis on loopback."""

from __future__ import annotations

import hashlib
import http.server
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helip import db
from helip.client import Client, HelipAPIError
from tests.services import free_ports
from tests.test_service_e2e import KEY, ROOT, Service, job_spec, world  # noqa: F401 - world is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class CuttingProxy:
    """A reverse proxy in front of the API's /files links: the first full GET is cut half-way (headers announce
    the whole length, the connection closes early); every request's Range header is recorded."""

    def __init__(self) -> None:
        self.upstream = ""
        self.seen: list[str | None] = []
        self.cuts = 1
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rng = self.headers.get("Range")
                proxy.seen.append(rng)
                r = httpx.get(proxy.upstream + self.path, headers={"Range": rng} if rng else {}, timeout=30)
                body = r.content
                self.send_response(r.status_code)
                for name in ("Content-Type", "Content-Range", "Accept-Ranges"):
                    if name in r.headers:
                        self.send_header(name, r.headers[name])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if r.status_code == 200 and proxy.cuts > 0:
                    proxy.cuts -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_ports(1)[0]), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def proxy() -> Iterator[CuttingProxy]:
    p = CuttingProxy()
    yield p
    p.close()


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url, world, proxy, tmp_path_factory) -> Iterator[Service]:  # noqa: F811
    """API + one worker on Postgres and Redis with a file store, whose download links go through the proxy."""
    url = make_pg_database()
    db.upgrade(url)
    logs = tmp_path_factory.mktemp("client-e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        HELIP_ENVIRONMENT="production", HELIP_DATABASE_URL=url, HELIP_BROKER_URL=redis_url,
        HELIP_STORAGE_URL=(logs / "store").as_uri(), HELIP_API_KEYS=KEY, HELIP_SECRET_KEY="client-secret",
        HELIP_ALLOWED_DATA=str(world.root), HELIP_DATA_DIR=str(logs / "data"), HELIP_PUBLIC_URL=proxy.url,
        HELIP_QUEUE_NAME=f"client-{secrets.token_hex(4)}", HELIP_HEARTBEAT_SECONDS="1",
    )
    svc = Service(env, logs)
    proxy.upstream = svc.base
    svc.worker = svc.start_worker("client", HELIP_STALE_AFTER_SECONDS="120")
    yield svc
    svc.close()


def test_the_client_drives_a_job_from_submit_to_a_resumed_verified_download(service: Service, world, proxy,
                                                                            tmp_path: Path):
    client = Client(service.base, KEY)
    spec = job_spec(world, steps=8, checkpoint_every=4)
    job = client.create(spec, idempotency_key="lifecycle-1")
    assert job.status == "queued" and job.spec["train"]["max_steps"] == 8
    assert client.create(spec, idempotency_key="lifecycle-1").id == job.id  # a retried submit: the same job

    bad = {**spec, "train": {**spec["train"], "lr": -1}}
    with pytest.raises(HelipAPIError) as info:
        client.create(bad)
    assert info.value.status == 422 and info.value.param == "train.lr"
    with pytest.raises(HelipAPIError) as info:
        Client(service.base, "wrong-key").get(job.id)
    assert info.value.status == 401

    other = client.create(job_spec(world, steps=2, checkpoint_every=1))  # queued behind the first: the worker is busy
    assert client.cancel(other.id).status in ("cancelled", "cancelling")
    with pytest.raises(HelipAPIError) as info:
        client.wait(other.id, poll=0.2, timeout=120)
        client.cancel(other.id)
    assert info.value.status == 409 and info.value.code == "job_finished"

    seen: list[tuple[str, str | None]] = []
    done = client.wait(job.id, lambda j: seen.append((j.status, j.stage)), poll=0.3, timeout=400)
    assert done.status == "succeeded", service.log_tail("client")
    assert ("running", "training") in seen or ("running", "evaluating") in seen
    assert [j.id for j in client.list(page_size=1)] == [other.id, job.id]
    assert [j.id for j in client.list(status="cancelled")] == [other.id]
    assert [j.id for j in client.list(status="succeeded")] == [job.id]

    events = list(client.events(job.id))
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)) and "stage: training" in [e.message for e in events]
    assert [e.id for e in client.events(job.id, after=ids[2])] == ids[3:]
    metrics = client.metrics(job.id)
    assert sorted(s.step for s in metrics.data if s.run == "helip") == list(range(1, 9))
    assert set(metrics.eval) == {"baseline", "helip"}

    out = client.download(job.id, dest=tmp_path)
    final = next(c for c in client.checkpoints(job.id) if c.final and c.run == "helip")
    blob = out.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == final.sha256 and len(blob) == final.size
    assert proxy.seen == [None, f"bytes={final.size // 2}-"]  # cut half-way, then resumed from there


def test_the_cli_submits_and_waits_with_a_live_line_and_the_lift_table(service: Service, world, tmp_path: Path):
    import json

    spec_file = tmp_path / "job.json"
    spec = job_spec(world, steps=20, checkpoint_every=20)
    spec["control"] = True
    spec_file.write_text(json.dumps(spec))
    env = {**service.env, "HELIP_API_URL": service.base, "HELIP_API_KEY": KEY, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "helip.cli", "jobs", "submit", str(spec_file), "--wait", "--poll", "0.25"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    job_id = lines[0].split()[1]
    assert lines[0].startswith("job job-") and Client(service.base, KEY).get(job_id).status == "succeeded"
    live = out.stderr
    assert "stage=training" in live and "step " in live and "loss " in live and "ETA " in live, live[-2000:]
    assert "| data set | metric | baseline | control | helip | HELIP - baseline | HELIP - control |" in out.stdout
    listed = subprocess.run([sys.executable, "-m", "helip.cli", "jobs", "list", "--status", "succeeded"],
                            env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "helip.cli", "jobs", *args], env=env, capture_output=True,
                              text=True, timeout=120, cwd=ROOT)

    table = cli("metrics", job_id)
    assert table.returncode == 0 and "| retrieval | image_retrieval_recall@1 |" in table.stdout, table.stderr
    events = cli("events", job_id).stdout.splitlines()
    assert any(line.endswith("stage: training") for line in events) and len(events) >= 4
    got = cli("download", job_id, "--run", "control", "--dest", str(tmp_path / "control.pt"))
    assert got.returncode == 0 and got.stdout.strip() == str(tmp_path / "control.pt"), got.stderr
    final = next(c for c in Client(service.base, KEY).checkpoints(job_id) if c.final and c.run == "control")
    assert hashlib.sha256((tmp_path / "control.pt").read_bytes()).hexdigest() == final.sha256
    again = cli("cancel", job_id)
    assert again.returncode == 1 and "409 job_finished" in again.stderr
    missing = subprocess.run([sys.executable, "-m", "helip.cli", "jobs", "show", "job-" + "0" * 24],
                             env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert missing.returncode == 1 and "not_found" in missing.stderr
