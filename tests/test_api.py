"""The REST API against a real Postgres and Redis: validation, idempotency, pagination, auth, cancel, reads, limits."""

from __future__ import annotations

import base64
import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from helip import crud, db, transitions
from helip.settings import Settings
from helip.store import FileStore

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["key-alice", "key-bob", "key-pages", "key-idem", "key-cancel", "key-reads"]
TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed data directory: a tiny CSV and an ImageFolder root (the API only stats them)."""
    root = tmp_path_factory.mktemp("api-data")
    (root / "train.tsv").write_text("filepath\ttitle\nimg0.png\ta red square\n")
    for cls in ("circle", "square"):
        (root / "shapes" / cls).mkdir(parents=True)
        (root / "shapes" / cls / "0.png").write_bytes(b"png")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def settings(pg_url: str, redis_url: str, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    db.upgrade(pg_url)
    state = tmp_path_factory.mktemp("api-state")
    return Settings(
        _env_file=None, data_dir=state, database_url=pg_url, broker_url=redis_url,
        storage_url=(state / "store").as_uri(), allowed_data=str(data_dir), api_keys=",".join(KEYS),
        secret_key="test-secret", queue_name="helip-api-test-" + uuid.uuid4().hex[:8],
        rate_limit_per_minute=100_000,
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> TestClient:
    with TestClient(create_app(settings)) as c:
        yield c


def make_spec(data_dir: Path, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "tiny-api-test", "config": TINY},
        "data": {"train": str(data_dir / "train.tsv")},
        "train": {"batch_size": 8, "max_steps": 5},
        "eval": {"zeroshot": [{"name": "shapes", "root": str(data_dir / "shapes")}]},
    }
    for dotted, value in over.items():
        node = spec
        *path, last = dotted.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


def queued_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The Celery messages waiting in a Redis queue: (task name, args) of each."""
    import redis

    r = redis.Redis.from_url(redis_url)
    out = []
    for raw in r.lrange(queue, 0, -1):
        msg = json.loads(raw)
        body = json.loads(base64.b64decode(msg["body"]))
        out.append({"task": msg["headers"]["task"], "args": body[0]})
    return out


# -- submit -------------------------------------------------------------------------------------------


def test_create_job_commits_row_and_sends_only_the_id(client: TestClient, settings: Settings, data_dir: Path,
                                                       redis_url: str) -> None:
    r = client.post("/jobs", json=make_spec(data_dir), headers=auth("key-alice"))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("job-") and len(job["id"]) == 28
    assert job["status"] == "queued" and job["attempts"] == 0 and job["error"] is None
    assert r.headers["location"] == f"/jobs/{job['id']}"
    # the stored spec is resolved: defaults and a seed filled in
    assert isinstance(job["seed"], int) and job["spec"]["train"]["seed"] == job["seed"]
    assert job["spec"]["mining"]["top_k"] == 50 and job["spec"]["helip"]["hard_per_target"] == 3
    assert client.get(f"/jobs/{job['id']}", headers=auth("key-alice")).json()["spec"] == job["spec"]
    msgs = [m for m in queued_messages(redis_url, settings.queue_name) if m["args"] == [job["id"]]]
    assert msgs == [{"task": "helip.run_job", "args": [job["id"]]}]


BAD_SPECS = [
    ("unknown field", {"mining.bogus": 1}, "mining.bogus", "invalid_spec"),
    ("unknown top-level field", {"colour": "red"}, "colour", "invalid_spec"),
    ("wrong type", {"train.batch_size": "big"}, "train.batch_size", "invalid_spec"),
    ("batch < 1 + hard_per_target", {"train.batch_size": 2, "helip.hard_per_target": 3}, "train.batch_size",
     "invalid_spec"),
    ("top_k < sample_from", {"mining.top_k": 10, "helip.sample_from": 20}, "mining.top_k", "invalid_spec"),
    ("location outside allowed", {"data.train": "/etc/passwd"}, "data.train", "invalid_location"),
    ("missing file", {"data.train": "MISSING/nope.tsv"}, "data.train", "invalid_location"),
    ("missing eval root", {"eval.zeroshot": [{"name": "z", "root": "MISSING/none"}]}, "eval.zeroshot.0.root",
     "invalid_location"),
    ("empty eval root", {"eval.zeroshot": [{"name": "z", "root": "MISSING/../empty"}]}, "eval.zeroshot.0.root",
     "invalid_location"),
    ("shell scheme", {"data.train": "pipe:cat /etc/passwd"}, "data.train", "invalid_location"),
    ("missing checkpoint", {"model.pretrained": "MISSING/w.pt"}, "model.pretrained", "invalid_location"),
]


@pytest.mark.parametrize(("name", "over", "param", "code"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_invalid_spec_is_422_naming_the_field(client: TestClient, data_dir: Path, name: str, over: dict,
                                              param: str, code: str) -> None:
    over = {k: (json.loads(json.dumps(v).replace("MISSING", str(data_dir))) if "MISSING" in json.dumps(v) else v)
            for k, v in over.items()}
    before = client.get("/jobs?limit=100", headers=auth("key-bob")).json()["data"]
    r = client.post("/jobs", json=make_spec(data_dir, **over), headers=auth("key-bob"))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["message"]
    assert client.get("/jobs?limit=100", headers=auth("key-bob")).json()["data"] == before  # nothing stored


def test_malformed_bodies_are_json_errors(client: TestClient) -> None:
    r = client.post("/jobs", content=b"{not json", headers={**auth("key-bob"), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/jobs", json=[1, 2], headers=auth("key-bob"))
    assert r.status_code == 422 and "error" in r.json()
    r = client.post("/jobs", json={"model": {"name": "x"}}, headers=auth("key-bob"))
    assert r.status_code == 422 and r.json()["error"]["param"] == "data"


def test_idempotency_key(client: TestClient, settings: Settings, data_dir: Path, redis_url: str) -> None:
    spec = make_spec(data_dir)
    h = {**auth("key-idem"), "Idempotency-Key": "submit-" + uuid.uuid4().hex}
    first = client.post("/jobs", json=spec, headers=h)
    again = client.post("/jobs", json=copy.deepcopy(spec), headers=h)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["seed"] == first.json()["seed"]
    other = client.post("/jobs", json=make_spec(data_dir, **{"train.lr": 3e-5}), headers=h)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # the key is per owner: another key may use the same Idempotency-Key for its own job
    mine = client.post("/jobs", json=spec, headers={**auth("key-alice"), "Idempotency-Key": h["Idempotency-Key"]})
    assert mine.status_code == 201 and mine.json()["id"] != first.json()["id"]
    jobs = client.get("/jobs?limit=100", headers=auth("key-idem")).json()["data"]
    assert [j["id"] for j in jobs] == [first.json()["id"]]
    sent = [m for m in queued_messages(redis_url, settings.queue_name) if m["args"] == [first.json()["id"]]]
    assert len(sent) == 1  # the repeat did not queue the job twice


def test_pagination_newest_first(client: TestClient, data_dir: Path) -> None:
    ids = [client.post("/jobs", json=make_spec(data_dir), headers=auth("key-pages")).json()["id"] for _ in range(5)]
    seen, after, pages = [], None, 0
    while True:
        q = "/jobs?limit=2" + (f"&after={after}" if after else "")
        page = client.get(q, headers=auth("key-pages")).json()
        pages += 1
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids[::-1] and pages == 3
    assert client.get("/jobs?after=job-000000000000000000000000", headers=auth("key-pages")).json() == {
        "data": [], "has_more": False}
    r = client.get("/jobs?limit=0", headers=auth("key-pages"))
    assert r.status_code == 422 and r.json()["error"]["param"] == "limit"


# -- auth ---------------------------------------------------------------------------------------------


def test_auth_required_and_jobs_private_per_key(client: TestClient, data_dir: Path) -> None:
    r = client.get("/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/jobs", headers=auth("not-a-key")).status_code == 401
    assert client.post("/jobs", json=make_spec(data_dir), headers={"Authorization": "Basic abc"}).status_code == 401
    job_id = client.post("/jobs", json=make_spec(data_dir), headers=auth("key-alice")).json()["id"]
    for method, path in [("GET", ""), ("POST", "/cancel"), ("GET", "/metrics"), ("GET", "/events"),
                         ("GET", "/checkpoints"), ("GET", "/hard-pairs"), ("DELETE", "")]:
        r = client.request(method, f"/jobs/{job_id}{path}", headers=auth("key-bob"))
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
        assert client.request(method, f"/jobs/{job_id}{path}").status_code == 401
    assert job_id not in [j["id"] for j in client.get("/jobs?limit=100", headers=auth("key-bob")).json()["data"]]
    assert client.get(f"/jobs/{job_id}", headers=auth("key-bob")).json() == client.get(
        "/jobs/job-ffffffffffffffffffffffff", headers=auth("key-bob")).json()  # indistinguishable from missing
    assert client.get(f"/jobs/{job_id}", headers=auth("key-alice")).status_code == 200


# -- cancel -------------------------------------------------------------------------------------------


def test_cancel_queued_then_running(client: TestClient, settings: Settings, data_dir: Path) -> None:
    h = auth("key-cancel")
    queued = client.post("/jobs", json=make_spec(data_dir), headers=h).json()["id"]
    r = client.post(f"/jobs/{queued}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    r = client.post(f"/jobs/{queued}/cancel", headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    # a running job goes to cancelling; the worker finishes it
    running = client.post("/jobs", json=make_spec(data_dir), headers=h).json()["id"]
    with db.session_scope(settings) as s:
        assert transitions.claim_job(s, job_id=running, worker_id="w-test", stale_after_seconds=60) is not None
    r = client.post(f"/jobs/{running}/cancel", headers=h)
    assert r.json()["status"] == "cancelling" and r.json()["cancel_requested"] is True
    with db.session_scope(settings) as s:
        assert transitions.finish_job(s, job_id=running, status="cancelled", worker_id="w-test")
    assert client.get(f"/jobs/{running}", headers=h).json()["status"] == "cancelled"


# -- reads: metrics, events, checkpoints, hard pairs ----------------------------------------------------


def test_metrics_events_checkpoints_hard_pairs(client: TestClient, settings: Settings, data_dir: Path,
                                               tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = auth("key-reads")
    job_id = client.post("/jobs", json=make_spec(data_dir), headers=h).json()["id"]
    assert client.get(f"/jobs/{job_id}/hard-pairs", headers=h).json()["error"]["code"] == "not_available"
    store = FileStore(Path(settings.storage_url.removeprefix("file://")))
    ck_file = tmp_path / "ck.pt"
    ck_file.write_bytes(b"weights" * 100)
    n = 30
    table = pa.table({
        "row": pa.array(range(n), pa.int64()), "key": [f"img{i}.png" for i in range(n)],
        "neighbors": [[(i + 1) % n, (i + 7) % n] for i in range(n)], "scores": [[0.9, 0.5]] * n,
    })
    pq.write_table(table, tmp_path / "hp.parquet", row_group_size=8)
    with db.session_scope(settings) as s:
        for step in range(1, 8):
            for run in ("helip", "control"):
                assert crud.record_step(s, job_id=job_id, run=run, step=step, values={"loss": 1.0 / step})
        assert not crud.record_step(s, job_id=job_id, run="helip", step=3, values={"loss": 9.0})  # resumed re-log
        crud.record_eval(s, job_id=job_id, model="helip", dataset="shapes", metrics={"acc1": 0.75, "acc5": 1.0})
        crud.record_eval(s, job_id=job_id, model="baseline", dataset="shapes", metrics={"acc1": 0.5})
        for i in range(5):
            crud.add_event(s, job_id=job_id, message=f"event {i}", data={"i": i})
        sha, size = store.put_file(f"jobs/{job_id}/checkpoints/helip_final.pt", ck_file)
        crud.record_checkpoint(s, job_id=job_id, run="helip", step=5, key=f"jobs/{job_id}/checkpoints/helip_final.pt",
                               sha256=sha, size=size, final=True, metrics={"loss": 0.2})
        hp_sha, hp_size = store.put_file(f"jobs/{job_id}/hard_pairs.parquet", tmp_path / "hp.parquet")
        crud.record_artifact(s, job_id=job_id, name="hard_pairs", key=f"jobs/{job_id}/hard_pairs.parquet",
                             sha256=hp_sha, size=hp_size)

    m = client.get(f"/jobs/{job_id}/metrics?limit=3", headers=h).json()
    assert [(d["run"], d["step"]) for d in m["data"]] == [(r, s) for s in (1, 2, 3) for r in ("control", "helip")]
    assert m["has_more"] is True and m["data"][5]["values"] == {"loss": pytest.approx(1 / 3)}
    m2 = client.get(f"/jobs/{job_id}/metrics?after_step=3&limit=100", headers=h).json()
    assert [d["step"] for d in m2["data"]] == [4, 4, 5, 5, 6, 6, 7, 7] and m2["has_more"] is False
    assert m["eval"] == {"baseline": {"shapes": {"acc1": 0.5}}, "helip": {"shapes": {"acc1": 0.75, "acc5": 1.0}}}

    e = client.get(f"/jobs/{job_id}/events?limit=2", headers=h).json()
    assert [x["message"] for x in e["data"]] == ["event 0", "event 1"] and e["has_more"]
    e2 = client.get(f"/jobs/{job_id}/events?after={e['data'][-1]['id']}", headers=h).json()
    assert [x["data"]["i"] for x in e2["data"]] == [2, 3, 4] and not e2["has_more"]

    cks = client.get(f"/jobs/{job_id}/checkpoints", headers=h).json()["data"]
    assert len(cks) == 1 and cks[0]["step"] == 5 and cks[0]["sha256"] == sha and cks[0]["metrics"] == {"loss": 0.2}
    url = cks[0]["url"]
    assert url.startswith("http://testserver/files/")
    dl = client.get(url)  # no API key: the signed link is the credential
    assert dl.status_code == 200 and dl.content == ck_file.read_bytes()
    token = url.rsplit("/", 1)[1]
    assert client.get(f"/files/{token[:-2]}xx").status_code == 403
    assert client.get("/files/garbage").json()["error"]["code"] == "invalid_token"

    hp = client.get(f"/jobs/{job_id}/hard-pairs", headers=h).json()
    assert hp["sha256"] == hp_sha and hp["num_rows"] == n and len(hp["sample"]) == 20
    row = hp["sample"][4]
    assert row["key"] == "img4.png" and row["neighbors"] == [5, 11]
    assert row["neighbor_keys"] == ["img5.png", "img11.png"] and row["scores"] == [0.9, 0.5]
    assert hp["sample"][29 % 20]["neighbor_keys"][1] == f"img{(9 + 7) % n}.png"
    assert client.get(hp["url"]).content == (tmp_path / "hp.parquet").read_bytes()


def test_expired_file_link_is_refused(settings: Settings, client: TestClient) -> None:
    from helip.links import sign_key

    token = sign_key(settings.signing_secret(), "jobs/x/y.pt", 60, now=time.time() - 120)
    r = client.get(f"/files/{token}")
    assert r.status_code == 403 and r.json()["error"]["code"] == "expired_token"


# -- errors, health, limits -------------------------------------------------------------------------------


def test_errors_are_json(client: TestClient) -> None:
    r = client.get("/jobs/job-unknown", headers=auth("key-bob"))
    assert r.status_code == 404 and r.json()["error"] == {"code": "not_found", "message": "no such job", "param": None}
    r = client.delete("/jobs", headers=auth("key-bob"))
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/jobs/job-x/events?after=-5", headers=auth("key-bob"))
    assert r.status_code == 422 and r.json()["error"]["param"] == "after"


def test_health_and_readiness(client: TestClient, settings: Settings, data_dir: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{_free_port()}/0"})
    with TestClient(create_app(down)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.json()["checks"] == {"database": "ok", "broker": "unreachable", "store": "ok"}
        # a job that cannot be queued is not left queued forever: 503 now, and the row says why
        r = c.post("/jobs", json=make_spec(data_dir), headers=auth("key-bob"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"
        latest = c.get("/jobs?limit=1", headers=auth("key-bob")).json()["data"][0]
        assert latest["status"] == "failed" and latest["error"]["code"] == "queue_unavailable"
    assert client.get("/docs").status_code == 200


def test_body_limit_and_rate_limit(settings: Settings, data_dir: Path) -> None:
    small = settings.model_copy(update={"max_body_bytes": 2000, "rate_limit_per_minute": 3})
    with TestClient(create_app(small)) as c:
        big = make_spec(data_dir, **{"eval.zeroshot": [{"name": "x" * 3000, "root": str(data_dir / "shapes")}]})
        r = c.post("/jobs", json=big, headers=auth("key-bob"))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        codes = [c.get("/jobs", headers=auth("key-bob")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]  # the 413 above took the first token
        r = c.get("/jobs", headers=auth("key-bob"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert c.get("/jobs", headers=auth("key-alice")).status_code == 200  # buckets are per key
        assert c.get("/healthz").status_code == 200  # probes are never limited


def test_openapi_has_example_spec(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/JobCreate")
    assert schema["components"]["schemas"]["JobCreate"]["examples"][0]["model"]["name"] == "ViT-B-32"


# -- whole-process checks ---------------------------------------------------------------------------------


def _env(**helip: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **helip)
    return env


def test_embedded_api_never_imports_torch(tmp_path: Path) -> None:
    """On embedded defaults (SQLite + SQLite broker + file store) a job is accepted with torch never loaded."""
    (tmp_path / "datasets").mkdir()  # the embedded default allowed data: the data directory's datasets/ folder
    (tmp_path / "datasets" / "train.tsv").write_text("filepath\ttitle\na.png\tx\n")
    spec = {"model": {"name": "ViT-B-32", "pretrained": "openai"},  # checked against the registry snapshot
            "data": {"train": str(tmp_path / "datasets" / "train.tsv")},
            "train": {"batch_size": 8}}
    code = f"""
import json, sys
from fastapi.testclient import TestClient
from api.main import create_app
from helip.settings import Settings
app = create_app(Settings(_env_file=None, data_dir={str(tmp_path)!r}))
c = TestClient(app)
r = c.post("/jobs", json=json.loads({json.dumps(json.dumps(spec))}))
assert r.status_code == 201, r.text
assert c.get("/jobs/" + r.json()["id"]).json()["status"] == "queued"
assert c.get("/readyz").status_code == 200, c.get("/readyz").text
print("TORCH", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TORCH False" in out.stdout
    assert (tmp_path / "helip.sqlite").exists() and (tmp_path / "broker.sqlite").exists()


def test_over_real_http(settings: Settings, data_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = _env(HELIP_DATABASE_URL=str(settings.database_url), HELIP_BROKER_URL=str(settings.broker_url),
               HELIP_STORAGE_URL=str(settings.storage_url), HELIP_ALLOWED_DATA=str(data_dir),
               HELIP_API_KEYS="key-http", HELIP_DATA_DIR=str(tmp_path), HELIP_QUEUE_NAME=settings.queue_name,
               HELIP_ENVIRONMENT="production", HELIP_SECRET_KEY="s")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.1)
        req = urllib.request.Request(base + "/jobs", data=json.dumps(make_spec(data_dir)).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **auth("key-http")})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
            job = json.loads(resp.read())
        get = urllib.request.Request(f"{base}/jobs/{job['id']}", headers=auth("key-http"))
        with urllib.request.urlopen(get, timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "queued"
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(base + "/jobs", timeout=10)
        assert exc.value.code == 401 and json.loads(exc.value.read())["error"]["code"] == "unauthorized"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_production_refuses_embedded_defaults(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HELIP_DATABASE_URL"):
        Settings(_env_file=None, environment="production", data_dir=tmp_path, api_keys="k", secret_key="s")
    with pytest.raises(ValueError, match="HELIP_API_KEYS"):
        Settings(_env_file=None, environment="production", data_dir=tmp_path, database_url="postgresql://x/y",
                 broker_url="redis://x", storage_url="s3://b/p", secret_key="s")
    keys = tmp_path / "keys.txt"
    keys.write_text("# ops keys\nalpha\n\nbeta\n")
    assert Settings(_env_file=None, data_dir=tmp_path, api_keys=str(keys)).api_key_list() == ["alpha", "beta"]
    s = Settings(_env_file=None, data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/helip.sqlite" and s.api_key_list() == []
    assert s.storage_url == (tmp_path.resolve() / "store").as_uri()
    assert s.allowed_prefixes() == (str(tmp_path.resolve() / "datasets"),)
