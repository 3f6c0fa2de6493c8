"""Fixtures: one database per run, migrated once; every test in a rolled-back transaction.

The database is SQLite in a temporary directory unless BROKER_TEST_DATABASE_URL
names another (scripts/with-postgres.sh sets it to a throwaway PostgreSQL).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from broker.app import create_app
from broker.db import get_session, get_transactions, make_engine
from broker.migrate import alembic_config
from broker.models.account import Role
from tests.databases import fresh_database
from tests.factories import make_account

ClientFactory = Callable[[str | None], TestClient]


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Blobs and the compilation cache go to a temporary data directory, never ``var/``."""
    from broker.blobs.service import get_store
    from broker.config import get_settings

    path = tmp_path_factory.mktemp("data")
    # Tests read the book right after changing the market: no cached copy.
    overrides = {"BROKER_DATA_DIR": str(path), "BROKER_BOOK_CACHE_SECONDS": "0"}
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    # Tests send requests as fast as they can; tests/broker/test_ops.py turns limits on.
    os.environ.setdefault("BROKER_RATE_LIMIT_PER_SECOND", "0")
    # Most tests exercise the market with bids for capacity alone (no program to
    # package); tests/broker/jobs/test_capacity_bids.py checks a default broker refuses them.
    os.environ.setdefault("BROKER_ALLOW_CAPACITY_BIDS", "1")
    # No cost worker process beside each test process (and those it starts) that
    # packages a program; tests/broker/portable/test_costworker.py turns it on.
    os.environ.setdefault("BROKER_PACKAGE_WORKER", "0")
    get_settings.cache_clear()
    get_store.cache_clear()
    yield path
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()
    get_store.cache_clear()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = os.environ.get("BROKER_TEST_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    from alembic import command

    engine = make_engine(database_url)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        config = alembic_config(database_url)
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test.

    Code under test may commit: with ``create_savepoint`` its commits release
    savepoints, and the outer transaction still undoes everything.
    """
    with engine.connect() as connection:
        transaction = connection.begin()
        session = Session(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()


@pytest.fixture
def client_for(db: Session) -> Iterator[ClientFactory]:
    """``client_for(api_key)``: an HTTP client for the app, bound to the test transaction."""
    app = create_app(auto_clear=False, auto_bill=False)

    def session_override() -> Iterator[Session]:
        # Like the real dependency: all or nothing per request, here as a savepoint.
        with db.begin_nested():
            yield db

    @contextmanager
    def nested(*, write: bool = True) -> Iterator[Session]:
        with db.begin_nested():
            yield db

    app.dependency_overrides[get_session] = session_override
    app.dependency_overrides[get_transactions] = lambda: nested
    yield from _clients(app)


def _clients(app: FastAPI) -> Iterator[ClientFactory]:
    """Yield a factory of clients for ``app`` (one per API key); close them after."""
    clients: list[TestClient] = []

    def make(key: str | None = None) -> TestClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = TestClient(app, headers=headers, raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def empty_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A brand-new empty database of the same kind as the test database."""
    with fresh_database(database_url, tmp_path) as url:
        yield url


@pytest.fixture
def fresh_engine(empty_database_url: str) -> Iterator[Engine]:
    """An engine on a new, migrated database whose transactions really commit.

    For code that runs its own transactions (clearing rounds), which the
    rolled-back ``db`` session cannot host.
    """
    from broker.migrate import upgrade

    upgrade("head", url=empty_database_url)
    engine = make_engine(empty_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def fresh_client_for(fresh_engine: Engine) -> Iterator[ClientFactory]:
    """``client_for`` against ``fresh_engine``: every request commits."""
    from broker.db import request_engine

    app = create_app(auto_clear=False, auto_bill=False)
    app.dependency_overrides[request_engine] = lambda: fresh_engine
    yield from _clients(app)


class LiveServer:
    """The app served by uvicorn on 127.0.0.1 in a thread of the test process."""

    def __init__(self, app: FastAPI, **options: Any) -> None:
        import uvicorn

        options = {"log_level": "warning", "lifespan": "on", **options}
        config = uvicorn.Config(app, host="127.0.0.1", port=0, **options)
        self.server = uvicorn.Server(config)

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_url(fresh_engine: Engine) -> Iterator[str]:
    """URL of the app served for real (in this process) on ``fresh_engine``."""
    from broker.db import request_engine

    app = create_app(auto_clear=False, auto_bill=False)
    app.dependency_overrides[request_engine] = lambda: fresh_engine
    with LiveServer(app) as url:
        yield url


def signed_in(db: Session, client_for: ClientFactory, role: Role) -> Any:
    """A client with a new account's key; the account is at ``client.account``."""
    account, key = make_account(db, role)
    client: Any = client_for(key)
    client.account = account
    return client
