"""The Celery side the API needs: a client app built from Settings that sends "helip.run_job" by name.

It imports no worker code (and so never torch). `celery_config` is shared with worker/celery_app.py so
the sender and the worker agree on broker, serializer and transport options.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from helip.settings import Settings

RUN_JOB_TASK = "helip.run_job"
MINE_SHARDS_TASK = "helip.mine_shards"  # help a running job mine its shards (worker/shards.py)

# Long jobs: the Redis transport redelivers an unacked message after visibility_timeout, so it must
# exceed the longest job (acks_late keeps the message unacked while the job runs).
VISIBILITY_TIMEOUT_SECONDS = 12 * 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for both ends: broker, JSON only, late acks, one job per prefetch, no result backend."""
    broker = str(settings.broker_url)
    transport: dict[str, Any] = {}
    if broker.startswith(("redis://", "rediss://")):
        transport["visibility_timeout"] = VISIBILITY_TIMEOUT_SECONDS
    if broker.startswith("filesystem://"):
        folder = settings.data_dir / "broker"
        for sub in ("queue", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # kombu's filesystem transport needs the same folder for in and out.
        transport.update(
            data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
            processed_folder=str(folder / "processed"),
        )
    if broker.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": broker,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue_name,
        "timezone": "UTC",
        "enable_utc": True,
    }


def celery_client(settings: Settings) -> Celery:
    """A Celery app that only sends: the API's handle on the queue."""
    app = Celery("helip-client", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def send_run_job(app: Celery, job_id: str, *, queue: str | None = None) -> None:
    """Enqueue a job by task name; only the id travels, the worker re-reads the row.

    Retries the broker connection briefly so a request fails fast (the caller turns it into a 503).
    """
    app.send_task(
        RUN_JOB_TASK, args=[job_id], queue=queue or app.conf.task_default_queue,
        retry=True, retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    )


def send_mine_shards(app: Celery, job_id: str, plan: str, *, queue: str | None = None) -> None:
    """Ask any worker to mine shards of a job's plan (the job's own process mines them too, so a lost
    message only makes mining slower)."""
    app.send_task(
        MINE_SHARDS_TASK, args=[job_id, plan], queue=queue or app.conf.task_default_queue,
        retry=True, retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    )


def check_broker(app: Celery, *, timeout: float = 3.0) -> None:
    """Raise when the broker cannot be reached (for /readyz)."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
