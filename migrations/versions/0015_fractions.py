"""fractions: jobs that ask for part of an accelerator (thousandths or a MIG profile)
and accept shared capacity or not; offers of MIG instances and shared accelerators;
the slice and share each allocation holds. Existing rows stay whole.

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fraction_milli", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("mig_profile", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("accepts_shared", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.create_check_constraint(
            "fraction_in_range",
            "fraction_milli IS NULL OR (fraction_milli >= 1 AND fraction_milli <= 999)",
        )
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "fraction_kind",
                sa.Enum(
                    "whole", "mig", "shared", name="fraction_kind", native_enum=False, length=8
                ),
                server_default="whole",
                nullable=False,
            )
        )
        batch_op.add_column(sa.Column("shares", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("memory_per_share_gib", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("shares_busy", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("mig_instances", _JSON, server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("mig_busy", _JSON, server_default="[]", nullable=False))
        batch_op.create_check_constraint("shares_not_negative", "shares >= 0")
        batch_op.create_check_constraint("shares_busy_not_negative", "shares_busy >= 0")
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slice", sa.String(length=40), nullable=True))
        batch_op.add_column(
            sa.Column("share_num", sa.Integer(), server_default="1", nullable=False)
        )
        batch_op.add_column(
            sa.Column("share_den", sa.Integer(), server_default="1", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_column("share_den")
        batch_op.drop_column("share_num")
        batch_op.drop_column("slice")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_constraint("shares_busy_not_negative", type_="check")
        batch_op.drop_constraint("shares_not_negative", type_="check")
        batch_op.drop_column("mig_busy")
        batch_op.drop_column("mig_instances")
        batch_op.drop_column("shares_busy")
        batch_op.drop_column("memory_per_share_gib")
        batch_op.drop_column("shares")
        batch_op.drop_column("fraction_kind")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fraction_in_range", type_="check")
        batch_op.drop_column("accepts_shared")
        batch_op.drop_column("mig_profile")
        batch_op.drop_column("fraction_milli")
