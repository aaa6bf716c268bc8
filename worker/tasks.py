"""The Celery tasks, as thin as views: the job id comes in, worker.runner does the rest."""

from __future__ import annotations

import multiprocessing

from celery import Task

from helip.queue import MINE_SHARDS_TASK, RUN_JOB_TASK
from helip.settings import get_settings
from worker.celery_app import app
from worker.runner import execute_job, worker_identity


def allow_child_processes() -> None:
    """A prefork pool's child is daemonic, and daemonic processes may not start children; a job needs
    them for its DataLoader workers. (DDP ranks do not go through multiprocessing: core.distributed
    launches them as fresh interpreters.) The job's child processes are its own and end with it."""
    multiprocessing.current_process()._config["daemon"] = False
    try:
        import billiard.process

        billiard.process.current_process()._config["daemon"] = False
    except ImportError:
        pass


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, job_id: str) -> str | None:
    """Run (or resume) one job. A message for a job that is not claimable is acknowledged and does nothing."""
    allow_child_processes()
    return execute_job(job_id, settings=get_settings(), worker_id=worker_identity(self.request.hostname))


@app.task(name=MINE_SHARDS_TASK, bind=True)
def mine_shards(self: Task, job_id: str, plan: str) -> int:
    """Mine shards of a running job's plan while any is left to claim; a message that finds none does nothing."""
    from worker.shards import help_mine  # torch loads in the task's child only

    return help_mine(job_id, plan, settings=get_settings(), worker_id=worker_identity(self.request.hostname))
