"""Storage quotas per account (bytes and count), usage in the API, and the garbage
collector that deletes uploads no job uses once their grace period is over."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from broker.blobs import service
from broker.config import get_settings
from broker.db import EngineTransactions, transaction, utcnow
from broker.models.account import Role
from broker.models.blob import Blob, BlobGrant, BlobUpload
from broker.nodes import service as nodes
from broker.nodes.schemas import NodeRegister
from broker.portable import arrays
from tests.conftest import ClientFactory, signed_in
from tests.factories import make_account, make_job

BIN = {"Content-Type": "application/octet-stream"}
PLACE = {"region": "europe-west4", "country": "NL", "lat": 53.44, "lon": 6.84}


def _bundle(n: int, size: int = 16) -> bytes:
    return arrays.encode([np.full(size, n, np.float32)])


@pytest.fixture
def quota(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    size = len(_bundle(0))
    monkeypatch.setenv("BROKER_STORAGE_QUOTA_BLOBS", "3")
    monkeypatch.setenv("BROKER_STORAGE_QUOTA_BYTES", str(3 * size + size // 2))
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_uploads_past_the_quota_are_refused_and_usage_is_shown(
    db: Session, client_for: ClientFactory, quota: None
) -> None:
    developer = signed_in(db, client_for, Role.developer)
    size = len(_bundle(0))
    for n in range(3):
        assert developer.post("/v1/arrays", content=_bundle(n), headers=BIN).status_code == 201
    used = developer.get("/v1/storage").json()
    assert (used["blobs"], used["bytes"], used["quota_blobs"]) == (3, 3 * size, 3)

    refused = developer.post("/v1/arrays", content=_bundle(3), headers=BIN)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "storage_quota_exceeded"
    assert "GET /v1/storage" in error["message"]
    # The same bytes again cost nothing: a retried upload still works.
    assert developer.post("/v1/arrays", content=_bundle(1), headers=BIN).status_code == 200
    assert developer.get("/v1/storage").json()["blobs"] == 3
    # Nothing of the refused upload was kept.
    digest = hashlib.sha256(_bundle(3)).hexdigest()
    assert db.get(Blob, digest) is None
    assert not service.get_store().exists(digest)

    # Bytes: a second account's one big bundle, then one that would not fit beside it,
    # refused with 413 though the count allows it.
    other = signed_in(db, client_for, Role.developer)
    big = _bundle(9, size=120)
    assert len(big) < 3 * size + size // 2 < len(big) + size
    assert other.post("/v1/arrays", content=big, headers=BIN).status_code == 201
    too_big = other.post("/v1/arrays", content=_bundle(7), headers=BIN)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "storage_quota_exceeded"


def test_node_uploads_count_against_their_provider(
    db: Session, client_for: ClientFactory, quota: None
) -> None:
    provider, key = make_account(db, Role.provider)
    _, node_key, _ = nodes.register(db, provider, NodeRegister(name="box", **PLACE), 3)
    agent = client_for(node_key)
    for n in range(3):
        assert agent.post("/v1/arrays", content=_bundle(n), headers=BIN).status_code == 201
    assert agent.post("/v1/arrays", content=_bundle(5), headers=BIN).status_code == 429
    assert client_for(key).get("/v1/storage").json()["blobs"] == 3


def _stored(engine: Engine, owner_id: str, data: bytes, *, days_ago: float) -> str:
    sha = service.get_store().put(data)
    when = utcnow() - timedelta(days=days_ago)
    with transaction(engine) as session:
        leaves = arrays.read_header(data[: arrays.MAX_HEAD], len(data))
        session.add(
            Blob(
                sha256=sha,
                kind="arrays",
                size=len(data),
                meta={"leaves": [leaf.to_json() for leaf in leaves]},
                created_at=when,
            )
        )
        session.flush()
        session.add(BlobGrant(sha256=sha, account_id=owner_id))
        session.add(
            BlobUpload(
                id=f"upl_{sha[:16]}",
                sha256=sha,
                account_id=owner_id,
                size=len(data),
                uploaded_at=when,
            )
        )
    return sha


def test_the_garbage_collector_deletes_unused_uploads_after_their_grace(
    fresh_engine: Engine,
) -> None:
    with transaction(fresh_engine) as session:
        developer, _ = make_account(session, Role.developer)
    store = service.get_store()
    unused = _stored(fresh_engine, developer.id, _bundle(101), days_ago=3)
    recent = _stored(fresh_engine, developer.id, _bundle(102), days_ago=0.1)
    used = _stored(fresh_engine, developer.id, _bundle(103, size=2), days_ago=3)
    with transaction(fresh_engine) as session:
        job = make_job(session, developer)
        job.inputs_sha256 = used

    gone = service.collect_garbage(EngineTransactions(fresh_engine), store, timedelta(days=1))
    assert gone == [unused]
    assert not store.exists(unused)
    assert store.exists(recent)
    assert store.exists(used)
    with transaction(fresh_engine, write=False) as session:
        assert set(session.scalars(select(Blob.sha256))) == {recent, used}
        assert session.scalars(select(BlobUpload).where(BlobUpload.sha256 == unused)).all() == []
    # Running again deletes nothing more.
    assert service.collect_garbage(EngineTransactions(fresh_engine), store, timedelta(days=1)) == []


def test_a_collection_whose_commit_fails_puts_the_files_back(fresh_engine: Engine) -> None:
    with transaction(fresh_engine) as session:
        developer, _ = make_account(session, Role.developer)
    store = service.get_store()
    unused = _stored(fresh_engine, developer.id, _bundle(111), days_ago=3)

    @contextmanager
    def failing(*, write: bool = True) -> Iterator[Session]:
        with Session(fresh_engine) as session, session.begin():
            yield session
            assert not store.exists(unused)  # moved aside, inside the transaction
            raise RuntimeError("the database went away before COMMIT")

    with pytest.raises(RuntimeError, match="went away"):
        service.collect_garbage(failing, store, timedelta(days=1))
    assert store.exists(unused)
    with transaction(fresh_engine, write=False) as session:
        assert session.get(Blob, unused) is not None


def test_an_upload_racing_the_collector_keeps_its_file(fresh_engine: Engine) -> None:
    """The collector deleted these bytes between the upload's store and its row: the
    upload stores the file again once its row committed."""
    with transaction(fresh_engine) as session:
        developer, _ = make_account(session, Role.developer)
    store = service.get_store()
    data = _bundle(121)
    upload = store.upload()
    try:
        upload.write(data)
        sha = upload.commit()
        store.purge(store.hide(sha))  # the collector, between the two
        assert not store.exists(sha)
        with transaction(fresh_engine) as session:
            meta = service.check_arrays(upload)
            service.record(session, developer, upload, "arrays", meta)  # type: ignore[arg-type]
        upload.commit()  # as the router does after the row committed
        assert store.exists(sha)
        assert store.read(sha) == data
    finally:
        upload.discard()
