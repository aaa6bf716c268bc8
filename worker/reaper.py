"""The reaper, run by every worker: jobs whose worker stopped heartbeating are re-queued (attempts left) or
failed as `worker_lost`, and queued jobs that nobody claimed for a long while are sent to the queue again
(a broker that lost them). The store's own reaper (orphaned objects) is worker.retention.reap_store."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from helip import crud, transitions
from helip.settings import Settings
from helip.tables import Event, JobStatus, utcnow

log = logging.getLogger(__name__)

# Event messages that mark "a message for this job was sent": the reaper's own re-queues and re-sends.
REQUEUED_PREFIX = "the worker stopped heartbeating; re-queued"
RESENT_PREFIX = "re-sent to the queue"
MAX_RESEND_DOUBLINGS = 6  # the wait between re-sends grows to 64 x requeue_queued_after_seconds, no further


@dataclass
class ReapReport:
    """What one round did, by job id."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    send_failed: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"requeued={self.requeued} failed={self.failed} cancelled={self.cancelled} "
                f"send_failed={self.send_failed} resent={self.resent}")


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
        stale = [(j.id, j.status, j.attempts) for j in transitions.find_stale_jobs(session, stale_after_seconds=stale_after)]
    for job_id, status, attempts in stale:
        with sessions() as session:
            if status == JobStatus.CANCELLING:
                if transitions.cancel_stale(session, job_id=job_id, stale_after_seconds=stale_after):
                    crud.add_event(session, job_id=job_id, level="warning",
                                   message="the worker was lost while cancelling; the job is cancelled")
                    report.cancelled.append(job_id)
                session.commit()
                continue
            if attempts >= settings.max_attempts:
                if transitions.fail_stale(session, job_id=job_id, stale_after_seconds=stale_after,
                                      error=worker_lost_error(attempts)):
                    crud.add_event(session, job_id=job_id, level="error",
                                   message=f"the worker was lost on attempt {attempts} of {settings.max_attempts}; "
                                           "the job failed",
                                   data={"attempts": attempts})
                    report.failed.append(job_id)
                session.commit()
                continue
            if not transitions.requeue_stale(session, job_id=job_id, stale_after_seconds=stale_after):
                continue  # its worker heartbeated, or another reaper got there first
            crud.add_event(session, job_id=job_id, level="warning",
                           message=f"{REQUEUED_PREFIX} after attempt {attempts}",
                           data={"attempts": attempts})
            session.commit()
        try:
            send(job_id)
            report.requeued.append(job_id)
        except Exception:  # broker down: leave the job stale-running so the next round tries again
            log.exception("reaper: could not send job %s again", job_id)
            with sessions() as session:
                transitions.undo_requeue(session, job_id=job_id, attempts=attempts)
                session.commit()
            report.send_failed.append(job_id)
    resend_unclaimed(settings=settings, sessions=sessions, send=send, report=report)
    return report


def resend_due(*, created_at: datetime, sends: int, last_sent: datetime | None, now: datetime,
               after_seconds: float) -> bool:
    """Whether a queued job's message is overdue: nobody claimed it within after_seconds x 2^sends of the last send.

    The doubling bounds the duplicates a long but healthy queue collects (each is dropped by the claim).
    """
    since = max(created_at, last_sent) if last_sent is not None else created_at
    wait = after_seconds * 2 ** min(sends, MAX_RESEND_DOUBLINGS)
    return now - since > timedelta(seconds=wait)


def resend_unclaimed(*, settings: Settings, sessions: sessionmaker[Session], send: Callable[[str], None],
                     report: ReapReport) -> None:
    """Send again the queued jobs whose message seems lost (a broker restarted without persistence).

    A duplicate message is harmless: the claim is a compare-and-set, so only one delivery runs the job.
    """
    after = settings.requeue_queued_after_seconds
    with sessions() as session:
        candidates = [j.id for j in transitions.queued_jobs(session, created_before=utcnow() - timedelta(seconds=after))]
    for job_id in candidates:
        with sessions() as session:
            job = transitions.lock_queued_job(session, job_id=job_id)  # another reaper holding it skips it
            if job is None:
                continue
            sends, last = crud.events_with_prefix(session, job_id=job_id, prefixes=(RESENT_PREFIX, REQUEUED_PREFIX))
            if not resend_due(created_at=job.created_at, sends=sends, last_sent=last, now=utcnow(),
                              after_seconds=after):
                continue
            event = crud.add_event(session, job_id=job_id, level="warning",
                                   message=f"{RESENT_PREFIX}: no worker claimed the job (message lost?)",
                                   data={"resend": sends + 1})
            event_id = event.id
            session.commit()
        try:
            send(job_id)
            report.resent.append(job_id)
        except Exception:  # broker down: forget this re-send, so the next round tries again at once
            log.exception("reaper: could not re-send queued job %s", job_id)
            with sessions() as session:
                session.execute(delete(Event).where(Event.id == event_id))
                session.commit()
            report.send_failed.append(job_id)


def reap_stale_jobs(settings: Settings) -> dict[str, list[str]]:
    """One round with the configured database and broker (what `helip reap` runs); the report as a dict."""
    from helip.queue import celery_client, send_run_job

    client = celery_client(settings)
    return asdict(reap(settings=settings, send=lambda job_id: send_run_job(client, job_id)))
