"""Mine once, reuse, through the whole service: API, a Celery worker, Postgres, Redis and an S3 store.

A sweep over train seeds reuses embeddings and hard pairs, another top_k re-mines only, a second API key
reuses them on its own copy of the data, and never gets to the cache with data it may not read.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from tests.test_service_e2e import FINISHED, KEY, Service, job_spec, production_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
OTHER_KEY = "key-cache-b"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from synthworld.world import generate_world

    return generate_world(tmp_path_factory.mktemp("cache") / "world", n_train=160, n_retrieval=16,
                          zeroshot_per_class=1, probe_per_class=(1, 1), shards=1, seed=9)


@pytest.fixture(scope="module")
def copies(world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """B's own copy of the data (allowed), and a copy nobody may read (not under HELIP_ALLOWED_DATA)."""
    root = tmp_path_factory.mktemp("cache-copies")
    out = {}
    for name in ("b", "forbidden"):
        shutil.copytree(world.root, root / name / "world", copy_function=shutil.copyfile)  # new mtimes
        out[name] = root / name / "world" / world.train_csv.relative_to(world.root)
    # B's CSV in B's own folder, naming the forbidden copy's images by absolute path
    csv = out["forbidden"].read_text().splitlines()
    folder = out["forbidden"].parent
    rows = [csv[0]] + [f"{folder / line.split(chr(9), 1)[0]}\t{line.split(chr(9), 1)[1]}" for line in csv[1:]]
    out["reaching"] = root / "b" / "reaching.csv"
    out["reaching"].write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url: str, s3, world, copies, tmp_path_factory) -> Iterator[Service]:
    allowed = f"{world.root},{copies['b'].parents[1]}"
    svc = production_service("cache", make_pg_database=make_pg_database, redis_url=redis_url, s3=s3, world=world,
                             tmp_path_factory=tmp_path_factory, HELIP_API_KEYS=f"{KEY},{OTHER_KEY}",
                             HELIP_ALLOWED_DATA=allowed)
    svc.worker = svc.start_worker("cache-worker", HELIP_STALE_AFTER_SECONDS="120")  # type: ignore[attr-defined]
    yield svc
    svc.close()


def spec(world, csv, *, seed: int, top_k: int = 8) -> dict[str, Any]:
    out = job_spec(world, steps=2, checkpoint_every=100)
    out["data"]["train"] = str(csv)
    out["eval"] = {}
    out["train"]["seed"] = seed
    out["mining"]["top_k"] = top_k
    out["helip"]["sample_from"] = top_k
    return out


def run(service: Service, body: dict[str, Any], key: str = KEY) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    headers = {"Authorization": f"Bearer {key}"}
    r = service.http.post("/jobs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 400
    while (job := service.http.get(f"/jobs/{job_id}", headers=headers).json())["status"] not in FINISHED:
        worker = service.worker  # type: ignore[attr-defined]
        assert worker.poll() is None and time.monotonic() < deadline, service.log_tail("cache-worker")
        time.sleep(0.25)
    page = service.http.get(f"/jobs/{job_id}/events", params={"limit": 1000}, headers=headers).json()
    return job, page["data"]


def cache_actions(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["data"]["cache"]["stage"], e["data"]["cache"]["action"]) for e in events
            if isinstance(e.get("data"), dict) and "stage" in e["data"].get("cache", {})]


def cache_objects(service: Service, s3) -> dict[str, bytes]:
    """Every object under the store's cache/ prefix, with its content."""
    bucket, _, run = service.env["HELIP_STORAGE_URL"].removeprefix("s3://").partition("/")
    client = s3.client()
    out = {}
    for o in client.list_objects(bucket, prefix=f"{run}/cache/", recursive=True):
        resp = client.get_object(bucket, o.object_name)
        try:
            out[o.object_name] = resp.read()
        finally:
            resp.close()
            resp.release_conn()
    return out


def table(service: Service, job_id: str, key: str = KEY) -> tuple[bytes, Any]:
    pairs = service.http.get(f"/jobs/{job_id}/hard-pairs", headers={"Authorization": f"Bearer {key}"}).json()
    blob = httpx.get(pairs["url"], timeout=30).content
    assert hashlib.sha256(blob).hexdigest() == pairs["sha256"]
    return blob, pq.read_table(io.BytesIO(blob))


def test_a_seed_sweep_reuses_a_top_k_change_remines_and_another_key_reuses_only_what_it_may_read(
        service: Service, world, copies, s3, capsys):
    first, ev1 = run(service, spec(world, world.train_csv, seed=11))
    assert first["status"] == "succeeded", json.dumps(first)[:2000]
    assert cache_actions(ev1) == [("embeddings", "miss"), ("embeddings", "write"), ("hard_pairs", "miss"),
                                  ("hard_pairs", "write")]
    assert first["result"]["summary"]["cache"]["cached"] == []

    second, ev2 = run(service, spec(world, world.train_csv, seed=12))  # another train seed: the same inputs
    assert second["status"] == "succeeded", json.dumps(second)[:2000]
    assert cache_actions(ev2) == [("embeddings", "hit"), ("hard_pairs", "hit")]
    assert [e["message"].split(" (key")[0] for e in ev2 if "from the cache" in e["message"]] == [
        "embeddings from the cache", "hard_pairs from the cache"]
    s1, s2 = first["result"]["summary"], second["result"]["summary"]
    assert s2["cache"]["cached"] == ["embeddings", "hard_pairs"]
    assert s2["cache"]["stages"] == {k: {**v, "status": "cached"} for k, v in s1["cache"]["stages"].items()}
    blob1, t1 = table(service, first["id"])
    blob2, t2 = table(service, second["id"])
    assert t2.equals(t1) and blob2 == blob1 and t1.num_rows == 160
    # the reused files are the job's own (its prefix, its stored bytes), and nothing names the first job
    artifacts = second["result"]["artifacts"]
    assert artifacts["hard_pairs"]["key"].startswith(f"jobs/{second['id']}/")
    assert first["id"] not in json.dumps(ev2) and first["id"] not in json.dumps(second)
    assert second["stored_bytes"] >= artifacts["hard_pairs"]["size"]
    with capsys.disabled():
        for name, s in (("first", s1), ("second", s2)):
            t = s["timings"]
            print(f"\n{name} job: embedding {t['embedding']:.2f} s + mining {t['mining']:.2f} s")

    third, ev3 = run(service, spec(world, world.train_csv, seed=11, top_k=6))  # embeddings reused, re-mined
    assert third["status"] == "succeeded", json.dumps(third)[:2000]
    assert cache_actions(ev3) == [("embeddings", "hit"), ("hard_pairs", "miss"), ("hard_pairs", "write")]
    assert third["result"]["summary"]["cache"]["cached"] == ["embeddings"]
    _, t3 = table(service, third["id"])
    assert t3.num_rows == 160 and max(len(n) for n in t3.column("neighbors").to_pylist()) == 6

    # key B, its own copy of the same data elsewhere (other paths, other mtimes): reused
    own, ev4 = run(service, spec(world, copies["b"], seed=5), key=OTHER_KEY)
    assert own["status"] == "succeeded", json.dumps(own)[:2000]
    assert cache_actions(ev4) == [("embeddings", "hit"), ("hard_pairs", "hit")]
    assert table(service, own["id"], OTHER_KEY)[1].equals(t1)

    # key B, a CSV of its own naming images it may not read: refused before the cache is reached
    before = cache_objects(service, s3)
    assert sum(k.endswith("/meta.json") for k in before) == 3  # one embeddings entry, tables for top_k 8 and 6
    r = service.http.post("/jobs", json=spec(world, copies["forbidden"], seed=5),
                          headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 422 and "data.train" in r.text, r.text
    reaching, ev5 = run(service, spec(world, copies["reaching"], seed=5), key=OTHER_KEY)
    assert reaching["status"] == "failed", json.dumps(reaching)[:2000]
    assert reaching["error"]["param"] == "data.train" and "allowed" in reaching["error"]["message"]
    assert [e["message"] for e in ev5][:-1] == ["attempt 1 started", "job spec resolved"]  # nothing between
    assert cache_actions(ev5) == []
    assert cache_objects(service, s3) == before  # no entry looked up (used.json untouched) or written
    assert reaching["result"] is None
