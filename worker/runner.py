"""One attempt at a job: claim it, keep its lease, restore its files, run the pipeline, record the outcome."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core import layout
from core.errors import HelipError, JobCancelled, StorageError
from core.spec import JobSpec, parse_spec
from helip import crud, transitions
from helip.settings import Settings
from helip.store import Store, job_key, store_from_settings
from helip.tables import JobStatus
from worker.files import JobFiles, json_safe
from worker.reporter import DbReporter, Heartbeat, Lease

log = logging.getLogger(__name__)

# The signature of core.pipeline.run_job; injectable so the claim/lease/outcome logic is testable without torch.
PipelineFn = Callable[..., Any]


def worker_identity(hostname: str | None = None) -> str:
    """Unique per attempt: host, process and a random suffix, so a re-claim by the same process is still new."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def pipeline_options(settings: Settings) -> dict[str, Any]:
    """What core.pipeline.run_job takes from the settings (core never reads the environment itself)."""
    return {"cpu_processes": settings.cpu_processes, "weights_cache": settings.weights_cache}


def shard_backend(settings: Settings, sessions: sessionmaker[Session], store: Store, job_id: str,
                  worker_id: str) -> Any:
    """Mining shards through the database, the store and the queue (worker/shards.py)."""
    from helip.queue import celery_client, send_mine_shards
    from worker.shards import ServiceShards

    client: list[Any] = []

    def send(job: str, plan: str) -> None:
        if not client:
            client.append(celery_client(settings))
        send_mine_shards(client[0], job, plan)

    return ServiceShards(settings=settings, sessions=sessions, store=store, job_id=job_id, worker_id=worker_id,
                         send=send)


def _default_pipeline(*args: Any, **kwargs: Any) -> Any:
    from core.pipeline import run_job  # imported in the job's child process only: torch never loads in the parent

    return run_job(*args, **kwargs)


def _commit(sessions: sessionmaker[Session], fn: Callable[[Session], Any], *, tries: int = 5) -> Any:
    """A state change that must land (the job's outcome): retry a dropped database for a while."""
    for attempt in range(tries):
        try:
            with sessions() as session:
                out = fn(session)
                session.commit()
                return out
        except (OperationalError, InterfaceError):
            if attempt == tries - 1:
                raise
            time.sleep(min(2.0**attempt, 10.0))
    return None


def execute_job(
    job_id: str, *, settings: Settings, worker_id: str | None = None,
    sessions: sessionmaker[Session] | None = None, store: Store | None = None,
    pipeline: PipelineFn | None = None, device: str | None = None,
) -> JobStatus | None:
    """Run one attempt of `job_id`; returns the final status written, or None when there was nothing to do
    (the job is not claimable: running elsewhere, finished, cancelled) or the lease was lost midway."""
    if sessions is None:
        from helip.db import session_factory

        sessions = session_factory(settings)
    worker_id = worker_id or worker_identity()
    job = _commit(sessions, lambda s: transitions.claim_job(
        s, job_id=job_id, worker_id=worker_id, stale_after_seconds=settings.stale_after_seconds,
        max_attempts=settings.max_attempts))
    if job is None:
        log.info("job %s: not claimable (running elsewhere, finished or unknown); message dropped", job_id)
        return None
    attempt = job.attempts
    lease = Lease(job_id, worker_id)
    heartbeat = Heartbeat(sessions=sessions, lease=lease, interval=settings.heartbeat_seconds).start()
    workdir = Path(settings.data_dir) / "work" / job_id / f"attempt-{attempt}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    keep: Path | None = None  # where this attempt's local checkpoints were kept, when the store failed
    try:
        store = store or store_from_settings(settings)
        files = JobFiles(store=store, sessions=sessions, job_id=job_id, workdir=workdir)
        spec: JobSpec = parse_spec(job.spec)  # the worker's door: parsed once, the pipeline takes it as is
        reporter = DbReporter(sessions=sessions, lease=lease, files=files, keep_states=spec.train.keep_states)
        reporter.event(f"attempt {attempt} started", data={"attempt": attempt, "worker": worker_id})
        restored = files.restore()
        if restored:
            reporter.event(f"restored {len(restored)} file(s) saved by an earlier attempt",
                           data={"files": restored,
                                 "resumed_steps": {f["run"]: f["step"] for f in restored if "run" in f}})
        # The store also holds the embeddings / hard-pairs cache (core.cache; cache/ next to jobs/).
        result = (pipeline or _default_pipeline)(spec, workdir, access=settings.access(), reporter=reporter,
                                                 device=device, cache=store, **pipeline_options(settings),
                                                 shards=shard_backend(settings, sessions, store, job_id, worker_id))
        if lease.lost.is_set():
            return _lost(job_id)
        files.sync()
        artifacts = files.publish(dict(result.artifacts))
        drop_shard_objects(store, job_id)
        # The metrics are the eval rows (GET /jobs/{id}/metrics) and the metrics.json artifact: not copied here.
        outcome = json_safe({"summary": result.summary, "artifacts": artifacts})
        won = _commit(sessions, lambda s: transitions.finish_job(s, job_id=job_id, status=JobStatus.SUCCEEDED,
                                                                 worker_id=worker_id, result=outcome))
        return JobStatus.SUCCEEDED if won else _lost(job_id)
    except JobCancelled as exc:
        if lease.lost.is_set():
            return _lost(job_id)
        return _finish(sessions, job_id, worker_id, JobStatus.CANCELLED, None, f"cancelled: {exc.message}")
    except StorageError as exc:
        # The store stayed down (e.g. during a checkpoint upload): hours of training must not vanish with
        # the workdir, so the local checkpoints move aside (HELIP_DATA_DIR/kept/<job>/attempt-<n>/ on this
        # host). The user learns which host; the folder is a server path, so only the worker log names it.
        error = exc.to_dict()
        keep = keep_checkpoints(workdir, kept_dir(settings, job_id, attempt))
        data: dict[str, Any] = {}
        if keep is not None:
            host = socket.gethostname()
            log.warning("job %s: the store is down; attempt %d's local checkpoints are kept in %s on %s",
                        job_id, attempt, keep, host)
            data = {"kept_checkpoints": sorted(p.name for p in keep.glob("*.pt")), "host": host}
            error["message"] += f" (the local checkpoints are kept on {host}; its worker log names the folder)"
        return _finish(sessions, job_id, worker_id, JobStatus.FAILED, error, f"failed: {error['message']}", data=data)
    except HelipError as exc:
        return _finish(sessions, job_id, worker_id, JobStatus.FAILED, exc.to_dict(), f"failed: {exc.message}")
    except Exception as exc:  # a bug or an unexpected environment failure: never leave the job running
        # The traceback and the exception's text (which may name server paths) go to the worker log only.
        log.exception("job %s: internal error", job_id)
        message = f"internal error ({type(exc).__name__}), see the worker log"
        error = {"code": "internal_error", "message": message, "param": None}
        return _finish(sessions, job_id, worker_id, JobStatus.FAILED, error, f"failed: {message}",
                       data={"exception": type(exc).__name__}, level="error")
    finally:
        heartbeat.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def drop_shard_objects(store: Store, job_id: str) -> None:
    """The mining shards' inputs and lists, once the job's hard pairs are published (the rows stay, as the
    record of who mined what); a store that refuses leaves them to the job's deletion."""
    from worker.shards import SHARDS_DIR

    try:
        store.delete_prefix(job_key(job_id, SHARDS_DIR))
    except StorageError:
        log.exception("job %s: could not delete the mining shards' objects", job_id)


def kept_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    """Where an attempt's local checkpoints are kept when the store stays down."""
    return Path(settings.data_dir) / "kept" / job_id / f"attempt-{attempt}"


def keep_checkpoints(workdir: Path, dest: Path) -> Path | None:
    """Move `workdir/checkpoints` (if it holds any .pt file) to `dest`; returns `dest`, or None when none."""
    src = Path(workdir) / layout.CHECKPOINTS_DIR
    if not any(src.glob("*.pt")):
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(str(src), str(dest))
    for partial in dest.glob("*.tmp"):  # a save interrupted by the failure is not a checkpoint
        partial.unlink(missing_ok=True)
    return dest


def _lost(job_id: str) -> None:
    log.warning("job %s: lease lost; another worker or the reaper owns the job now, outcome not recorded", job_id)
    return None


def _finish(sessions: sessionmaker[Session], job_id: str, worker_id: str, status: JobStatus, error: dict | None,
            message: str, *, data: dict[str, Any] | None = None, level: str = "info") -> JobStatus | None:
    def write(session: Session) -> bool:
        won = transitions.finish_job(session, job_id=job_id, status=status, worker_id=worker_id, error=error)
        if won:
            crud.add_event(session, job_id=job_id, message=message,
                           level=level if status != JobStatus.FAILED else "error",
                           data=json_safe({"status": status, "error": error, **(data or {})}))
        return won

    return status if _commit(sessions, write) else _lost(job_id)
