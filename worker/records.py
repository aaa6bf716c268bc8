"""Worker-side state changes that helip.crud lacks: compare-and-set moves of stale jobs, and the lease check."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from helip.tables import Job, utcnow


@dataclass(frozen=True)
class LeaseState:
    """What a running worker needs to know about its job on each poll."""

    owned: bool  # this worker still holds the job (nobody re-claimed or finished it)
    cancel_requested: bool
    status: str | None


def lease_state(session: Session, *, job_id: str, worker_id: str) -> LeaseState:
    row = session.execute(
        select(Job.status, Job.worker_id, Job.cancel_requested).where(Job.id == job_id)
    ).one_or_none()
    if row is None:  # the job was deleted under us: treat it as lost, there is nobody to report to
        return LeaseState(owned=False, cancel_requested=True, status=None)
    status, owner, cancel = row
    owned = owner == worker_id and status in ("running", "cancelling")
    return LeaseState(owned=owned, cancel_requested=bool(cancel) or status == "cancelling", status=status)


def _stale(stale_after_seconds: float):  # noqa: ANN202 - a SQL boolean clause
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)


def cancel_stale(session: Session, *, job_id: str, stale_after_seconds: float) -> bool:
    """cancelling with a dead worker -> cancelled: the user asked to stop and nobody is running it."""
    return bool(session.execute(
        update(Job).where(Job.id == job_id, Job.status == "cancelling", _stale(stale_after_seconds))
        .values(status="cancelled", finished_at=utcnow(), worker_id=None)
    ).rowcount)


def fail_stale(session: Session, *, job_id: str, stale_after_seconds: float, error: dict[str, Any]) -> bool:
    """running with a dead worker and no attempts left -> failed; loses to a worker that heartbeated meanwhile."""
    return bool(session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", _stale(stale_after_seconds))
        .values(status="failed", finished_at=utcnow(), error=error, worker_id=None)
    ).rowcount)


def undo_requeue(session: Session, *, job_id: str, attempts: int) -> bool:
    """The task could not be sent after a re-queue: put the job back to stale-running so the next round retries.

    Only if nobody claimed it meanwhile (still queued, same attempt count, no worker).
    """
    return bool(session.execute(
        update(Job).where(
            Job.id == job_id, Job.status == "queued", Job.attempts == attempts, Job.worker_id.is_(None),
        ).values(status="running")
    ).rowcount)
