"""The state changes of mining shards (helip.tables.MiningShard), each a compare-and-set UPDATE like
helip.transitions': create a plan's rows, claim one, heartbeat it, finish it, read the plan.

    pending --claim--> claimed --finish--> done
    claimed (heartbeat older than stale_after_seconds) --claim--> claimed (by another worker)

A shard is claimable only while its job runs (status running, no cancel asked): cancelling a job stops
every worker from starting another of its shards. Functions flush but never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, exists, or_, select, update
from sqlalchemy.orm import Session

from helip.tables import Job, JobStatus, MiningShard, utcnow

PENDING, CLAIMED, DONE = "pending", "claimed", "done"


@dataclass(frozen=True)
class ShardRow:
    """What a worker needs of a shard row, detached from the session."""

    id: int
    shard: int
    row_start: int
    row_end: int
    status: str
    worker_id: str | None
    result_key: str | None
    seconds: float | None
    counts: dict[str, Any] | None
    claims: int


def _row(r: MiningShard) -> ShardRow:
    return ShardRow(r.id, r.shard, r.row_start, r.row_end, r.status, r.worker_id, r.result_key, r.seconds,
                    r.counts, r.claims)


def ensure_plan(session: Session, *, job_id: str, plan: str, ranges: list[tuple[int, int]]) -> list[ShardRow]:
    """The plan's rows, created pending when absent (a retried job finds its earlier attempt's rows)."""
    have = {r.shard for r in session.scalars(select(MiningShard).where(MiningShard.job_id == job_id,
                                                                      MiningShard.plan == plan))}
    for i, (a, b) in enumerate(ranges):
        if i not in have:
            session.add(MiningShard(job_id=job_id, plan=plan, shard=i, row_start=a, row_end=b, status=PENDING,
                                    claims=0, created_at=utcnow()))
    session.flush()
    return read_plan(session, job_id=job_id, plan=plan)


def read_plan(session: Session, *, job_id: str, plan: str) -> list[ShardRow]:
    rows = session.scalars(select(MiningShard).where(MiningShard.job_id == job_id, MiningShard.plan == plan)
                           .order_by(MiningShard.shard).execution_options(populate_existing=True))
    return [_row(r) for r in rows]


def claim_next(session: Session, *, job_id: str, plan: str, worker_id: str,
               stale_after_seconds: float) -> ShardRow | None:
    """Take the first pending shard of the plan (or one whose worker went silent) for `worker_id`; None when
    none is left or the job no longer runs."""
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_after_seconds)
    claimable = or_(MiningShard.status == PENDING,
                    and_(MiningShard.status == CLAIMED, or_(MiningShard.heartbeat_at.is_(None),
                                                            MiningShard.heartbeat_at < cutoff)))
    job_runs = exists().where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.cancel_requested.is_(False))
    candidates = session.scalars(select(MiningShard.id).where(
        MiningShard.job_id == job_id, MiningShard.plan == plan, claimable).order_by(MiningShard.shard)).all()
    for shard_id in candidates:  # compare-and-set: another worker may take each one first
        won = cast(CursorResult[Any], session.execute(
            update(MiningShard).where(MiningShard.id == shard_id, claimable, job_runs)
            .values(status=CLAIMED, worker_id=worker_id, heartbeat_at=now, claims=MiningShard.claims + 1),
            execution_options={"synchronize_session": False})).rowcount
        if won:
            row = session.get(MiningShard, shard_id, populate_existing=True)
            assert row is not None
            return _row(row)
    return None


def heartbeat(session: Session, *, shard_id: int, worker_id: str) -> bool:
    """Refresh a claimed shard's heartbeat; False when it is no longer this worker's (re-claimed or done)."""
    return bool(cast(CursorResult[Any], session.execute(
        update(MiningShard).where(MiningShard.id == shard_id, MiningShard.worker_id == worker_id,
                                  MiningShard.status == CLAIMED).values(heartbeat_at=utcnow()),
        execution_options={"synchronize_session": False})).rowcount)


def finish(session: Session, *, shard_id: int, worker_id: str, result_key: str, seconds: float,
           counts: dict[str, Any]) -> bool:
    """Mark a shard done with its stored result; False when another worker finished it first (its result,
    mined from the same plan, is the same lists)."""
    return bool(cast(CursorResult[Any], session.execute(
        update(MiningShard).where(MiningShard.id == shard_id, MiningShard.status != DONE)
        .values(status=DONE, worker_id=worker_id, result_key=result_key, seconds=seconds, counts=counts,
                finished_at=utcnow()),
        execution_options={"synchronize_session": False})).rowcount)


def job_running(session: Session, *, job_id: str) -> bool:
    """Whether shards of the job may still be mined (running, no cancel asked)."""
    return bool(session.scalar(select(exists().where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                                     Job.cancel_requested.is_(False)))))
