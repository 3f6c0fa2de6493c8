"""Upload and download artifacts and array bundles (content-addressed)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from broker.accounts.callers import Caller, check_role
from broker.auth import CallerDep, CurrentAccount, StreamingAccount, StreamingCaller
from broker.blobs import service
from broker.blobs.store import Upload
from broker.config import get_settings
from broker.db import SessionDep, Transactions, TransactionsDep
from broker.errors import ErrorOut
from broker.models.account import Account, Role
from broker.models.blob import Blob, BlobKind
from broker.portable.manifest import Manifest, TensorSpec

router = APIRouter(prefix="/v1", tags=["artifacts"])

Sha256 = Annotated[
    str, Path(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the bytes, lower-case hex")
]
_BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class ArtifactOut(BaseModel):
    sha256: str = Field(description="Content address: give it as a job's `artifact`")
    size: int
    created_at: datetime
    manifest: Manifest


class ArraysOut(BaseModel):
    sha256: str = Field(description="Content address: give it as a job's `inputs`")
    size: int
    created_at: datetime
    leaves: list[TensorSpec]


def artifact_out(blob: Blob) -> ArtifactOut:
    return ArtifactOut(
        sha256=blob.sha256,
        size=blob.size,
        created_at=blob.created_at,
        manifest=Manifest.model_validate(blob.meta),
    )


def arrays_out(blob: Blob) -> ArraysOut:
    return ArraysOut(
        sha256=blob.sha256,
        size=blob.size,
        created_at=blob.created_at,
        leaves=[TensorSpec.model_validate(leaf) for leaf in blob.meta["leaves"]],
    )


async def _receive(
    request: Request,
    transactions: Transactions,
    account: Account,
    kind: BlobKind,
    check: Callable[[Upload], dict[str, Any]],
    node_id: str | None = None,
) -> tuple[Blob, bool]:
    """Stream the body to a temporary file (the size cap is the middleware's), check it
    off the event loop, then record it in a short transaction of its own."""
    upload = service.get_store().upload()
    try:
        async for chunk in request.stream():
            upload.write(chunk)
        meta = await run_in_threadpool(check, upload)

        def record() -> tuple[Blob, bool]:
            with transactions() as session:
                stored = service.record(session, account, upload, kind, meta, node_id)
            # The garbage collector may have deleted these bytes' file between the store
            # and the commit: the row is fresh now, so it will not again.
            upload.commit()
            return stored

        return await run_in_threadpool(record)
    finally:
        upload.discard()


@router.post(
    "/artifacts",
    status_code=201,
    summary="Upload an artifact (a packaged JAX program)",
    description="The body is the artifact file that `broker.sdk.package()` builds. The "
    "broker checks that it deserializes with jax.export, that its manifest tells the "
    "truth, and that it calls no native code outside the allow-list. Uploading bytes "
    "you uploaded before answers 200 with the stored artifact. Size limit: "
    "BROKER_MAX_ARTIFACT_BYTES; uploads count against the account's storage quota "
    "(GET /v1/storage).",
    openapi_extra=_BINARY_BODY,
    responses={
        200: {"model": ArtifactOut, "description": "You uploaded these bytes before"},
        413: {"model": ErrorOut, "description": "Past the account's storage quota in bytes"},
        429: {"model": ErrorOut, "description": "Past the account's quota of uploads"},
    },
)
async def upload_artifact(
    request: Request,
    response: Response,
    transactions: TransactionsDep,
    account: StreamingAccount,
) -> ArtifactOut:
    check_role(account, Role.developer)
    blob, created = await _receive(
        request, transactions, account, BlobKind.artifact, service.check_artifact
    )
    response.status_code = 201 if created else 200
    return artifact_out(blob)


@router.post(
    "/arrays",
    status_code=201,
    summary="Upload an array bundle (inputs, a checkpoint or a result)",
    description="The body is an array bundle as `broker.portable.arrays.encode` writes it. "
    "Uploading bytes you uploaded before answers 200. Size limit: BROKER_MAX_ARRAYS_BYTES; "
    "uploads count against the account's storage quota (GET /v1/storage).",
    openapi_extra=_BINARY_BODY,
    responses={
        200: {"model": ArraysOut, "description": "You uploaded these bytes before"},
        413: {"model": ErrorOut, "description": "Past the account's storage quota in bytes"},
        429: {"model": ErrorOut, "description": "Past the account's quota of uploads"},
    },
)
async def upload_arrays(
    request: Request,
    response: Response,
    transactions: TransactionsDep,
    caller: StreamingCaller,
) -> ArraysOut:
    # Node keys may upload too: their checkpoints and results (granted to the provider,
    # and recorded as the node's: what it may hand back for its allocations).
    blob, created = await _receive(
        request, transactions, caller.account, BlobKind.arrays, service.check_arrays, caller.node_id
    )
    response.status_code = 201 if created else 200
    return arrays_out(blob)


class StorageOut(BaseModel):
    bytes: int = Field(description="Bytes of the distinct uploads the account keeps stored")
    blobs: int = Field(description="Distinct uploads the account keeps stored")
    quota_bytes: int
    quota_blobs: int
    max_artifact_bytes: int = Field(description="The largest artifact one upload may be")
    max_arrays_bytes: int = Field(description="The largest array bundle one upload may be")
    grace_hours: float = Field(
        description="An upload no job refers to is deleted this long after its last upload"
    )


@router.get(
    "/storage",
    response_model=StorageOut,
    summary="My stored uploads and my storage quota",
    description="Artifacts and array bundles the account uploaded (its nodes' uploads "
    "included), each counted once, against its quota.",
)
def storage(session: SessionDep, account: CurrentAccount) -> StorageOut:
    used = service.usage(session, account.id)
    return StorageOut(
        bytes=used.bytes,
        blobs=used.blobs,
        quota_bytes=used.quota_bytes,
        quota_blobs=used.quota_blobs,
        max_artifact_bytes=get_settings().max_artifact_bytes,
        max_arrays_bytes=get_settings().max_arrays_bytes,
        grace_hours=get_settings().blob_grace_hours,
    )


@router.get("/artifacts/{sha256}", summary="An artifact's manifest")
def get_artifact(sha256: Sha256, session: SessionDep, caller: CallerDep) -> ArtifactOut:
    return artifact_out(_readable(session, caller, sha256, BlobKind.artifact))


@router.get("/arrays/{sha256}", summary="An array bundle's leaves (dtype and shape)")
def get_arrays(sha256: Sha256, session: SessionDep, caller: CallerDep) -> ArraysOut:
    return arrays_out(_readable(session, caller, sha256, BlobKind.arrays))


_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The bytes"}
}


@router.get("/artifacts/{sha256}/content", summary="Download an artifact", responses=_CONTENT)
def download_artifact(sha256: Sha256, session: SessionDep, caller: CallerDep) -> StreamingResponse:
    return _download(_readable(session, caller, sha256, BlobKind.artifact))


@router.get("/arrays/{sha256}/content", summary="Download an array bundle", responses=_CONTENT)
def download_arrays(sha256: Sha256, session: SessionDep, caller: CallerDep) -> StreamingResponse:
    return _download(_readable(session, caller, sha256, BlobKind.arrays))


def _readable(session: Session, caller: Caller, sha256: str, kind: BlobKind) -> Blob:
    return service.get_blob(session, caller.account, sha256, kind, node_id=caller.node_id)


def _download(blob: Blob) -> StreamingResponse:
    return StreamingResponse(
        service.get_store().chunks(blob.sha256),
        media_type="application/octet-stream",
        headers={"Content-Length": str(blob.size), "ETag": f'"{blob.sha256}"'},
    )
