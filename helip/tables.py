"""The service's database tables (SQLAlchemy 2 typed declarative); the initial Alembic revision creates exactly these."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from helip.status import ACTIVE_STATUSES, FINISHED_STATUSES, JobStatus  # noqa: F401 - re-exported

# SQLite only auto-increments an INTEGER PRIMARY KEY, so big ids are plain integers there.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Named constraints make migrations reproducible on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}




class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend: SQLite stores naive text, so tag what it returns as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite compares datetimes as strings: store them all naive in UTC so the order is right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """`job-` + 24 hex digits: unguessable, so ids leak nothing about other users' jobs."""
    return "job-" + secrets.token_hex(12)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    owner: Mapped[str] = mapped_column(String(64))  # sha256 of the API key, or "local"
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)  # a JobStatus value
    stage: Mapped[str | None] = mapped_column(String(16))  # a core.progress.Stage value while running
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    spec: Mapped[dict[str, Any]]  # resolved: every default filled in, seed included
    seed: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None]  # {code, message, param}
    result: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of the submitted body
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict[str, Any] | None]  # {stage, done, total, step, total_steps, eta_seconds}
    name: Mapped[str | None] = mapped_column(String(200))  # spec.name
    # spec.metadata, a string map; the attribute is `meta` because DeclarativeBase owns `metadata`
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict, server_default=text("'{}'"))
    # the last event id the webhook dispatcher has turned into deliveries; NULL: no webhook, or all sent
    webhook_cursor: Mapped[int | None] = mapped_column(BigInteger)
    # bytes of the job's objects in the store (checkpoint and artifact rows), kept current by helip.crud
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_jobs_owner_created", "owner", "created_at", "id"),  # GET /jobs, newest first
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),  # the reaper's stale scan
        Index("ix_jobs_owner_status", "owner", "status"),  # the per-key quota of queued + running jobs
    )


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]

    __table_args__ = (Index("ix_events_job_id_id", "job_id", "id"),)


class StepMetric(Base):
    __tablename__ = "step_metrics"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    run: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # The unique key doubles as the index for `after_step` reads; a resumed run re-logging a step hits it.
    __table_args__ = (UniqueConstraint("job_id", "step", "run"),)


class EvalResult(Base):
    __tablename__ = "eval_results"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(32))  # baseline | helip | control
    dataset: Mapped[str] = mapped_column(String(255))
    metric: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("job_id", "model", "dataset", "metric"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    run: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(1024))  # object key in the store
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "key"), Index("ix_checkpoints_job_run_step", "job_id", "run", "step"))


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))  # hard_pairs, metrics, embeddings, checkpoint:helip, ...
    key: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "name"),)


class WebhookDelivery(Base):
    """One webhook message of a job (the outbox): sent until a 2xx answer, at least once, with backoff."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled | job.stage
    dedupe_key: Mapped[str] = mapped_column(String(64))  # the event name, or stage:<event id>
    message_id: Mapped[str] = mapped_column(String(64), unique=True)  # the webhook-id header, the same on retries
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [{at, status_code, error, ms}]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("job_id", "dedupe_key"),
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),  # the dispatcher's due scan
    )


class MiningShard(Base):
    """One row range of a job's sharded exact mining (core.mining.shards): who mines it, and where its result is.

    pending -> claimed (a worker mines it, heartbeating) -> done (result_key holds its lists); a claimed shard
    whose heartbeat is older than stale_after_seconds may be claimed again by anyone (its worker died).
    """

    __tablename__ = "mining_shards"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    plan: Mapped[str] = mapped_column(String(64))  # the plan's fingerprint (embeddings, ranges, options)
    shard: Mapped[int] = mapped_column(Integer)
    row_start: Mapped[int] = mapped_column(BigInteger)
    row_end: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | claimed | done
    worker_id: Mapped[str | None] = mapped_column(String(255))
    claims: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    seconds: Mapped[float | None] = mapped_column(Float)
    result_key: Mapped[str | None] = mapped_column(String(1024))
    counts: Mapped[dict[str, Any] | None]  # {same_caption, duplicate}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "plan", "shard"),)
