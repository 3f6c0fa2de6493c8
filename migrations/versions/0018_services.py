"""inference services: a service, its scale events and measured windows; a job may be
one of its replicas, pinned to the offer its placement chose

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from broker.db import UtcDateTime

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_StrList = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "services",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("account_id", sa.String(length=32), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column(
            "artifact_sha256", sa.String(length=64), sa.ForeignKey("blobs.sha256"), nullable=False
        ),
        sa.Column(
            "inputs_sha256", sa.String(length=64), sa.ForeignKey("blobs.sha256"), nullable=False
        ),
        sa.Column("platforms", _StrList, nullable=False),
        sa.Column("users", sa.JSON(), nullable=False),
        sa.Column("latency_slo_ms", sa.Float(), nullable=False),
        sa.Column("min_replicas", sa.Integer(), nullable=False),
        sa.Column("max_replicas", sa.Integer(), nullable=False),
        sa.Column("desired_replicas", sa.Integer(), nullable=False),
        sa.Column("max_price_per_hour_micros", sa.BigInteger(), nullable=False),
        sa.Column("allowed_countries", _StrList, nullable=False),
        sa.Column("target_queue", sa.Float(), nullable=False),
        sa.Column("target_p95_ms", sa.Float(), nullable=True),
        sa.Column("placement_note", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("undeployed_at", UtcDateTime(), nullable=True),
        sa.UniqueConstraint("account_id", "idempotency_key"),
        sa.CheckConstraint("min_replicas >= 1", name="min_replicas_positive"),
        sa.CheckConstraint("max_replicas >= min_replicas", name="max_not_below_min"),
        sa.CheckConstraint("latency_slo_ms > 0", name="slo_positive"),
    )
    op.create_index("ix_services_account_created", "services", ["account_id", "created_at"])
    op.create_index("ix_services_state", "services", ["state"])
    op.create_table(
        "service_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("service_id", sa.String(length=32), sa.ForeignKey("services.id"), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("replicas_from", sa.Integer(), nullable=False),
        sa.Column("replicas_to", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_service_events_service_at", "service_events", ["service_id", "at"])
    op.create_table(
        "service_windows",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("service_id", sa.String(length=32), sa.ForeignKey("services.id"), nullable=False),
        sa.Column("scope", sa.String(length=48), nullable=False),
        sa.Column("ended_at", UtcDateTime(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("within_slo", sa.Integer(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("replica_p95_ms", sa.Float(), nullable=True),
        sa.Column("queue_mean", sa.Float(), nullable=False),
        sa.Column("queue_max", sa.Integer(), nullable=False),
        sa.Column("relay", sa.String(length=300), nullable=True),
    )
    op.create_index(
        "ix_service_windows_service_ended", "service_windows", ["service_id", "ended_at"]
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("service_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("pinned_offer_id", sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(
            "fk_jobs_service_id_services", "services", ["service_id"], ["id"]
        )
        batch_op.create_index("ix_jobs_service_id", ["service_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_service_id")
        batch_op.drop_constraint("fk_jobs_service_id_services", type_="foreignkey")
        batch_op.drop_column("pinned_offer_id")
        batch_op.drop_column("service_id")
    op.drop_table("service_windows")
    op.drop_table("service_events")
    op.drop_table("services")
