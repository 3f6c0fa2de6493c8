"""artifacts, inputs and job progress

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BLOB_COLUMNS = ("artifact_sha256", "inputs_sha256", "checkpoint_sha256", "result_sha256")


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("artifact", "arrays", name="blob_kind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "blob_grants",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_blob_grants_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["sha256"], ["blobs.sha256"], name=op.f("fk_blob_grants_sha256_blobs")
        ),
        sa.PrimaryKeyConstraint("sha256", "account_id", name=op.f("pk_blob_grants")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in _BLOB_COLUMNS:
            batch_op.add_column(sa.Column(column, sa.String(length=64), nullable=True))
            batch_op.create_foreign_key(
                batch_op.f(f"fk_jobs_{column}_blobs"), "blobs", [column], ["sha256"]
            )
        batch_op.add_column(sa.Column("steps", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("checkpoint_every", sa.Integer(), nullable=True))
        for column in ("steps_done", "checkpoint_step", "attempts"):
            batch_op.add_column(sa.Column(column, sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint(op.f("ck_jobs_steps_positive"), "steps >= 1")
        batch_op.create_check_constraint(
            op.f("ck_jobs_checkpoint_every_positive"), "checkpoint_every >= 1"
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_checkpoint_every_positive"), type_="check")
        batch_op.drop_constraint(op.f("ck_jobs_steps_positive"), type_="check")
        for column in _BLOB_COLUMNS:
            batch_op.drop_constraint(batch_op.f(f"fk_jobs_{column}_blobs"), type_="foreignkey")
        for column in (
            "started_at",
            "error",
            "attempts",
            "checkpoint_step",
            "steps_done",
            "checkpoint_every",
            "steps",
            *_BLOB_COLUMNS,
        ):
            batch_op.drop_column(column)
    op.drop_table("blob_grants")
    op.drop_table("blobs")
