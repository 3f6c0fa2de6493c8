from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy.orm import Session

from broker.accounts.service import authenticate
from broker.db import make_engine
from broker.models.account import Role


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
    listed = broker("accounts", "list", url=empty_database_url)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[4]) for r in rows] == [("acme labs", "provider", "enabled")]


def test_invoices_generate_bills_ended_runs_once(empty_database_url: str) -> None:
    from datetime import UTC, datetime

    from broker.db import transaction
    from broker.models.billing import Invoice
    from tests.factories import make_account, make_job, make_offer, make_run

    assert broker("db", "upgrade", url=empty_database_url).returncode == 0
    engine = make_engine(empty_database_url)
    try:
        with transaction(engine) as db:
            developer, _ = make_account(db, Role.developer)
            provider, _ = make_account(db, Role.provider)
            offer = make_offer(db, provider, price_per_hour="3.00")
            ended = datetime(2026, 3, 2, tzinfo=UTC)
            make_run(db, make_job(db, developer), offer, 1_200_000, ended_at=ended)
        first = broker("invoices", "generate", url=empty_database_url)
        assert first.returncode == 0, first.stderr
        lines = first.stdout.strip().splitlines()
        assert lines[0] == "1 invoice(s) created"
        with Session(engine) as session:
            invoice = session.get(Invoice, lines[1])
            assert invoice is not None
            assert (invoice.account_id, invoice.total_cents) == (developer.id, 100)
        again = broker("invoices", "generate", url=empty_database_url)
        assert again.stdout.strip() == "0 invoice(s) created"
    finally:
        engine.dispose()
