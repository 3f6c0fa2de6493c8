"""indexes for offer searches by region, and by platform under a price

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.create_index(
            "ix_offers_region", ["status", "region", "price_per_hour_micros"], unique=False
        )
        batch_op.create_index(
            "ix_offers_platform",
            ["status", "platform", "price_per_hour_micros", "memory_gib"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_index("ix_offers_platform")
        batch_op.drop_index("ix_offers_region")
