"""Uploads and reads of artifacts and array bundles. Functions take the session and never
commit; checks that need no database (JAX deserialization) run before a session opens."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.accounts.visibility import sees_all
from broker.blobs.store import BlobStore, LocalBlobStore, Upload
from broker.config import get_settings
from broker.db import Transactions, new_id, utcnow
from broker.errors import BrokerError, InvalidInput, NotFound
from broker.models.account import Account
from broker.models.blob import Blob, BlobGrant, BlobKind, BlobUpload
from broker.models.job import Job
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from broker.portable import arrays
from broker.portable.manifest import ArtifactError

if TYPE_CHECKING:  # JAX is imported only when an artifact is read
    from broker.portable.artifact import Artifact


class InvalidArtifact(InvalidInput):
    code = "invalid_artifact"


class InvalidArrays(InvalidInput):
    code = "invalid_arrays"


@cache
def get_store() -> BlobStore:
    """The configured store: DATA_DIR/blobs, or an S3-compatible bucket (``blobs.s3``)."""
    settings = get_settings()
    if settings.blob_store == "s3":
        from broker.blobs.s3 import S3BlobStore

        return S3BlobStore.from_settings(
            settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region
        )
    return LocalBlobStore(settings.blob_dir)


def check_artifact(upload: Upload) -> dict[str, Any]:
    """The manifest of an uploaded artifact, once every check passed (no database)."""
    from broker.portable.checks import verify_artifact

    try:
        artifact = verify_artifact(upload.read())
    except ArtifactError as e:
        raise InvalidArtifact(str(e), field="body") from None
    return artifact.manifest.model_dump(mode="json")


def check_arrays(upload: Upload) -> dict[str, Any]:
    """The leaves of an uploaded array bundle, once its header checks out."""
    try:
        leaves = arrays.read_header(upload.head(arrays.MAX_HEAD), upload.size)
    except arrays.BundleError as e:
        raise InvalidArrays(str(e), field="body") from None
    return {"leaves": [leaf.to_json() for leaf in leaves]}


class QuotaExceeded(BrokerError):
    """An upload past the account's storage quota: 413 for bytes, 429 for the count."""

    code = "storage_quota_exceeded"

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message, field="body")
        self.status_code = status_code


@dataclass(frozen=True, slots=True)
class Usage:
    """What an account keeps stored: the distinct blobs it uploaded, and its quota."""

    bytes: int
    blobs: int
    quota_bytes: int
    quota_blobs: int


def usage(session: Session, account_id: str) -> Usage:
    settings = get_settings()
    mine = (
        select(BlobUpload.sha256, BlobUpload.size)
        .where(BlobUpload.account_id == account_id)
        .distinct()
        .subquery()
    )
    count, total = session.execute(
        select(func.count(), func.coalesce(func.sum(mine.c.size), 0)).select_from(mine)
    ).one()
    return Usage(int(total), int(count), settings.storage_quota_bytes, settings.storage_quota_blobs)


def check_quota(session: Session, account_id: str, size: int, new: bool = True) -> None:
    """Refuse an upload of ``size`` bytes that would take the account past its quota
    (``new``: bytes it has not uploaded before; the same bytes again cost nothing)."""
    if not new:
        return
    used = usage(session, account_id)
    if used.blobs + 1 > used.quota_blobs:
        raise QuotaExceeded(
            f"your account keeps {used.blobs} uploads, its quota (BROKER_STORAGE_QUOTA_BLOBS "
            f"{used.quota_blobs}): uploads no job uses are deleted after "
            "BROKER_BLOB_GRACE_HOURS; see GET /v1/storage",
            429,
        )
    if used.bytes + size > used.quota_bytes:
        raise QuotaExceeded(
            f"this upload ({size} bytes) would take your account's stored uploads from "
            f"{used.bytes} bytes past its quota of {used.quota_bytes} "
            "(BROKER_STORAGE_QUOTA_BYTES); see GET /v1/storage",
            413,
        )


def record(
    session: Session,
    account: Account,
    upload: Upload,
    kind: BlobKind,
    meta: dict[str, Any],
    node_id: str | None = None,
) -> tuple[Blob, bool]:
    """Store a checked upload and let ``account`` read it; ``node_id``: a node's key sent
    it. Returns ``(blob, created)``, ``created`` meaning new to this account: whether
    anyone else stored the same bytes is never told.

    The account's row is locked while its quota is checked, so its concurrent uploads
    cannot together pass it."""
    session.scalar(select(Account.id).where(Account.id == account.id).with_for_update())
    sha = upload.sha256
    mine = session.scalars(
        select(BlobUpload).where(BlobUpload.sha256 == sha, BlobUpload.account_id == account.id)
    ).all()
    check_quota(session, account.id, upload.size, new=not mine)
    upload.commit()  # only once the quota allows it: a refused upload leaves no file
    if session.get(Blob, sha) is None:
        _insert(session, Blob(sha256=sha, kind=kind, size=upload.size, meta=meta))
    blob = session.get_one(Blob, sha)
    if blob.kind != kind:
        raise InvalidInput(f"these bytes cannot be stored as {kind.value}", field="body")
    same = next((row for row in mine if row.node_id == node_id), None)
    if same is None:
        session.add(
            BlobUpload(
                id=new_id("upl"),
                sha256=sha,
                account_id=account.id,
                node_id=node_id,
                size=upload.size,
                uploaded_at=utcnow(),
            )
        )
    else:
        same.uploaded_at = utcnow()
    grant(session, sha, account.id)
    session.flush()
    return blob, not mine


def uploaded_since(
    session: Session,
    account: Account,
    node_id: str | None,
    sha256: str,
    kind: BlobKind,
    since: datetime,
) -> Blob:
    """A blob that ``account`` uploaded at or after ``since``: with ``node_id``, through
    that node's key; without, through one of its own keys. NotFound otherwise."""
    uploaded = session.scalar(
        select(BlobUpload.id).where(
            BlobUpload.sha256 == sha256,
            BlobUpload.account_id == account.id,
            BlobUpload.node_id.is_(None) if node_id is None else BlobUpload.node_id == node_id,
            BlobUpload.uploaded_at >= since,
        )
    )
    blob = session.get(Blob, sha256)
    if uploaded is None or blob is None or blob.kind != kind:
        raise NotFound(f"no {kind.value} {sha256!r} uploaded since {since:%Y-%m-%d %H:%M:%S}")
    return blob


def grant(session: Session, sha256: str, account_id: str) -> None:
    if session.get(BlobGrant, (sha256, account_id)) is None:
        _insert(session, BlobGrant(sha256=sha256, account_id=account_id))


def _insert(session: Session, row: Blob | BlobGrant) -> bool:
    """Insert a row that a concurrent request may insert first (the same bytes uploaded
    twice at once): True if this one did, False if the other won."""
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return False
    return True


def get_blob(
    session: Session, viewer: Account, sha256: str, kind: BlobKind, *, node_id: str | None = None
) -> Blob:
    """A blob the viewer may read: one it uploaded or was given (a result of its job),
    or one a job it runs needs (as the provider holding the job's active allocation).
    With ``node_id`` (a node key), only what the jobs active on that node need.
    Others answer 404, as if they did not exist."""
    blob = session.get(Blob, sha256)
    if blob is None or blob.kind != kind or not _may_read(session, viewer, sha256, node_id):
        raise NotFound(f"no {kind.value} {sha256!r} of yours")
    return blob


def _may_read(session: Session, viewer: Account, sha256: str, node_id: str | None) -> bool:
    if sees_all(viewer) and node_id is None:
        return True
    running = (
        exists()
        .where(
            Allocation.job_id == Job.id,
            Allocation.offer_id == Offer.id,
            Allocation.status == AllocationStatus.active,
            Offer.provider_id == viewer.id,
        )
        .where(
            or_(
                Job.artifact_sha256 == sha256,
                Job.inputs_sha256 == sha256,
                Job.checkpoint_sha256 == sha256,
            )
        )
    )
    if node_id is not None:
        # A node key: grants are the provider's, shared by all its nodes; a node
        # reads only what its own work needs.
        return bool(session.scalar(select(running.where(Offer.node_id == node_id))))
    granted = exists().where(BlobGrant.sha256 == sha256, BlobGrant.account_id == viewer.id)
    return bool(session.scalar(select(or_(granted, running))))


def load_artifact(store: BlobStore, sha256: str) -> Artifact:
    """A stored artifact, deserialized once per process (artifacts never change)."""
    return _load_artifact(store, sha256)  # type: ignore[arg-type]


@lru_cache(maxsize=32)
def _load_artifact(store: Hashable, sha256: str) -> Artifact:
    from broker.portable.artifact import Artifact

    return Artifact.from_bytes(cast("BlobStore", store).read(sha256))


def leaf_specs(blob: Blob) -> list[arrays.LeafSpec]:
    """The leaves of a stored bundle, from what its upload check recorded."""
    return [
        arrays.LeafSpec(dtype=leaf["dtype"], shape=tuple(leaf["shape"]), offset=0, nbytes=0)
        for leaf in blob.meta["leaves"]
    ]


def collect_garbage(
    transactions: Transactions, store: BlobStore, grace: timedelta, now: datetime | None = None
) -> list[str]:
    """Delete blobs no job refers to (as its program, inputs, checkpoint or result) that
    nobody uploaded within ``grace``; returns their digests.

    The rows go in one transaction; each file is first moved aside, in the same
    transaction, and deleted once it committed (put back if it did not). An upload of
    the same bytes meanwhile stores its file again after its own row committed
    (``broker.blobs.router``), so a row never outlives its file."""
    cutoff = (now or utcnow()) - grace
    referenced = exists().where(
        or_(
            Job.artifact_sha256 == Blob.sha256,
            Job.inputs_sha256 == Blob.sha256,
            Job.checkpoint_sha256 == Blob.sha256,
            Job.result_sha256 == Blob.sha256,
        )
    )
    recent = exists().where(BlobUpload.sha256 == Blob.sha256, BlobUpload.uploaded_at >= cutoff)
    hidden: list[tuple[str, Any]] = []
    try:
        with transactions() as session:
            doomed = list(
                session.scalars(
                    select(Blob.sha256)
                    .where(Blob.created_at < cutoff, ~referenced, ~recent)
                    .order_by(Blob.sha256)
                    .limit(1000)
                    .with_for_update()
                )
            )
            if doomed:
                session.execute(delete(BlobGrant).where(BlobGrant.sha256.in_(doomed)))
                session.execute(delete(BlobUpload).where(BlobUpload.sha256.in_(doomed)))
                session.execute(delete(Blob).where(Blob.sha256.in_(doomed)))
            for sha in doomed:
                hidden.append((sha, store.hide(sha)))
    except BaseException:
        for _, token in hidden:
            store.unhide(token)
        raise
    for _, token in hidden:
        store.purge(token)
    return [sha for sha, _ in hidden]
