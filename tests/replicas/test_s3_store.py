"""The blob store's contract, on the local directory and on S3 (moto's server, over
HTTP on 127.0.0.1, through boto3): what one backend does, the other does."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from broker.blobs.s3 import S3BlobStore
from broker.blobs.store import BlobStore, LocalBlobStore


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    bucket = request.getfixturevalue("s3_env")
    server = request.getfixturevalue("s3_server")
    yield S3BlobStore.from_settings(bucket, "blobs/", server, "us-east-1")


def test_bytes_are_stored_under_their_digest(store: BlobStore) -> None:
    data = b"x" * (3 * 1024 * 1024 + 17)  # more than one chunk
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.exists(sha)
    assert store.size(sha) == len(data)
    assert store.read(sha) == data
    assert b"".join(store.chunks(sha)) == data
    assert store.put(data) == sha  # the same bytes again: nothing changes
    assert not store.exists("0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        store.exists("../../etc/passwd")


def test_an_upload_is_stored_only_when_committed(store: BlobStore) -> None:
    upload = store.upload()
    upload.write(b"hello ")
    upload.write(b"world")
    assert upload.size == 11
    assert upload.head(5) == b"hello"
    assert upload.read() == b"hello world"
    assert not store.exists(upload.sha256)
    sha = upload.commit()
    assert store.read(sha) == b"hello world"
    # Deleted meanwhile (the garbage collector), committed again: stored again.
    store.purge(store.hide(sha))
    assert not store.exists(sha)
    assert upload.commit() == sha
    assert store.exists(sha)
    upload.discard()
    refused = store.upload()
    refused.write(b"never committed")
    refused.discard()
    assert not store.exists(hashlib.sha256(b"never committed").hexdigest())


def test_a_hidden_blob_can_be_put_back_or_purged(store: BlobStore) -> None:
    sha = store.put(b"keep me")
    token = store.hide(sha)
    assert not store.exists(sha)
    store.unhide(token)
    assert store.read(sha) == b"keep me"
    store.purge(store.hide(sha))
    assert not store.exists(sha)
    assert store.hide(sha) is None  # already gone
    store.unhide(None)
    store.purge(None)


def test_the_garbage_collector_deletes_unused_uploads_from_s3(
    fresh_engine: Engine, s3_env: str, s3_server: str
) -> None:
    from broker.blobs.service import collect_garbage, record
    from broker.db import EngineTransactions, transaction, utcnow
    from broker.models.account import Role
    from broker.models.blob import BlobKind
    from tests.factories import make_account

    store = S3BlobStore.from_settings(s3_env, "gc/", s3_server, "us-east-1")
    upload = store.upload()
    upload.write(b"an unused upload")
    with transaction(fresh_engine) as s:
        account, _ = make_account(s, Role.developer)
        record(s, account, upload, BlobKind.arrays, {"leaves": []})
    sha = upload.commit()
    upload.discard()
    transactions = EngineTransactions(fresh_engine)
    assert collect_garbage(transactions, store, timedelta(hours=1)) == []  # still in grace
    later = utcnow() + timedelta(hours=2)
    assert collect_garbage(transactions, store, timedelta(hours=1), now=later) == [sha]
    assert not store.exists(sha)
    listed = store.client.list_objects_v2(Bucket=s3_env, Prefix="gc/").get("Contents", [])
    assert listed == []  # nothing left in the trash either


def test_the_store_is_chosen_by_settings(
    s3_env: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.blobs.service import get_store
    from broker.config import get_settings

    for name, value in {
        "BROKER_BLOB_STORE": "s3",
        "BROKER_S3_BUCKET": s3_env,
        "BROKER_S3_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    get_store.cache_clear()
    try:
        store = get_store()
        assert isinstance(store, S3BlobStore)
        assert store.read(store.put(b"shared")) == b"shared"
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        get_store.cache_clear()
    assert isinstance(get_store(), LocalBlobStore)
