"""The Celery application of the job worker: broker configuration, long-job settings and the reaper thread."""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

import worker.webhooks  # noqa: F401 - its dispatcher thread starts and stops with the worker
from helip.entry import configure_process
from helip.queue import celery_config, send_run_job
from helip.settings import Settings, get_settings

configure_process()  # the worker is an entry point: offline hub (inherited by job children), quiet warnings

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    """The worker's Celery app: the sender's configuration (helip.queue) plus a fresh child per job."""
    app = Celery("helip", include=["worker.tasks"])
    # Broker, JSON, late acks + reject on a lost child, prefetch 1, the Redis visibility timeout (longer
    # than any job) and the queue name come from helip.queue, so the API and the worker always agree.
    app.conf.update(celery_config(settings))
    app.conf.update(
        # Each job runs in a fresh child: CUDA never initialises in the parent, memory is returned.
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        task_store_errors_even_if_ignored=False,
    )
    return app


def worker_argv(concurrency: int = 1, queues: str | None = None, loglevel: str = "INFO") -> list[str]:
    """Arguments after `python -m celery` (what `helip worker` execs): this app, prefork, one child per job slot."""
    argv = [
        "-A", "worker.celery_app",
        "worker",
        "--pool=prefork",
        f"--concurrency={int(concurrency)}",
        f"--loglevel={loglevel}",
        # Gossip and mingle only add start-up latency and chatter; jobs coordinate through the database.
        "--without-gossip",
        "--without-mingle",
    ]
    if queues:
        argv.append(f"--queues={queues}")
    return argv


app = make_celery(get_settings())


_reaper_stop = threading.Event()


def _reaper_loop(settings: Settings) -> None:
    """Re-queue or fail jobs whose worker stopped heartbeating; runs in the worker's main process."""
    from sqlalchemy.orm import sessionmaker

    from helip import db
    from helip.store import store_from_settings
    from worker.reaper import reap
    from worker.retention import reap_cache, reap_store

    # Its own engine, not helip.db's process-wide one: children forked later must not inherit pooled
    # connections from the parent (two processes on one socket corrupt the protocol).
    db.ensure_schema(settings)
    engine = db.make_engine(str(settings.database_url))
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    interval = max(1.0, min(settings.stale_after_seconds / 4, settings.requeue_queued_after_seconds / 4,
                            settings.store_reap_seconds, 60.0))
    next_store_round = time.monotonic() + min(settings.store_reap_seconds, 60.0)
    while not _reaper_stop.wait(interval):
        try:
            report = reap(settings=settings, sessions=sessions, send=lambda job_id: send_run_job(app, job_id))
            if report.requeued or report.failed or report.cancelled or report.send_failed or report.resent:
                log.warning("reaper: %s", report)
            if time.monotonic() >= next_store_round:
                next_store_round = time.monotonic() + settings.store_reap_seconds
                store = store_from_settings(settings)
                removed = reap_store(sessions, store)
                if removed:
                    log.warning("store reaper: %s", removed)
                cache = reap_cache(store, max_age_seconds=settings.cache_max_age_days * 86400,
                                   max_bytes=settings.cache_max_bytes, in_use_seconds=settings.cache_in_use_seconds)
                if cache:
                    log.warning("cache reaper: %s", cache)
        except Exception:  # the reaper must outlive a database or store hiccup; it retries next round
            log.exception("reaper round failed")
        finally:
            # Hold no connection between rounds: a job child forked meanwhile must not inherit an open
            # SQLite file or a Postgres socket (a round every few seconds can afford to reconnect).
            engine.dispose()


@worker_ready.connect
def _start_reaper(sender=None, **_: object) -> None:
    # A daemon thread in the worker's main process (not celery beat): every worker reaps, and the
    # compare-and-set updates in helip.transitions make concurrent reapers harmless.
    _reaper_stop.clear()
    threading.Thread(target=_reaper_loop, args=(get_settings(),), name="helip-reaper", daemon=True).start()


@worker_shutdown.connect
def _stop_reaper(sender=None, **_: object) -> None:
    _reaper_stop.set()
