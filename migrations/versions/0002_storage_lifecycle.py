"""Storage lifecycle: the bytes a job holds in the store, and an index for the per-key job quota.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stored_bytes", sa.BigInteger(), server_default="0", nullable=False))
        batch.create_index("ix_jobs_owner_status", ["owner", "status"], unique=False)
    # jobs that existed before: what their checkpoint and artifact rows hold
    op.execute(
        "UPDATE jobs SET stored_bytes = "
        "COALESCE((SELECT SUM(size) FROM checkpoints WHERE checkpoints.job_id = jobs.id), 0) + "
        "COALESCE((SELECT SUM(size) FROM artifacts WHERE artifacts.job_id = jobs.id), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_status")
        batch.drop_column("stored_bytes")
