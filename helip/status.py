"""A job's status: the enum tables, transitions, schemas and the client share (no database import here)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A job's status; the column stores the value. Transitions live in helip.transitions."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)
FINISHED_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
