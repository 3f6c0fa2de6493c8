"""Revoking a key or disabling an account takes effect at once in every server process:
two `broker serve` processes on one database, the key revoked through one and refused
by the other on its next request, its dashboard session there ended too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_live_server import Server

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def two_servers(empty_database_url: str, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        server = Server(empty_database_url, tmp_path / name)
        server.env["BROKER_RATE_LIMIT_PER_SECOND"] = "100"  # limits on, as served
        servers.append(server)
    servers[0].start()  # migrates the database first
    servers[1].start()
    yield servers[0], servers[1]
    for server in servers:
        server.stop()


def _sign_in(client: httpx.Client, key: str) -> None:
    page = client.get("/signin")
    token = _CSRF.search(page.text)
    assert token
    answer = client.post("/signin", data={"api_key": key, "csrf_token": token.group(1)})
    assert answer.status_code == 303, answer.text


def test_a_revoked_key_and_a_disabled_account_are_refused_by_every_process(
    two_servers: tuple[Server, Server],
) -> None:
    a, b = two_servers
    admin_key = a.cli("accounts", "create", "ops", "--role", "admin").strip().splitlines()[-1]
    leaked = a.cli("accounts", "create", "alice", "--role", "developer").strip().splitlines()[-1]
    bearer = {"Authorization": f"Bearer {leaked}"}
    with (
        httpx.Client(base_url=a.base, timeout=30) as on_a,
        httpx.Client(base_url=b.base, timeout=30) as on_b,
        httpx.Client(base_url=b.base, timeout=30) as browser_b,
    ):
        # The leaked key works on both, and signs in to b's dashboard.
        assert on_b.get("/v1/me", headers=bearer).status_code == 200
        _sign_in(browser_b, leaked)
        assert browser_b.get("/jobs").status_code == 200
        # Alice replaces it through a: a new key, the leaked one revoked.
        (row,) = on_a.get("/v1/keys", headers=bearer).json()
        rotated = on_a.post(f"/v1/keys/{row['id']}/rotate", headers=bearer)
        assert rotated.status_code == 201, rotated.text
        fresh = {"Authorization": f"Bearer {rotated.json()['api_key']}"}
        # b refuses the leaked key from its next request on, in whichever worker.
        for _ in range(6):
            refused = on_b.get("/v1/me", headers=bearer)
            assert refused.status_code == 401
            assert "revoked" in refused.json()["error"]["message"]
            assert on_b.post("/v1/jobs", headers=bearer, json={}).status_code == 401
        ended = browser_b.get("/jobs")
        assert ended.status_code == 303
        assert ended.headers["location"].startswith("/signin")
        assert on_b.get("/v1/me", headers=fresh).status_code == 200
        keys = {k["id"]: k for k in on_b.get("/v1/keys", headers=fresh).json()}
        assert keys[row["id"]]["revoked_at"] is not None
        assert keys[rotated.json()["id"]]["last_used_at"] is not None

        # An admin disables alice through a: every key of hers is refused by b.
        alice = on_b.get("/v1/me", headers=fresh).json()["id"]
        admin = {"Authorization": f"Bearer {admin_key}"}
        disabled = on_a.post(f"/v1/accounts/{alice}/disable", headers=admin)
        assert disabled.status_code == 200
        assert disabled.json()["disabled_at"] is not None
        for _ in range(6):
            assert on_b.get("/v1/me", headers=fresh).status_code == 401
        assert on_a.post(f"/v1/accounts/{alice}/enable", headers=admin).status_code == 200
        assert on_b.get("/v1/me", headers=fresh).status_code == 200
