"""Uploading artifacts and arrays, and who may read them."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session

from broker.models.account import Role
from broker.portable import arrays
from broker.portable.artifact import package
from tests.broker.portable.programs import mlp, mlp_args
from tests.conftest import ClientFactory, signed_in

BIN = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def artifact_bytes() -> bytes:
    return package(mlp, *mlp_args()).to_bytes()


@pytest.fixture
def developer(db: Session, client_for: ClientFactory) -> Any:
    return signed_in(db, client_for, Role.developer)


def test_upload_an_artifact_once_and_read_it_back(developer: Any, artifact_bytes: bytes) -> None:
    sha = hashlib.sha256(artifact_bytes).hexdigest()
    first = developer.post("/v1/artifacts", content=artifact_bytes, headers=BIN)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["sha256"] == sha
    assert body["size"] == len(artifact_bytes)
    assert body["manifest"]["platforms"] == ["cpu", "cuda", "rocm", "tpu"]
    again = developer.post("/v1/artifacts", content=artifact_bytes, headers=BIN)
    assert again.status_code == 200
    assert again.json()["sha256"] == sha

    assert developer.get(f"/v1/artifacts/{sha}").json()["manifest"] == body["manifest"]
    content = developer.get(f"/v1/artifacts/{sha}/content")
    assert content.status_code == 200
    assert content.content == artifact_bytes
    assert content.headers["etag"] == f'"{sha}"'


def test_bad_artifacts_get_a_clear_422(developer: Any, artifact_bytes: bytes) -> None:
    response = developer.post("/v1/artifacts", content=b"hello", headers=BIN)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_artifact"
    assert "bad magic" in response.json()["error"]["message"]
    tampered = bytearray(artifact_bytes)
    tampered[-3] ^= 1
    response = developer.post("/v1/artifacts", content=bytes(tampered), headers=BIN)
    assert response.status_code == 422
    assert "program_sha256" in response.text


def test_arrays_upload_and_download(developer: Any) -> None:
    leaves = [np.arange(6, dtype=np.float32).reshape(2, 3), np.int32(7)]
    data = arrays.encode(leaves)
    response = developer.post("/v1/arrays", content=data, headers=BIN)
    assert response.status_code == 201, response.text
    assert response.json()["leaves"] == [
        {"shape": [2, 3], "dtype": "float32"},
        {"shape": [], "dtype": "int32"},
    ]
    sha = response.json()["sha256"]
    got = arrays.decode(developer.get(f"/v1/arrays/{sha}/content").content)
    np.testing.assert_array_equal(got[0], leaves[0])
    bad = developer.post("/v1/arrays", content=data[:-8], headers=BIN)
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_arrays"


def test_others_cannot_see_my_uploads(
    db: Session, client_for: ClientFactory, developer: Any, artifact_bytes: bytes
) -> None:
    sha = developer.post("/v1/artifacts", content=artifact_bytes, headers=BIN).json()["sha256"]
    other = signed_in(db, client_for, Role.developer)
    for path in (f"/v1/artifacts/{sha}", f"/v1/artifacts/{sha}/content"):
        assert other.get(path).status_code == 404
    assert client_for(None).get(f"/v1/artifacts/{sha}").status_code == 401
    admin = signed_in(db, client_for, Role.admin)
    assert admin.get(f"/v1/artifacts/{sha}").status_code == 200
    # Uploading the same bytes makes them the other developer's too; the answer is the
    # one any first upload gets (201), never telling that someone stored them before.
    assert other.post("/v1/artifacts", content=artifact_bytes, headers=BIN).status_code == 201
    assert other.get(f"/v1/artifacts/{sha}").status_code == 200


def test_providers_do_not_upload_artifacts(
    db: Session, client_for: ClientFactory, artifact_bytes: bytes
) -> None:
    provider = signed_in(db, client_for, Role.provider)
    response = provider.post("/v1/artifacts", content=artifact_bytes, headers=BIN)
    assert response.status_code == 403


def test_uploads_over_the_limit_get_413(developer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.app import create_app
    from broker.config import get_settings

    monkeypatch.setattr(get_settings(), "max_arrays_bytes", 4096)
    app = create_app(auto_clear=False, auto_bill=False)
    from fastapi.testclient import TestClient

    with TestClient(app, headers=developer.headers) as small:
        data = arrays.encode([np.zeros(2048, np.float32)])
        response = small.post("/v1/arrays", content=data, headers=BIN)
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["error"]["message"]


def test_bad_digest_in_the_path_is_a_422(developer: Any) -> None:
    assert developer.get("/v1/artifacts/not-a-digest").status_code == 422


def test_the_same_bytes_uploaded_at_once_are_stored_once(live_url: str, fresh_engine: Any) -> None:
    """Concurrent uploads of one bundle (two runs of a node finishing together) race to
    insert the same row; the loser finds the winner's row instead of failing."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from broker.db import transaction
    from tests.factories import make_account

    with transaction(fresh_engine) as session:
        keys = [make_account(session, Role.developer)[1] for _ in range(2)]
    bundle = arrays.encode([np.arange(1000, dtype=np.float32)])

    def upload(i: int) -> int:
        headers = {**BIN, "Authorization": f"Bearer {keys[i % 2]}"}
        return httpx.post(f"{live_url}/v1/arrays", content=bundle, headers=headers).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(upload, range(16)))
    assert set(codes) <= {200, 201}
    assert codes.count(201) == 2  # once for each account: new to it
