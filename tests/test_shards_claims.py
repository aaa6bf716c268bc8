"""The service's shard machinery on a real Postgres and a file store, in one process: a retried job reuses the
stored shards, a shard whose worker went silent is claimed again, a cancelled job stops every claim, and
a helper (the helip.mine_shards task's body) mines what the job left. Two real Celery workers:
tests/test_shards_service.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker

from core.errors import JobCancelled
from core.mining.exact import mine_exact
from core.mining.shards import mine_sharded
from helip import db, shard_claims, transitions
from helip.settings import Settings
from helip.store import FileStore
from helip.tables import Job, MiningShard, utcnow
from tests.test_mining import _dyadic
from worker.shards import ServiceShards, help_mine, input_key


@pytest.fixture(scope="module")
def sessions(make_pg_database):
    url = make_pg_database()
    db.upgrade(url)
    engine = create_engine(url)
    yield sessionmaker(bind=engine, expire_on_commit=False), url
    engine.dispose()


@pytest.fixture
def env(sessions, tmp_path: Path):
    maker, url = sessions
    settings = Settings(_env_file=None, database_url=url, broker_url="memory://",
                        storage_url=(tmp_path / "store").as_uri(), data_dir=tmp_path / "data",
                        heartbeat_seconds=0.05, stale_after_seconds=2, max_attempts=3)
    store = FileStore(tmp_path / "store", retries=0)
    with maker() as s:
        job = transitions.create_job(s, owner="local", spec={}, seed=1)
        s.commit()
        transitions.claim_job(s, job_id=job.id, worker_id="w", stale_after_seconds=60)
        s.commit()
        job_id = job.id
    return maker, settings, store, job_id


def backend(env, worker: str, sent: list | None = None) -> ServiceShards:
    maker, settings, store, job_id = env
    return ServiceShards(settings=settings, sessions=maker, store=store, job_id=job_id, worker_id=worker,
                         send=lambda job, plan: (sent if sent is not None else []).append((job, plan)))


def rows(env) -> list[MiningShard]:
    maker, _, _, job_id = env
    with maker() as s:
        return list(s.scalars(select(MiningShard).where(MiningShard.job_id == job_id).order_by(MiningShard.shard)))


DATA = _dyadic(120, seed=8)


def mine(env, worker: str, **kw):
    text, image = DATA
    return mine_sharded(text, image, top_k=6, shards=5, backend=backend(env, worker, kw.pop("sent", None)), **kw)


def test_the_job_alone_mines_every_shard_and_a_retry_reuses_them(env) -> None:
    sent: list = []
    first, _ = mine(env, "job-1", sent=sent)
    ref = mine_exact(*DATA, top_k=6)
    np.testing.assert_array_equal(first.neighbors, ref.neighbors)
    np.testing.assert_array_equal(first.scores, ref.scores)
    assert len(sent) == 4 and all(job == env[3] for job, _ in sent)  # a message per other shard
    assert env[2].exists(input_key(env[3], first.report["shard_plan"]))
    got = rows(env)
    assert [(r.status, r.worker_id, r.claims) for r in got] == [("done", "job-1", 1)] * 5
    again, results = mine(env, "job-2")  # the retried attempt: nothing is mined again
    np.testing.assert_array_equal(again.neighbors, ref.neighbors)
    np.testing.assert_array_equal(again.scores, ref.scores)
    assert again.report["same_caption_filtered"] == ref.report["same_caption_filtered"]
    assert [(r.status, r.worker_id, r.claims) for r in rows(env)] == [("done", "job-1", 1)] * 5
    assert {r.worker for r in results} == {"job-1"}


def test_a_silent_workers_shard_is_claimed_again(env) -> None:
    maker, settings, store, job_id = env
    text, image = DATA
    mine(env, "job-1")
    with maker() as s:  # shard 2 was held by a worker that died before storing it
        s.execute(update(MiningShard).where(MiningShard.job_id == job_id, MiningShard.shard == 2).values(
            status="claimed", worker_id="dead", result_key=None, heartbeat_at=utcnow() - timedelta(seconds=1)))
        s.commit()
        plan = s.scalar(select(MiningShard.plan).where(MiningShard.job_id == job_id))
        # not yet stale (2 s): nobody may take it
        assert shard_claims.claim_next(s, job_id=job_id, plan=plan, worker_id="x", stale_after_seconds=2) is None
        s.rollback()
    got, _ = mine(env, "job-2")  # waits until the heartbeat is 2 s old, then mines it itself
    np.testing.assert_array_equal(got.neighbors, mine_exact(text, image, top_k=6).neighbors)
    r = rows(env)[2]
    assert (r.status, r.worker_id, r.claims) == ("done", "job-2", 2)


def test_a_helper_mines_what_is_left_and_a_cancelled_job_stops_every_claim(env) -> None:
    maker, settings, store, job_id = env
    mine(env, "job-1")
    with maker() as s:
        plan = s.scalar(select(MiningShard.plan).where(MiningShard.job_id == job_id))
        s.execute(update(MiningShard).where(MiningShard.job_id == job_id, MiningShard.shard >= 3)
                  .values(status="pending", worker_id=None, result_key=None))
        s.commit()
    assert help_mine(job_id, plan, settings=settings, worker_id="helper", sessions=maker, store=store) == 2
    assert [r.worker_id for r in rows(env)] == ["job-1"] * 3 + ["helper"] * 2
    assert help_mine(job_id, plan, settings=settings, worker_id="late", sessions=maker, store=store) == 0
    with maker() as s:
        s.execute(update(MiningShard).where(MiningShard.job_id == job_id).values(status="pending"))
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        s.commit()
        assert shard_claims.claim_next(s, job_id=job_id, plan=plan, worker_id="x", stale_after_seconds=2) is None
    assert help_mine(job_id, plan, settings=settings, worker_id="late", sessions=maker, store=store) == 0
    with pytest.raises(JobCancelled):
        mine(env, "job-2", should_cancel=lambda: True)


def test_a_shard_stops_when_its_job_is_cancelled_midway(env) -> None:
    """The shard's heartbeat sees the cancel flag; the next block of rows stops the miner, nothing is stored."""
    maker, settings, store, job_id = env
    from core.mining.scores import Filters
    from core.mining.shards import ShardPlan, prepare, shard_ranges
    from worker.shards import mine_claimed

    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=-1).numpy()
    plan = ShardPlan(t, t.copy(), shard_ranges(3000, 1), 5, Filters(), block_size=1)
    with maker() as s:
        shard_claims.ensure_plan(s, job_id=job_id, plan=plan.fingerprint, ranges=plan.ranges)
        row = shard_claims.claim_next(s, job_id=job_id, plan=plan.fingerprint, worker_id="m", stale_after_seconds=2)
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        s.commit()
    assert row is not None
    tt, vv = prepare(plan.text, plan.image, "cpu")
    assert mine_claimed(plan, row, tt, vv, job_id=job_id, worker_id="m", sessions=maker, store=store,
                        settings=settings) is None
    assert rows(env)[0].status == "claimed" and rows(env)[0].result_key is None
