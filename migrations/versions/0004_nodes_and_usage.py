"""nodes, node keys and metered usage

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("provider_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "online", "offline", "stopped", name="node_status", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("adapters", sa.JSON(), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["accounts.id"], name=op.f("fk_nodes_provider_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("provider_id", "name", name=op.f("uq_nodes_provider_id_name")),
    )
    op.create_index(op.f("ix_nodes_provider_id"), "nodes", ["provider_id"], unique=False)
    op.create_index(
        "ix_nodes_status_heartbeat", "nodes", ["status", "last_heartbeat_at"], unique=False
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node_id", sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_api_keys_node_id_nodes"),
            "nodes",
            ["node_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_index(batch_op.f("ix_api_keys_node_id"), ["node_id"], unique=False)
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node_id", sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_offers_node_id_nodes"), "nodes", ["node_id"], ["id"]
        )
        batch_op.create_index(batch_op.f("ix_offers_node_id"), ["node_id"], unique=False)
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("usage_ms", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("end_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("usage_ms", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("usage_ms")
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_column("end_reason")
        batch_op.drop_column("usage_ms")
        batch_op.drop_column("started_at")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_offers_node_id"))
        batch_op.drop_constraint(batch_op.f("fk_offers_node_id_nodes"), type_="foreignkey")
        batch_op.drop_column("node_id")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_node_id"))
        batch_op.drop_constraint(batch_op.f("fk_api_keys_node_id_nodes"), type_="foreignkey")
        batch_op.drop_column("node_id")
    op.drop_index("ix_nodes_status_heartbeat", table_name="nodes")
    op.drop_index(op.f("ix_nodes_provider_id"), table_name="nodes")
    op.drop_table("nodes")
