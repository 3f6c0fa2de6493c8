"""accounts, offers and jobs

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "developer", "provider", "admin", name="account_role", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_api_keys_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_account_id"), ["account_id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "open",
                "matched",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                name="job_state",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("accelerators", sa.Integer(), nullable=False),
        sa.Column("min_memory_gib", sa.Float(), nullable=False),
        sa.Column(
            "vendors", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column(
            "accelerator_models",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "platforms", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("max_price_per_hour_micros", sa.BigInteger(), nullable=False),
        sa.Column("duration_hours", sa.Float(), nullable=True),
        sa.Column("flops", sa.Float(), nullable=True),
        sa.Column("bytes", sa.Float(), nullable=True),
        sa.Column("dtype", sa.String(length=8), nullable=True),
        sa.Column("deadline_hours", sa.Float(), nullable=True),
        sa.Column("latency_slo_ms", sa.Float(), nullable=True),
        sa.Column("user_lat", sa.Float(), nullable=True),
        sa.Column("user_lon", sa.Float(), nullable=True),
        sa.Column("data_region", sa.String(length=64), nullable=True),
        sa.Column("data_gb", sa.Float(), nullable=True),
        sa.Column(
            "allowed_countries",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("accelerators >= 1", name=op.f("ck_jobs_accelerators_positive")),
        sa.CheckConstraint(
            "max_price_per_hour_micros >= 0", name=op.f("ck_jobs_price_not_negative")
        ),
        sa.CheckConstraint("priority >= 1", name=op.f("ck_jobs_priority_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_jobs_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint(
            "account_id", "idempotency_key", name=op.f("uq_jobs_account_id_idempotency_key")
        ),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_account_created", ["account_id", "created_at"], unique=False)
        batch_op.create_index(
            "ix_jobs_state_price", ["state", "max_price_per_hour_micros"], unique=False
        )

    op.create_table(
        "offers",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("provider_id", sa.String(length=32), nullable=False),
        sa.Column(
            "status",
            sa.Enum("active", "withdrawn", name="offer_status", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("vendor", sa.String(length=32), nullable=False),
        sa.Column("accelerator", sa.String(length=64), nullable=False),
        sa.Column("platform", sa.String(length=8), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("memory_gib", sa.Float(), nullable=False),
        sa.Column("tflops_bf16", sa.Float(), nullable=False),
        sa.Column("tflops_fp32", sa.Float(), nullable=False),
        sa.Column("mem_bw_gbps", sa.Float(), nullable=False),
        sa.Column("price_per_hour_micros", sa.BigInteger(), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.Column("available_hours", sa.Float(), nullable=True),
        sa.Column("efficiency", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("count >= 1", name=op.f("ck_offers_count_positive")),
        sa.CheckConstraint("price_per_hour_micros >= 0", name=op.f("ck_offers_price_not_negative")),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["accounts.id"], name=op.f("fk_offers_provider_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offers")),
    )
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.create_index(
            "ix_offers_book", ["status", "accelerator", "price_per_hour_micros"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_offers_provider_id"), ["provider_id"], unique=False)
        batch_op.create_index(
            "ix_offers_status_price", ["status", "price_per_hour_micros"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_index("ix_offers_status_price")
        batch_op.drop_index(batch_op.f("ix_offers_provider_id"))
        batch_op.drop_index("ix_offers_book")

    op.drop_table("offers")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_state_price")
        batch_op.drop_index("ix_jobs_account_created")

    op.drop_table("jobs")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_account_id"))

    op.drop_table("api_keys")
    op.drop_table("accounts")
