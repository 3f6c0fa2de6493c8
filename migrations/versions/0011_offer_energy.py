"""offer energy: a provider's stated power per accelerator, PUE and grid intensity;
a match's estimated energy and carbon, and an invoice line's; a job's carbon cap and
carbon price

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("power_w", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("pue", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("grid_g_per_kwh", sa.Float(), nullable=True))
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("energy_kwh", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("gco2", sa.Float(), nullable=False, server_default="0"))
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("energy_kwh", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("gco2", sa.Float(), nullable=False, server_default="0"))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_gco2", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("carbon_usd_per_t", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("carbon_usd_per_t")
        batch_op.drop_column("max_gco2")
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.drop_column("gco2")
        batch_op.drop_column("energy_kwh")
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_column("gco2")
        batch_op.drop_column("energy_kwh")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_column("grid_g_per_kwh")
        batch_op.drop_column("pue")
        batch_op.drop_column("power_w")
