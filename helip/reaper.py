"""The reaper: jobs whose worker stopped heartbeating are re-queued (attempts left) or failed as `worker_lost`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from helip import crud
from helip.settings import Settings
from worker import records

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    """What one round did, by job id."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    send_failed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"requeued={self.requeued} failed={self.failed} cancelled={self.cancelled} "
                f"send_failed={self.send_failed}")


def worker_lost_error(attempts: int) -> dict:
    return {
        "code": "worker_lost",
        "message": f"the worker running this job stopped responding ({attempts} attempt(s)); giving up",
        "param": None,
    }


def reap(
    *, settings: Settings, send: Callable[[str], None],
    sessions: sessionmaker[Session] | None = None,
) -> ReapReport:
    """One round over the stale jobs. Every move is a compare-and-set, so several reapers may run at once.

    `send(job_id)` enqueues the task again; it is called after the re-queue is committed, so the message
    always finds a queued row (the claim is what makes a duplicate message harmless).
    """
    if sessions is None:
        from helip.db import session_factory

        sessions = session_factory(settings)
    report = ReapReport()
    stale_after = settings.stale_after_seconds
    with sessions() as session:
        stale = [(j.id, j.status, j.attempts) for j in crud.find_stale_jobs(session, stale_after_seconds=stale_after)]
    for job_id, status, attempts in stale:
        with sessions() as session:
            if status == "cancelling":
                if records.cancel_stale(session, job_id=job_id, stale_after_seconds=stale_after):
                    crud.add_event(session, job_id=job_id, level="warning",
                                   message="the worker was lost while cancelling; the job is cancelled")
                    report.cancelled.append(job_id)
                session.commit()
                continue
            if attempts >= settings.max_attempts:
                if records.fail_stale(session, job_id=job_id, stale_after_seconds=stale_after,
                                      error=worker_lost_error(attempts)):
                    crud.add_event(session, job_id=job_id, level="error",
                                   message=f"the worker was lost on attempt {attempts} of {settings.max_attempts}; "
                                           "the job failed",
                                   data={"attempts": attempts})
                    report.failed.append(job_id)
                session.commit()
                continue
            if not crud.requeue_job(session, job_id=job_id, stale_after_seconds=stale_after):
                continue  # its worker heartbeated, or another reaper got there first
            crud.add_event(session, job_id=job_id, level="warning",
                           message=f"the worker stopped heartbeating; re-queued after attempt {attempts}",
                           data={"attempts": attempts})
            session.commit()
        try:
            send(job_id)
            report.requeued.append(job_id)
        except Exception:  # broker down: leave the job stale-running so the next round tries again
            log.exception("reaper: could not send job %s again", job_id)
            with sessions() as session:
                records.undo_requeue(session, job_id=job_id, attempts=attempts)
                session.commit()
            report.send_failed.append(job_id)
    return report


def reap_stale_jobs(settings: Settings) -> dict[str, list[str]]:
    """One round with the configured database and broker (what `helip reap` runs); the report as a dict."""
    from helip.queue import celery_client, send_run_job

    client = celery_client(settings)
    return asdict(reap(settings=settings, send=lambda job_id: send_run_job(client, job_id)))
