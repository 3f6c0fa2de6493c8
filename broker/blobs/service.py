"""Uploads and reads of artifacts and array bundles. Functions take the session and never
commit; checks that need no database (JAX deserialization) run before a session opens."""

from __future__ import annotations

from collections.abc import Hashable
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import exists, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.accounts.models import Account, Role
from broker.blobs.models import Blob, BlobGrant, BlobKind
from broker.blobs.store import BlobStore, LocalBlobStore, Upload
from broker.config import get_settings
from broker.errors import InvalidInput, NotFound
from broker.jobs.models import Job
from broker.market.models import Allocation, AllocationStatus
from broker.offers.models import Offer
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
    return LocalBlobStore(get_settings().blob_dir)


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


def record(
    session: Session, account: Account, upload: Upload, kind: BlobKind, meta: dict[str, Any]
) -> tuple[Blob, bool]:
    """Store a checked upload and let ``account`` read it. Returns ``(blob, created)``:
    the same bytes uploaded again are not stored twice."""
    sha = upload.commit()
    created = session.get(Blob, sha) is None and _insert(
        session, Blob(sha256=sha, kind=kind, size=upload.size, meta=meta)
    )
    blob = session.get_one(Blob, sha)
    if blob.kind != kind:
        raise InvalidInput(f"these bytes were uploaded before as {blob.kind.value}", field="body")
    grant(session, sha, account.id)
    session.flush()
    return blob, created


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
    if viewer.role == Role.admin and node_id is None:
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
