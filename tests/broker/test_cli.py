from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy.orm import Session

from broker.accounts.models import Role
from broker.accounts.service import authenticate
from broker.db import make_engine


def broker(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BROKER_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_accounts_create_prints_the_key_last(empty_database_url: str) -> None:
    assert broker("db", "upgrade", url=empty_database_url).returncode == 0
    created = broker(
        "accounts", "create", "acme labs", "--role", "provider", url=empty_database_url
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("bk_")

    engine = make_engine(empty_database_url)
    try:
        with Session(engine) as session:
            account = authenticate(session, key)
            assert account is not None
            assert (account.name, account.role) == ("acme labs", Role.provider)
    finally:
        engine.dispose()

    again = broker("accounts", "create", "acme labs", "--role", "developer", url=empty_database_url)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    bad_role = broker("accounts", "create", "x", "--role", "king", url=empty_database_url)
    assert bad_role.returncode == 2
