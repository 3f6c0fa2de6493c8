"""allocations and clearing rounds

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
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
    # An offer's count is now its free accelerators, which clearing can use up;
    # capacity is what the provider lists in all.
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("capacity", sa.Integer(), nullable=True))
    op.execute("UPDATE offers SET capacity = count")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.alter_column("capacity", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_constraint(op.f("ck_offers_count_positive"), type_="check")
        batch_op.create_check_constraint(op.f("ck_offers_count_not_negative"), "count >= 0")
        batch_op.create_check_constraint(
            op.f("ck_offers_count_within_capacity"), "count <= capacity"
        )
    op.create_table(
        "clearing_rounds",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("jobs_considered", sa.Integer(), nullable=False),
        sa.Column("offers_considered", sa.Integer(), nullable=False),
        sa.Column("matched", sa.Integer(), nullable=False),
        sa.Column("stale", sa.Integer(), nullable=False),
        sa.Column("objective", sa.Float(), nullable=True),
        sa.Column("bound", sa.Float(), nullable=True),
        sa.Column("gap", sa.Float(), nullable=True),
        sa.Column("solve_seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clearing_rounds")),
    )
    with op.batch_alter_table("clearing_rounds", schema=None) as batch_op:
        batch_op.create_index("ix_clearing_rounds_started", ["started_at"], unique=False)

    op.create_table(
        "allocations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("offer_id", sa.String(length=32), nullable=False),
        sa.Column("round_id", sa.String(length=32), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "active",
                "released",
                "finished",
                name="allocation_status",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("accelerators", sa.Integer(), nullable=False),
        sa.Column("price_per_hour_micros", sa.BigInteger(), nullable=False),
        sa.Column("runtime_hours", sa.Float(), nullable=False),
        sa.Column("rtt_ms", sa.Float(), nullable=False),
        sa.Column("compute_micros", sa.BigInteger(), nullable=False),
        sa.Column("egress_micros", sa.BigInteger(), nullable=False),
        sa.Column("latency_micros", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_allocations_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["offer_id"], ["offers.id"], name=op.f("fk_allocations_offer_id_offers")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["clearing_rounds.id"],
            name=op.f("fk_allocations_round_id_clearing_rounds"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_allocations")),
    )
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_allocations_job_id"), ["job_id"], unique=False)
        batch_op.create_index("ix_allocations_offer_status", ["offer_id", "status"], unique=False)
        batch_op.create_index(
            "uq_allocations_active_job",
            ["job_id"],
            unique=True,
            sqlite_where=sa.text("status = 'active'"),
            postgresql_where=sa.text("status = 'active'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_allocations_active_job",
            sqlite_where=sa.text("status = 'active'"),
            postgresql_where=sa.text("status = 'active'"),
        )
        batch_op.drop_index("ix_allocations_offer_status")
        batch_op.drop_index(batch_op.f("ix_allocations_job_id"))

    op.drop_table("allocations")
    with op.batch_alter_table("clearing_rounds", schema=None) as batch_op:
        batch_op.drop_index("ix_clearing_rounds_started")

    op.drop_table("clearing_rounds")
    op.execute("UPDATE offers SET count = capacity")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_offers_count_within_capacity"), type_="check")
        batch_op.drop_constraint(op.f("ck_offers_count_not_negative"), type_="check")
        batch_op.create_check_constraint(op.f("ck_offers_count_positive"), "count >= 1")
        batch_op.drop_column("capacity")
