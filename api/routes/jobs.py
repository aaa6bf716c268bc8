"""The /jobs resource: submit, list, read, cancel, delete, and a job's metrics, events, checkpoints, hard pairs."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import ContextDep, OwnerDep, SessionDep, SettingsDep, StoreDep
from api.downloads import download_url
from api.errors import ApiError, not_found
from api.hard_pairs import hard_pairs_sample
from api.job_filters import METADATA_FILTER_DOC, metadata_filters
from api.schemas import (
    CheckpointPublic,
    CheckpointsPage,
    ErrorResponse,
    EventPublic,
    EventsPage,
    HardPairsPublic,
    JobCreate,
    JobPublic,
    JobsPage,
    MetricsPage,
    StepPublic,
)
from api.validation import check_locations, check_model
from api.webhook_check import check_webhook
from core.errors import StorageError
from core.spec import resolve_spec
from helip import crud, transitions
from helip.queue import send_run_job
from helip.store import job_key
from helip.tables import FINISHED_STATUSES, Job, JobStatus

log = logging.getLogger(__name__)
JOB_ID = re.compile(r"job-[0-9a-f]{24}")
# Cursor bounds = the database column types (steps are INTEGER, event ids BIGINT): larger values are a 422.
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
router = APIRouter(prefix="/jobs", tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
    422: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
}
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


def _is_job_id(value: str) -> bool:
    """The shape every job id has (helip.tables.new_job_id): anything else cannot exist, so it is never queried
    (a NUL byte or a megabyte of text in a path must not reach the database as a query parameter)."""
    return JOB_ID.fullmatch(value) is not None


def _owned(session: Session, job_id: str, owner: str) -> Job:
    """The caller's job, else 404 (another key's job is indistinguishable from a missing one)."""
    job = crud.get_job(session, job_id=job_id, owner=owner) if _is_job_id(job_id) else None
    if job is None:
        raise not_found()
    return job


def _same_request(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise ApiError(409, "idempotency_conflict",
                       "this Idempotency-Key was already used with a different request body",
                       param="Idempotency-Key")
    return job


@router.post("", status_code=201, response_model=JobPublic, responses={**ERRORS, 200: {"model": JobPublic},
                                                                         503: {"model": ErrorResponse}})
def create_job(body: JobCreate, request: Request, response: Response, session: SessionDep, owner: OwnerDep,
               settings: SettingsDep, context: ContextDep, idempotency_key: IdempotencyKey = None) -> Job:
    """Validate the whole spec (fields, allowed and existing locations), store the job, then queue its id.

    With an `Idempotency-Key`, repeating the same request returns the same job (200); the same key with a
    different body is a 409.
    """
    submitted = body.model_dump(mode="json")
    request_hash = hashlib.sha256(json.dumps(submitted, sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        existing = crud.get_job_by_idempotency_key(session, owner=owner, key=idempotency_key)
        if existing is not None:
            response.status_code = 200
            return _same_request(existing, request_hash)
    active = crud.count_active_jobs(session, owner=owner)
    if active >= settings.max_active_jobs_per_key:
        raise ApiError(429, "too_many_active_jobs",
                       f"this API key has {active} queued or running jobs, the most allowed "
                       f"(HELIP_MAX_ACTIVE_JOBS_PER_KEY={settings.max_active_jobs_per_key}); wait for one to "
                       "finish or cancel one", headers={"Retry-After": "60"})
    check_locations(body, settings.access(), budget_seconds=settings.location_check_seconds)
    check_model(body, allowed_models=settings.allowed_model_prefixes())
    check_webhook(body, settings)
    spec = resolve_spec(body)  # FastAPI parsed the body once (the API's door); this only fills in the seed
    try:
        job = transitions.create_job(session, owner=owner, spec=spec.model_dump(mode="json"), seed=int(spec.train.seed or 0),
                              idempotency_key=idempotency_key or None, request_hash=request_hash)
        job.name, job.meta = spec.name, dict(spec.metadata)
        job.webhook_cursor = 0 if spec.webhook is not None else None  # the webhook dispatcher starts from here
        session.commit()  # the row exists before the worker can see the message
    except IntegrityError:
        session.rollback()  # a concurrent request with the same key won the insert
        existing = crud.get_job_by_idempotency_key(session, owner=owner, key=idempotency_key or "")
        if existing is None:
            raise
        response.status_code = 200
        return _same_request(existing, request_hash)
    try:
        send_run_job(context.celery, job.id, queue=settings.queue_name)
    except Exception as exc:  # any broker failure: the job must not stay queued forever
        log.exception("could not queue %s", job.id)
        transitions.finish_job(session, job_id=job.id, status=JobStatus.FAILED,
                        error={"code": "queue_unavailable", "message": f"the job queue is unreachable: {exc}",
                               "param": None})
        session.commit()
        raise ApiError(503, "queue_unavailable", "the job queue is unreachable; retry later") from exc
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


@router.get("", response_model=JobsPage, responses=ERRORS, openapi_extra=METADATA_FILTER_DOC)
def list_jobs(request: Request, session: SessionDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=64, description="id of the last job seen")] = None,
              status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None):
    """The caller's jobs, newest first; `status` and any number of `metadata.KEY=VALUE` (all must match) filter them."""
    metadata = metadata_filters(request.query_params.multi_items())
    if after is not None and not _is_job_id(after):
        return {"data": [], "has_more": False}  # like any unknown cursor
    jobs, has_more = crud.list_jobs(session, owner=owner, limit=limit, after=after, status=status, metadata=metadata)
    return {"data": jobs, "has_more": has_more}


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, owner: OwnerDep) -> Job:
    return _owned(session, job_id, owner)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ERRORS)
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> Job:
    """queued -> cancelled at once; running -> cancelling (the worker stops at its next check); finished -> 409."""
    job = _owned(session, job_id, owner)
    if transitions.request_cancel(session, job_id=job.id) is None:
        raise ApiError(409, "job_finished", f"the job already finished ({job.status})")
    session.commit()
    session.refresh(job)
    return job


@router.get("/{job_id}/metrics", response_model=MetricsPage, responses=ERRORS)
def job_metrics(job_id: str, session: SessionDep, owner: OwnerDep,
                after_step: Annotated[int | None, Query(ge=-1, le=INT32_MAX, description="return steps after this one")] = None,
                limit: Annotated[int, Query(ge=1, le=10000, description="steps per page")] = 1000):
    """Training step series and evaluation results ({model: {dataset: {metric: value}}})."""
    _owned(session, job_id, owner)
    rows, has_more = crud.list_steps(session, job_id=job_id, after_step=after_step, limit=limit)
    return {
        "data": [StepPublic.model_validate(r) for r in rows],
        "eval": crud.eval_results(session, job_id=job_id),
        "has_more": has_more,
    }


@router.get("/{job_id}/events", response_model=EventsPage, responses=ERRORS)
def job_events(job_id: str, session: SessionDep, owner: OwnerDep,
               after: Annotated[int | None, Query(ge=0, le=INT64_MAX, description="id of the last event seen")] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100):
    _owned(session, job_id, owner)
    rows, has_more = crud.list_events(session, job_id=job_id, after=after, limit=limit)
    return {"data": [EventPublic.model_validate(r) for r in rows], "has_more": has_more}


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPage, responses=ERRORS)
def job_checkpoints(job_id: str, request: Request, session: SessionDep, owner: OwnerDep, settings: SettingsDep,
                    store: StoreDep,
                    include: Annotated[Literal["states"] | None, Query(
                        description="`states`: also list the resumable training states the store still keeps "
                                    "(the newest `train.keep_states` of each unfinished run)")] = None,
                    after: Annotated[int | None, Query(ge=0, le=INT64_MAX, description="id of the last checkpoint seen")] = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20):
    """The job's final weights (and with `?include=states` its training states), oldest first, each with its
    step, metrics and an expiring download URL."""
    _owned(session, job_id, owner)
    rows, has_more = crud.list_checkpoints(session, job_id=job_id, include_states=include == "states",
                                           after=after, limit=limit)
    out = []
    for ck in rows:
        url, expires = download_url(request, settings, store, ck.key)
        out.append(CheckpointPublic(id=ck.id, run=ck.run, step=ck.step, final=ck.final, metrics=ck.metrics,
                                    sha256=ck.sha256, size=ck.size, created_at=ck.created_at, url=url,
                                    expires_at=expires))
    return {"data": out, "has_more": has_more}


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=ERRORS)
def delete_job(job_id: str, session: SessionDep, owner: OwnerDep, store: StoreDep) -> Response:
    """Delete a finished job: its rows, then its objects in the store. A queued or running job is a 409
    (cancel it first)."""
    job = _owned(session, job_id, owner)
    if job.status not in FINISHED_STATUSES:
        raise ApiError(409, "job_active", f"the job is {job.status}; cancel it and wait until it has finished")
    crud.delete_job(session, job_id=job.id)
    session.commit()
    try:
        store.delete_prefix(job_key(job.id))
    except StorageError:  # the rows are gone: the worker's store reaper removes the objects later
        log.exception("job %s deleted; its objects stay until the store reaper's next round", job.id)
    return Response(status_code=204)


@router.get("/{job_id}/hard-pairs", response_model=HardPairsPublic, responses=ERRORS)
def job_hard_pairs(job_id: str, request: Request, session: SessionDep, owner: OwnerDep, settings: SettingsDep,
                   store: StoreDep):
    """The mined table (hard_pairs.parquet): a download URL, its sha256, and the first rows with their keys."""
    _owned(session, job_id, owner)
    art = crud.get_artifact(session, job_id=job_id, name="hard_pairs")
    if art is None:
        raise ApiError(404, "not_available", "this job has no mined hard pairs yet")
    url, expires = download_url(request, settings, store, art.key)
    sample = hard_pairs_sample(store, art.key, art.sha256)
    return {"url": url, "expires_at": expires, "sha256": art.sha256, "size": art.size, **sample}
