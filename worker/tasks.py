"""The Celery tasks, as thin as views: the job id comes in, worker.runner does the rest."""

from __future__ import annotations

from helip.queue import RUN_JOB_TASK
from helip.settings import get_settings
from worker.celery_app import app
from worker.runner import execute_job, worker_identity


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str | None:  # noqa: ANN001 - Celery's bound task
    """Run (or resume) one job. A message for a job that is not claimable is acknowledged and does nothing."""
    return execute_job(job_id, settings=get_settings(), worker_id=worker_identity(self.request.hostname))
