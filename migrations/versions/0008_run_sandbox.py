"""offers may be suspended for leaving matches unstarted

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # offers.status is a plain string column (native_enum=False, no CHECK): the new
    # status value "suspended" needs no change to it.
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("unstarted_strikes", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("suspended_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE offers SET status = 'withdrawn' WHERE status = 'suspended'")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_column("suspended_reason")
        batch_op.drop_column("suspended_at")
        batch_op.drop_column("unstarted_strikes")
