"""Content-addressed file storage for artifacts and array bundles.

Everything stored is named by the SHA-256 of its bytes, so a blob never
changes once written, uploads of the same bytes are free, and a reader can
check what it got. ``BlobStore`` is the whole interface; ``LocalBlobStore``
keeps blobs under the data directory (one machine), ``broker.blobs.s3`` in an
S3-compatible bucket (every replica).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024


class Upload(Protocol):
    """Bytes on their way into the store: hashed as they are written."""

    size: int

    def write(self, chunk: bytes) -> None: ...

    @property
    def sha256(self) -> str: ...

    def read(self) -> bytes:
        """Everything written so far (for checks that need the whole blob)."""
        ...

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes written."""
        ...

    def commit(self) -> str:
        """Store the bytes under their SHA-256 and return it; idempotent."""
        ...

    def discard(self) -> None: ...


class BlobStore(Protocol):
    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def read(self, sha256: str) -> bytes: ...

    def chunks(self, sha256: str) -> Iterator[bytes]: ...

    def upload(self) -> Upload: ...

    def put(self, data: bytes) -> str: ...

    def hide(self, sha256: str) -> Any:
        """Move a blob out of reach (it no longer exists); ``unhide`` or ``purge`` it."""
        ...

    def unhide(self, token: Any) -> None: ...

    def purge(self, token: Any) -> None: ...


class LocalBlobStore:
    """Blobs as files ``ROOT/ab/cd/abcd...`` written atomically (temp file, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _DIGEST.match(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def chunks(self, sha256: str) -> Iterator[bytes]:
        with self.path(sha256).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def upload(self) -> LocalUpload:
        return LocalUpload(self)

    def hide(self, sha256: str) -> tuple[Path, Path] | None:
        path = self.path(sha256)
        aside = self.root / "tmp" / f"gc-{sha256}-{secrets.token_hex(4)}"
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return None
        return path, aside

    def unhide(self, token: tuple[Path, Path] | None) -> None:
        if token is not None and not token[0].exists():
            os.replace(token[1], token[0])

    def purge(self, token: tuple[Path, Path] | None) -> None:
        if token is not None:
            token[1].unlink(missing_ok=True)

    def put(self, data: bytes) -> str:
        upload = self.upload()
        try:
            upload.write(data)
            return upload.commit()
        finally:
            upload.discard()


class LocalUpload:
    def __init__(self, store: LocalBlobStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.root / "tmp", prefix="upload-")
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
        """Store the bytes under their digest (a hard link to the upload's file, which
        stays until ``discard``: committing again restores a blob deleted meanwhile)."""
        sha = self.sha256
        target = self._store.path(sha)
        if not target.exists():
            self._file.flush()
            os.fsync(self._file.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # the same bytes, stored at once
                os.link(self._path, target)
        return sha

    def discard(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)
