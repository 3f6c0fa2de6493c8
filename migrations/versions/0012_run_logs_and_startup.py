"""run logs: the lines an agent reports of each run; an offer's measured start-up

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_log_lines",
        sa.Column("allocation_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["allocation_id"], ["allocations.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("allocation_id", "seq"),
    )
    op.create_index("ix_run_log_lines_job_id", "run_log_lines", ["job_id"], unique=False)
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("startup_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_column("startup_seconds")
    op.drop_index("ix_run_log_lines_job_id", table_name="run_log_lines")
    op.drop_table("run_log_lines")
