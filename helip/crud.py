"""Data functions over the service tables (keyword-only): reading jobs, and a job's events, step metrics,
evaluation results, checkpoints and artifacts. A job's state changes are helip.transitions'.
Functions flush but never commit: the caller owns the transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from helip.tables import (
    ACTIVE_STATUSES,
    Artifact,
    Base,
    Checkpoint,
    EvalResult,
    Event,
    Job,
    MiningShard,
    StepMetric,
    utcnow,
)

# -- jobs ----------------------------------------------------------------------------------------------


def get_job(session: Session, *, job_id: str, owner: str | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to another owner (callers answer 404 either way)."""
    stmt = select(Job).where(Job.id == job_id)
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return session.scalars(stmt).one_or_none()


def refresh_job(session: Session, *, job_id: str) -> Job | None:
    """Re-read a job row from the database, discarding what the session cached."""
    return session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one_or_none()


def get_job_by_idempotency_key(session: Session, *, owner: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).one_or_none()


def list_jobs(session: Session, *, owner: str, limit: int = 20, after: str | None = None,
              status: str | None = None, metadata: dict[str, str] | None = None) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page; `status` and every `metadata` pair
    must match. Returns (jobs, has_more)."""
    stmt = select(Job).where(Job.owner == owner)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.meta[key].as_string() == value)
    if after is not None:
        anchor = get_job(session, job_id=after, owner=owner)
        if anchor is None:
            return [], False
        stmt = stmt.where(
            or_(Job.created_at < anchor.created_at, and_(Job.created_at == anchor.created_at, Job.id < anchor.id))
        )
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def count_active_jobs(session: Session, *, owner: str) -> int:
    """How many of `owner`'s jobs are queued, running or cancelling (the per-key quota counts these)."""
    return int(session.scalar(
        select(func.count(Job.id)).where(Job.owner == owner, Job.status.in_(ACTIVE_STATUSES))
    ) or 0)


def events_with_prefix(session: Session, *, job_id: str, prefixes: tuple[str, ...]) -> tuple[int, datetime | None]:
    """(how many, newest created_at) of a job's events whose message starts with one of `prefixes`."""
    match = or_(*(Event.message.startswith(p, autoescape=True) for p in prefixes))
    count, newest = session.execute(
        select(func.count(Event.id), func.max(Event.created_at)).where(Event.job_id == job_id, match)
    ).one()
    return int(count or 0), newest


# -- events --------------------------------------------------------------------------------------------


def add_event(
    session: Session, *, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None,
) -> Event:
    ev = Event(job_id=job_id, message=message, level=level, data=data or {}, created_at=utcnow())
    session.add(ev)
    session.flush()
    return ev


def list_events(session: Session, *, job_id: str, after: int | None = None, limit: int = 100) -> tuple[list[Event], bool]:
    """Oldest first; `after` is the id of the last event already read."""
    stmt = select(Event).where(Event.job_id == job_id)
    if after is not None:
        stmt = stmt.where(Event.id > after)
    rows = list(session.scalars(stmt.order_by(Event.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# -- idempotent inserts ----------------------------------------------------------------------------------


def _insert(session: Session, table: type[Base]) -> Any:
    """The dialect's INSERT for `table` (with on_conflict_do_nothing / on_conflict_do_update)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database dialect {name!r} (Postgres or SQLite)")


# -- step metrics --------------------------------------------------------------------------------------


def record_step(session: Session, *, job_id: str, run: str, step: int, values: dict[str, Any]) -> bool:
    """Store one optimizer step's values; a step already stored (a resumed run re-logging it) is kept once.

    Returns True when the row is new.
    """
    stmt = _insert(session, StepMetric).values(
        job_id=job_id, run=run, step=step, values=values, created_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=["job_id", "step", "run"]).returning(StepMetric.id)
    # RETURNING, not rowcount: drivers disagree on rowcount for a skipped ON CONFLICT insert.
    return session.execute(stmt).first() is not None


def list_steps(
    session: Session, *, job_id: str, after_step: int | None = None, limit: int = 1000,
) -> tuple[list[StepMetric], bool]:
    """Step rows with step > after_step, ordered by (step, run). `limit` counts distinct steps, so a page
    never splits the runs of one step and `after_step` = the last step read is an exact cursor."""
    steps_q = select(StepMetric.step).where(StepMetric.job_id == job_id)
    if after_step is not None:
        steps_q = steps_q.where(StepMetric.step > after_step)
    steps = list(session.scalars(steps_q.distinct().order_by(StepMetric.step).limit(limit + 1)))
    has_more = len(steps) > limit
    steps = steps[:limit]
    if not steps:
        return [], False
    rows = session.scalars(
        select(StepMetric).where(StepMetric.job_id == job_id, StepMetric.step.between(steps[0], steps[-1]))
        .order_by(StepMetric.step, StepMetric.run)
    )
    return list(rows), has_more


def max_step(session: Session, *, job_id: str, run: str) -> int | None:
    return session.scalar(select(func.max(StepMetric.step)).where(StepMetric.job_id == job_id, StepMetric.run == run))


# -- eval results --------------------------------------------------------------------------------------


def record_eval(session: Session, *, job_id: str, model: str, dataset: str, metrics: dict[str, float]) -> None:
    """Store (or overwrite, when an evaluation is re-run after a resume) one model's metrics on one data set."""
    for metric, value in metrics.items():
        stmt = _insert(session, EvalResult).values(
            job_id=job_id, model=model, dataset=dataset, metric=metric, value=float(value),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "model", "dataset", "metric"], set_={"value": stmt.excluded.value},
        )
        session.execute(stmt)


def eval_results(session: Session, *, job_id: str) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {dataset: {metric: value}}}, the shape of metrics.json."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    rows = session.scalars(
        select(EvalResult).where(EvalResult.job_id == job_id)
        .order_by(EvalResult.model, EvalResult.dataset, EvalResult.metric)
    )
    for r in rows:
        out.setdefault(r.model, {}).setdefault(r.dataset, {})[r.metric] = r.value
    return out


# -- checkpoints and artifacts -------------------------------------------------------------------------


def record_checkpoint(
    session: Session, *, job_id: str, run: str, step: int, key: str, sha256: str, size: int,
    final: bool = False, metrics: dict[str, Any] | None = None,
) -> None:
    """A checkpoint uploaded to the store under `key` (re-uploading the same key updates the row)."""
    stmt = _insert(session, Checkpoint).values(
        job_id=job_id, run=run, step=step, key=key, sha256=sha256, size=size, final=final,
        metrics=metrics, created_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "key"],
        set_={c: stmt.excluded[c] for c in ("run", "step", "sha256", "size", "final", "metrics", "created_at")},
    )
    session.execute(stmt)
    refresh_stored_bytes(session, job_id=job_id)


def list_checkpoints(
    session: Session, *, job_id: str, include_states: bool = True, after: int | None = None,
    limit: int | None = None,
) -> tuple[list[Checkpoint], bool]:
    """Oldest first (by id); `after` is the id of the last checkpoint already read. Returns (rows, has_more)."""
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if not include_states:
        stmt = stmt.where(Checkpoint.final.is_(True))
    if after is not None:
        stmt = stmt.where(Checkpoint.id > after)
    stmt = stmt.order_by(Checkpoint.id)
    if limit is None:
        return list(session.scalars(stmt)), False
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def latest_checkpoints(session: Session, *, job_id: str) -> dict[str, Checkpoint]:
    """The newest checkpoint of each run (highest step; a final one wins a tie): what a resumed job restores."""
    latest: dict[str, Checkpoint] = {}
    for ck in list_checkpoints(session, job_id=job_id)[0]:
        cur = latest.get(ck.run)
        if cur is None or (ck.step, ck.final) >= (cur.step, cur.final):
            latest[ck.run] = ck
    return latest


def surplus_states(session: Session, *, job_id: str, keep: int, run: str | None = None) -> list[Checkpoint]:
    """Training states (non-final rows) beyond the newest `keep` of each run, and every state of a run whose
    final weights are recorded: what the store no longer needs to keep. Oldest first."""
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if run is not None:
        stmt = stmt.where(Checkpoint.run == run)
    rows = list(session.scalars(stmt.order_by(Checkpoint.run, Checkpoint.step.desc(), Checkpoint.id.desc())))
    finished = {r.run for r in rows if r.final}
    out: list[Checkpoint] = []
    kept: dict[str, int] = {}
    for r in rows:
        if r.final:
            continue
        if r.run in finished or kept.get(r.run, 0) >= keep:
            out.append(r)
        else:
            kept[r.run] = kept.get(r.run, 0) + 1
    return sorted(out, key=lambda r: (r.step, r.id))


def jobs_with_surplus_states(session: Session, *, limit: int = 1000) -> list[tuple[str, int]]:
    """(job id, keep_states) of jobs holding more than one state of a run, or a state of a finished run."""
    many = select(Checkpoint.job_id).where(Checkpoint.final.is_(False)).group_by(Checkpoint.job_id, Checkpoint.run) \
        .having(func.count(Checkpoint.id) > 1)
    final_runs = select(Checkpoint.job_id, Checkpoint.run).where(Checkpoint.final.is_(True)).subquery()
    after_final = select(Checkpoint.job_id).join(
        final_runs, and_(final_runs.c.job_id == Checkpoint.job_id, final_runs.c.run == Checkpoint.run),
    ).where(Checkpoint.final.is_(False))
    rows = session.execute(
        select(Job.id, Job.spec).where(or_(Job.id.in_(many), Job.id.in_(after_final))).order_by(Job.id).limit(limit)
    )
    return [(job_id, int(((spec or {}).get("train") or {}).get("keep_states") or 2)) for job_id, spec in rows]


def delete_checkpoint(session: Session, *, checkpoint_id: int) -> None:
    """Forget one checkpoint row (its object is deleted first by the caller) and update the job's byte count."""
    job_id = session.scalar(select(Checkpoint.job_id).where(Checkpoint.id == checkpoint_id))
    session.execute(delete(Checkpoint).where(Checkpoint.id == checkpoint_id))
    if job_id is not None:
        refresh_stored_bytes(session, job_id=job_id)


def refresh_stored_bytes(session: Session, *, job_id: str) -> None:
    """jobs.stored_bytes = the sizes of the job's checkpoint and artifact rows (what it holds in the store)."""
    held = (
        func.coalesce(select(func.sum(Checkpoint.size)).where(Checkpoint.job_id == job_id).scalar_subquery(), 0)
        + func.coalesce(select(func.sum(Artifact.size)).where(Artifact.job_id == job_id).scalar_subquery(), 0)
    )
    session.execute(update(Job).where(Job.id == job_id).values(stored_bytes=held),
                    execution_options={"synchronize_session": "fetch"})


def record_artifact(session: Session, *, job_id: str, name: str, key: str, sha256: str, size: int) -> None:
    """A named job file in the store (hard_pairs, metrics, embeddings, ...); one row per name, last wins."""
    stmt = _insert(session, Artifact).values(
        job_id=job_id, name=name, key=key, sha256=sha256, size=size, created_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "name"],
        set_={c: stmt.excluded[c] for c in ("key", "sha256", "size", "created_at")},
    )
    session.execute(stmt)
    refresh_stored_bytes(session, job_id=job_id)


def get_artifact(session: Session, *, job_id: str, name: str) -> Artifact | None:
    return session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)).one_or_none()


def list_artifacts(session: Session, *, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def delete_job(session: Session, *, job_id: str) -> None:
    """Remove a job and all its rows (the store's objects are the caller's business: the API deletes them
    after the commit, and the worker's store reaper removes any that a failure left behind)."""
    for table in (Event, StepMetric, EvalResult, Checkpoint, Artifact, MiningShard):
        session.execute(delete(table).where(table.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))


def job_statuses(session: Session, *, job_ids: list[str]) -> dict[str, str]:
    """{job id: status} for the ids that still have a job row."""
    if not job_ids:
        return {}
    return {job_id: status for job_id, status in session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids)))}
