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

from broker.accounts.models import Account, Role
from broker.auth import Caller, CallerDep, StreamingAccount, StreamingCaller, check_role
from broker.blobs import service
from broker.blobs.models import Blob, BlobKind
from broker.blobs.store import Upload
from broker.db import SessionDep, Transactions, TransactionsDep
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
                return service.record(session, account, upload, kind, meta)

        return await run_in_threadpool(record)
    finally:
        upload.discard()


@router.post(
    "/artifacts",
    status_code=201,
    summary="Upload an artifact (a packaged JAX program)",
    description="The body is the artifact file that `broker.sdk.package()` builds. The "
    "broker checks that it deserializes with jax.export, that its manifest tells the "
    "truth, and that it calls no native code outside the allow-list. Uploading the same "
    "bytes again answers 200 with the stored artifact. Size limit: "
    "BROKER_MAX_ARTIFACT_BYTES.",
    openapi_extra=_BINARY_BODY,
    responses={200: {"model": ArtifactOut, "description": "These bytes were stored before"}},
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
    "Uploading the same bytes again answers 200. Size limit: BROKER_MAX_ARRAYS_BYTES.",
    openapi_extra=_BINARY_BODY,
    responses={200: {"model": ArraysOut, "description": "These bytes were stored before"}},
)
async def upload_arrays(
    request: Request,
    response: Response,
    transactions: TransactionsDep,
    caller: StreamingCaller,
) -> ArraysOut:
    # Node keys may upload too: their checkpoints and results (granted to the provider).
    blob, created = await _receive(
        request, transactions, caller.account, BlobKind.arrays, service.check_arrays
    )
    response.status_code = 201 if created else 200
    return arrays_out(blob)


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
