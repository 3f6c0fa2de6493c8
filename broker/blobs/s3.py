"""Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph, R2...): every replica
reads and writes the same bucket.

The layout is the local store's (``PREFIX/ab/cd/abcd...``), so a directory synced
to a bucket is a valid store. An upload streams to a local temporary file (hashed
as it is written, checked there) and is stored under its digest only when it is
committed; storing the same bytes twice writes the same object twice, harmlessly.
Hiding a blob (the garbage collector's first step) copies it under ``PREFIX/trash/``
and deletes it, so it can be put back until the collector's transaction commits.

Credentials come from boto3's usual chain (AWS_* variables, a profile, the
instance's or pod's role); ``BROKER_S3_ENDPOINT_URL`` points at a non-AWS server.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from broker.blobs.store import _DIGEST, CHUNK


class S3BlobStore:
    """The ``BlobStore`` interface on bucket ``bucket`` under ``prefix``."""

    def __init__(self, client: Any, bucket: str, prefix: str = "blobs/") -> None:
        if not bucket:
            raise ValueError("BROKER_S3_BUCKET is required with BROKER_BLOB_STORE=s3")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    @classmethod
    def from_settings(
        cls, bucket: str, prefix: str, endpoint_url: str | None, region: str | None
    ) -> S3BlobStore:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            # Virtual-host addressing needs DNS for each bucket; a local server has none.
            config=Config(
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
            ),
        )
        return cls(client, bucket, prefix)

    def key(self, sha256: str) -> str:
        if not _DIGEST.match(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return f"{self.prefix}{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head

    def exists(self, sha256: str) -> bool:
        return self._head(self.key(sha256)) is not None

    def size(self, sha256: str) -> int:
        head = self._head(self.key(sha256))
        if head is None:
            raise FileNotFoundError(sha256)
        return int(head["ContentLength"])

    def _body(self, sha256: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(sha256) from exc

    def read(self, sha256: str) -> bytes:
        data: bytes = self._body(sha256).read()
        return data

    def chunks(self, sha256: str) -> Iterator[bytes]:
        body = self._body(sha256)
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def upload(self) -> S3Upload:
        return S3Upload(self)

    def put(self, data: bytes) -> str:
        upload = self.upload()
        try:
            upload.write(data)
            return upload.commit()
        finally:
            upload.discard()

    def hide(self, sha256: str) -> tuple[str, str] | None:
        key = self.key(sha256)
        aside = f"{self.prefix}trash/{sha256}-{secrets.token_hex(4)}"
        try:
            self.client.copy_object(
                Bucket=self.bucket, Key=aside, CopySource={"Bucket": self.bucket, "Key": key}
            )
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return key, aside

    def unhide(self, token: tuple[str, str] | None) -> None:
        if token is None:
            return
        key, aside = token
        if self._head(key) is None:
            self.client.copy_object(
                Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": aside}
            )
        self.client.delete_object(Bucket=self.bucket, Key=aside)

    def purge(self, token: tuple[str, str] | None) -> None:
        if token is not None:
            self.client.delete_object(Bucket=self.bucket, Key=token[1])


class S3Upload:
    """Bytes on their way into the bucket: a local temporary file until ``commit``."""

    def __init__(self, store: S3BlobStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(prefix="broker-upload-")
        self._file: BinaryIO = os.fdopen(fd, "w+b")
        self._path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def read(self) -> bytes:
        self._file.flush()
        return self._path.read_bytes()

    def head(self, n: int) -> bytes:
        self._file.flush()
        with self._path.open("rb") as f:
            return f.read(n)

    def commit(self) -> str:
        """Store the bytes under their digest unless the bucket has them; committing
        again (before ``discard``) restores a blob deleted meanwhile."""
        sha = self.sha256
        key = self._store.key(sha)
        if self._store._head(key) is None:
            self._file.flush()
            # From the path: boto3 closes a file object it is given, and the upload's
            # file must stay open until ``discard`` (a second commit reads it again).
            self._store.client.upload_file(str(self._path), self._store.bucket, key)
        return sha

    def discard(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)
