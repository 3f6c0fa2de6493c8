from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Enum, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow


class BlobKind(enum.StrEnum):
    artifact = "artifact"  # a packaged program (broker.portable.artifact)
    arrays = "arrays"  # an array bundle: inputs, a checkpoint or a result


class Blob(Base):
    """A stored file, named by the SHA-256 of its bytes; checked when it was uploaded.

    ``meta`` is what the check found: an artifact's manifest, or a bundle's
    leaves (dtype and shape of each array).
    """

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[BlobKind] = mapped_column(
        Enum(BlobKind, name="blob_kind", native_enum=False, length=16)
    )
    size: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class BlobGrant(Base):
    """An account may read a blob: it uploaded it, or it is a result of its job."""

    __tablename__ = "blob_grants"

    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class BlobUpload(Base):
    """Who uploaded a blob, from which node, and when it last did: what storage quotas
    count (each account pays for the distinct blobs it uploaded) and what a node may
    hand back as a checkpoint or result (what it uploaded itself while it ran the job).
    The same bytes uploaded again by the same uploader refresh ``uploaded_at``."""

    __tablename__ = "blob_uploads"
    __table_args__ = (
        Index("ix_blob_uploads_account_sha256", "account_id", "sha256"),
        Index("ix_blob_uploads_sha256", "sha256"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    # The node whose key uploaded it; None: the account's own key.
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"), default=None)
    size: Mapped[int] = mapped_column(BigInteger)
    uploaded_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
