"""transfer, compiling and measured energy: the seconds per GB and per KB of program
an agent measured for moving a run's data and compiling its program, the bytes a job's
run moves and its program's size; the energy a run's agent measured, and which
basis an invoice line's energy has

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("transfer_s_per_gb", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("compile_s_per_kb", sa.Float(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("io_bytes", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("program_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("measured_kwh", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("measured_gco2", sa.Float(), nullable=True))
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "energy_basis", sa.String(length=16), server_default="estimated", nullable=False
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.drop_column("energy_basis")
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_column("measured_gco2")
        batch_op.drop_column("measured_kwh")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("program_bytes")
        batch_op.drop_column("io_bytes")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_column("compile_s_per_kb")
        batch_op.drop_column("transfer_s_per_gb")
