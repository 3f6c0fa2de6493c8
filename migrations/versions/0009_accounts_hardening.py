"""accounts hardening: when keys were last used, who uploaded each blob, held invoices

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))

    # invoices.status is a plain string column (native_enum=False, no CHECK): the new
    # status "held" needs no change to it.
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hold_reason", sa.Text(), nullable=True))

    op.create_table(
        "blob_uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("node_id", sa.String(length=32), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_blob_uploads_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_blob_uploads_node_id_nodes")
        ),
        sa.ForeignKeyConstraint(
            ["sha256"], ["blobs.sha256"], name=op.f("fk_blob_uploads_sha256_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_uploads")),
    )
    with op.batch_alter_table("blob_uploads", schema=None) as batch_op:
        batch_op.create_index(
            "ix_blob_uploads_account_sha256", ["account_id", "sha256"], unique=False
        )
        batch_op.create_index("ix_blob_uploads_sha256", ["sha256"], unique=False)

    # Blobs stored before this revision: each grant is taken as its account's upload,
    # so quotas count them and the garbage collector sees them as recently used.
    op.execute(
        "INSERT INTO blob_uploads (id, sha256, account_id, node_id, size, uploaded_at) "
        "SELECT 'upl_' || substr(g.sha256, 1, 12) || substr(g.account_id, 5, 16), "
        "g.sha256, g.account_id, NULL, b.size, g.created_at "
        "FROM blob_grants g JOIN blobs b ON b.sha256 = g.sha256"
    )


def downgrade() -> None:
    with op.batch_alter_table("blob_uploads", schema=None) as batch_op:
        batch_op.drop_index("ix_blob_uploads_sha256")
        batch_op.drop_index("ix_blob_uploads_account_sha256")
    op.drop_table("blob_uploads")
    op.execute("UPDATE invoices SET status = 'draft' WHERE status = 'held'")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_column("hold_reason")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
