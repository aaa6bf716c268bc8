"""Every state change of a job, in one place: create, claim, heartbeat, stage and progress, cancel, finish,
and the reaper's moves of jobs whose worker went silent.

Changes that two processes may race on are single compare-and-set UPDATEs whose WHERE clause states the
expected current state; they return whether they won. Functions flush but never commit: the caller owns
the transaction.

    queued --claim--> running --finish--> succeeded | failed | cancelled
    queued --cancel--> cancelled          running --cancel--> cancelling --finish--> cancelled
    running (stale) --requeue--> queued | --fail_stale--> failed
    cancelling (stale) --cancel_stale--> cancelled
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.progress import Stage
from helip.tables import ACTIVE_STATUSES, FINISHED_STATUSES, Job, JobStatus, new_job_id, utcnow

RUNNING = (JobStatus.RUNNING, JobStatus.CANCELLING)  # a worker holds the job


def _cas(session: Session, stmt: Any) -> int:
    """Run an UPDATE and return how many rows it changed; "fetch" keeps Job objects in the session current."""
    result = cast(CursorResult[Any], session.execute(stmt, execution_options={"synchronize_session": "fetch"}))
    return result.rowcount


def _stale(stale_after_seconds: float, now: datetime | None = None) -> ColumnElement[bool]:
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after_seconds)
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)


def create_job(
    session: Session, *, owner: str, spec: dict[str, Any], seed: int,
    idempotency_key: str | None = None, request_hash: str | None = None,
) -> Job:
    """Insert a queued job; the caller commits before sending its id to the queue."""
    job = Job(
        id=new_job_id(), owner=owner, status=JobStatus.QUEUED, spec=spec, seed=seed, created_at=utcnow(),
        idempotency_key=idempotency_key, request_hash=request_hash, attempts=0, cancel_requested=False,
    )
    session.add(job)
    session.flush()
    return job


def request_cancel(session: Session, *, job_id: str) -> JobStatus | None:
    """Cancel a job: queued -> cancelled at once, running -> cancelling (the worker finishes it).

    Returns the status after the call, or None when the job had already finished (the caller answers 409).
    """
    won = _cas(session, update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
               .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow()))
    if won:
        return JobStatus.CANCELLED
    won = _cas(session, update(Job).where(Job.id == job_id, Job.status.in_(RUNNING))
               .values(status=JobStatus.CANCELLING, cancel_requested=True))
    return JobStatus.CANCELLING if won else None


def claim_job(
    session: Session, *, job_id: str, worker_id: str, stale_after_seconds: float, max_attempts: int | None = None,
) -> Job | None:
    """Take a job for this worker: queued -> running, or running with a stale heartbeat -> running again.

    attempts counts claims (1 on the first run). A redelivered message for a job that is running elsewhere,
    finished or cancelled claims nothing and gets None: a job never runs twice at once.
    """
    now = utcnow()
    taken_over = and_(Job.status == JobStatus.RUNNING, _stale(stale_after_seconds, now))
    if max_attempts is not None:
        taken_over = and_(taken_over, Job.attempts < max_attempts)
    won = _cas(session, update(Job).where(Job.id == job_id, or_(Job.status == JobStatus.QUEUED, taken_over)).values(
        status=JobStatus.RUNNING, attempts=Job.attempts + 1, worker_id=worker_id, heartbeat_at=now,
        started_at=func.coalesce(Job.started_at, now),
    ))
    if not won:
        return None
    return session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()


@dataclass(frozen=True)
class Beat:
    """What one heartbeat learned: whether this worker still holds the job, and whether to stop."""

    owned: bool
    cancel_requested: bool


def heartbeat(session: Session, *, job_id: str, worker_id: str) -> Beat:
    """Refresh the heartbeat and read the cancel flag in the same UPDATE ... RETURNING.

    Not owned (re-claimed by another worker, finished, or deleted) means: stop and record nothing.
    """
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(RUNNING))
        .values(heartbeat_at=utcnow()).returning(Job.cancel_requested, Job.status)
    ).one_or_none()
    if row is None:
        return Beat(owned=False, cancel_requested=True)
    cancel, status = row
    return Beat(owned=True, cancel_requested=bool(cancel) or status == JobStatus.CANCELLING)


def set_stage(session: Session, *, job_id: str, stage: Stage) -> None:
    _cas(session, update(Job).where(Job.id == job_id).values(stage=Stage(stage)))


def set_progress(session: Session, *, job_id: str, progress: dict[str, Any], stage: Stage | None = None) -> None:
    """Store the progress object {stage, done, total, step, total_steps, eta_seconds} (and the stage)."""
    values: dict[str, Any] = {"progress": progress}
    if stage is not None:
        values["stage"] = Stage(stage)
    _cas(session, update(Job).where(Job.id == job_id).values(**values))


def finish_job(
    session: Session, *, job_id: str, status: JobStatus, worker_id: str | None = None,
    error: dict[str, Any] | None = None, result: dict[str, Any] | None = None,
) -> bool:
    """Move an active job to a final status; with `worker_id`, only if that worker still owns it."""
    if status not in FINISHED_STATUSES:
        raise ValueError(f"not a final status: {status}")
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
    if worker_id is not None:
        stmt = stmt.where(Job.worker_id == worker_id)
    values: dict[str, Any] = {"status": JobStatus(status), "finished_at": utcnow()}
    if error is not None:
        values["error"] = error
    if result is not None:
        values["result"] = result
    return bool(_cas(session, stmt.values(**values)))


# -- the reaper's moves -------------------------------------------------------------------------------------


def find_stale_jobs(session: Session, *, stale_after_seconds: float, now: datetime | None = None) -> list[Job]:
    """Running or cancelling jobs whose heartbeat is older than `stale_after_seconds`: their worker is gone."""
    return list(session.scalars(
        select(Job).where(Job.status.in_(RUNNING), _stale(stale_after_seconds, now)).order_by(Job.heartbeat_at)
    ))


def requeue_stale(session: Session, *, job_id: str, stale_after_seconds: float) -> bool:
    """Stale running -> queued (the reaper then sends the task again); False if someone else moved it first."""
    return bool(_cas(session, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.RUNNING, _stale(stale_after_seconds),
    ).values(status=JobStatus.QUEUED, worker_id=None)))


def undo_requeue(session: Session, *, job_id: str, attempts: int) -> bool:
    """The task could not be sent after a re-queue: put the job back to stale-running so the next round retries.

    Only if nobody claimed it meanwhile (still queued, same attempt count, no worker).
    """
    return bool(_cas(session, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempts == attempts, Job.worker_id.is_(None),
    ).values(status=JobStatus.RUNNING)))


def cancel_stale(session: Session, *, job_id: str, stale_after_seconds: float) -> bool:
    """cancelling with a dead worker -> cancelled: the user asked to stop and nobody is running it."""
    return bool(_cas(session, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.CANCELLING, _stale(stale_after_seconds),
    ).values(status=JobStatus.CANCELLED, finished_at=utcnow(), worker_id=None)))


def fail_stale(session: Session, *, job_id: str, stale_after_seconds: float, error: dict[str, Any]) -> bool:
    """running with a dead worker and no attempts left -> failed; loses to a worker that heartbeated meanwhile."""
    return bool(_cas(session, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.RUNNING, _stale(stale_after_seconds),
    ).values(status=JobStatus.FAILED, finished_at=utcnow(), error=error, worker_id=None)))


def queued_jobs(session: Session, *, created_before: datetime, limit: int = 1000) -> list[Job]:
    """Queued jobs older than `created_before`, oldest first: the reaper checks whether their message was lost."""
    return list(session.scalars(
        select(Job).where(Job.status == JobStatus.QUEUED, Job.created_at < created_before)
        .order_by(Job.created_at).limit(limit)
    ))


def lock_queued_job(session: Session, *, job_id: str) -> Job | None:
    """The job row locked for this transaction if it is still queued (Postgres: others skip it, SQLite: no-op)."""
    return session.scalars(
        select(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .with_for_update(skip_locked=True).execution_options(populate_existing=True)
    ).one_or_none()
