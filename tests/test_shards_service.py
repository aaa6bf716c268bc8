"""Sharded mining through the service: two real Celery worker processes (Redis broker) mine the shards of one
job through Postgres and S3; the hard_pairs table equals an unsharded job's; a worker SIGKILLed holding a
shard does not lose the job (the shard goes stale and is mined again). Unit tests: tests/test_mining_shards.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, select

from core.mining import read_hard_pairs
from helip.tables import MiningShard
from tests.test_service_e2e import FINISHED, Service, job_spec, production_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from synthworld.world import generate_world

    return generate_world(tmp_path_factory.mktemp("shards") / "world", n_train=160, n_retrieval=32,
                          zeroshot_per_class=1, probe_per_class=(1, 1), shards=2, seed=7)


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url: str, s3, world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = production_service("shards", make_pg_database=make_pg_database, redis_url=redis_url, s3=s3, world=world,
                             tmp_path_factory=tmp_path_factory)
    yield svc
    svc.close()


def spec(world, shards: int) -> dict:
    s = job_spec(world, steps=2, checkpoint_every=1000)
    s["eval"] = {}
    s["mining"]["shards"] = shards
    # every job here mines the same data: without this the cache (core.cache) would hand the sharded jobs
    # the unsharded job's table, and nothing would be sharded
    s["mining"]["cache"] = False
    return s


def succeeded_with_the_unsharded_table(service: Service, job: dict, plain, tmp_path: Path) -> None:
    assert job["status"] == "succeeded" and job["attempts"] == 1, json.dumps(job)[:3000]
    assert_same_table(hard_pairs(service, job["id"], tmp_path), plain)


def hard_pairs(service: Service, job_id: str, tmp_path: Path):
    pairs = service.http.get(f"/jobs/{job_id}/hard-pairs").json()
    path = tmp_path / f"{job_id}.parquet"
    path.write_bytes(httpx.get(pairs["url"], timeout=30).content)
    return read_hard_pairs(path)[0]


def shard_rows(service: Service, job_id: str) -> list[MiningShard]:
    engine = create_engine(service.env["HELIP_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(MiningShard).where(MiningShard.job_id == job_id)
                                     .order_by(MiningShard.shard)))
    finally:
        engine.dispose()


def finished(job: dict) -> bool:
    return job["status"] in FINISHED


@pytest.fixture(scope="module")
def plain(service: Service, world, tmp_path_factory: pytest.TempPathFactory):
    """The unsharded job's table (mine_exact in the job's process)."""
    worker = service.start_worker("plain")
    try:
        job_id = service.submit(spec(world, 1))
        job = service.wait(job_id, finished, timeout=400, workers=[worker])
    finally:
        service.stop(worker)
    assert job["status"] == "succeeded", json.dumps(job)[:2000]
    assert not shard_rows(service, job_id)
    return hard_pairs(service, job_id, tmp_path_factory.mktemp("plain"))


def assert_same_table(got, want) -> None:
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_array_equal(got.neighbors, want.neighbors)
    np.testing.assert_array_equal(got.scores, want.scores)  # NaN pads compare equal
    for key in ("same_caption_filtered", "duplicate_filtered", "self_skipped", "short_lists", "valid_rows"):
        assert got.report[key] == want.report[key], key


def test_two_workers_mine_one_jobs_shards_and_the_table_is_the_unsharded_one(service: Service, world, plain,
                                                                             tmp_path):
    # Each shard pauses 4 s once mined, so that the second worker (started once the job runs on the first,
    # so it only ever takes shard messages) starts before the first has mined every shard.
    a = service.start_worker("shard-a", HELIP_TEST_PAUSE="shard_mined=4")
    b = None
    try:
        job_id = service.submit(spec(world, 8))
        service.wait(job_id, lambda j: j["status"] == "running" or finished(j), timeout=120, workers=[a])
        b = service.start_worker("shard-b", HELIP_TEST_PAUSE="shard_mined=4")
        job = service.wait(job_id, finished, timeout=500, workers=[a, b])
    finally:
        for w in (a, b):
            if w is not None:
                service.stop(w)
    succeeded_with_the_unsharded_table(service, job, plain, tmp_path)
    assert job["result"]["summary"]["mining"]["shards"] == 8

    rows = shard_rows(service, job_id)
    assert [r.shard for r in rows] == list(range(8)) and all(r.status == "done" for r in rows)
    hosts = {r.worker_id.split("@")[0] for r in rows}
    assert hosts == {"shard-a", "shard-b"}, [r.worker_id for r in rows]  # both workers mined shards

    events = service.events(job_id)
    per_shard = [e for e in events if e["message"].startswith("mining shard ")]
    assert sorted(e["data"]["shard"] for e in per_shard) == list(range(8))
    assert {e["data"]["worker"].split("@")[0] for e in per_shard} == {"shard-a", "shard-b"}
    assert all(e["data"]["seconds"] >= 0 and e["data"]["shards"] == 8 for e in per_shard)
    plan = next(e for e in events if e["message"].startswith("mining 160 pairs in 8 shards"))
    assert plan["data"]["shards"] == 8
    summary = next(e for e in events if e["message"].startswith("mined 8 shards on 2 worker(s)"))
    assert [s["worker"] for s in summary["data"]["shards"]] == [r.worker_id for r in rows]
    # the shards' objects are gone once the job succeeded; the rows stay as the record
    from helip.settings import Settings
    from helip.store import job_key, store_from_settings

    env = {k.removeprefix("HELIP_").lower(): v for k, v in service.env.items() if k.startswith("HELIP_")}
    store = store_from_settings(Settings(**env))
    assert list(store.list_keys(job_key(job_id, "mining") + "/")) == []


def test_a_worker_killed_holding_a_shard_does_not_lose_the_job(service: Service, world, plain, tmp_path):
    stale = {"HELIP_STALE_AFTER_SECONDS": "6"}
    a = service.start_worker("keep", HELIP_TEST_PAUSE="shard_mined=5", **stale)
    b = None
    try:
        job_id = service.submit(spec(world, 6))
        service.wait(job_id, lambda j: j["status"] == "running" or finished(j), timeout=120, workers=[a])
        b = service.start_worker("doomed", HELIP_TEST_PAUSE="shard_mined=300", **stale)
        deadline = time.monotonic() + 300
        while not any(r.status == "claimed" and r.worker_id.startswith("doomed@") for r in shard_rows(service, job_id)):
            assert time.monotonic() < deadline and service.job(job_id)["status"] == "running", \
                "the second worker never claimed a shard"
            time.sleep(0.3)
        service.kill(b)  # SIGKILL to its process group: the Celery parent and the child mining the shard
        b = None
        job = service.wait(job_id, finished, timeout=400, workers=[a])
    finally:
        for w in (a, b):
            if w is not None:
                service.stop(w)
    succeeded_with_the_unsharded_table(service, job, plain, tmp_path)
    rows = shard_rows(service, job_id)
    assert all(r.status == "done" and r.worker_id.startswith("keep@") for r in rows), [
        (r.shard, r.status, r.worker_id) for r in rows]
    assert sum(r.claims for r in rows) == len(rows) + 1  # the dead worker's shard was claimed twice
