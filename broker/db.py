"""Engine, sessions and the declarative base.

Services take a ``Session`` and never commit; whoever opened the session (the
request dependency, a CLI command, a background task) owns the transaction.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, cast
from weakref import WeakKeyDictionary

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.types import TypeDecorator

from broker.config import get_settings

# Stable constraint names, so migrations can name what they drop.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use broker.db.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A public id such as ``job_5kq3...``: the prefix says what it names."""
    return f"{prefix}_{secrets.token_hex(8)}"


def make_engine(url: str) -> Engine:
    """An engine with the per-backend settings the broker relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # Connections kept open: enough for the requests a busy worker has in its
        # threads at once (a connection opened past the pool is closed after one
        # request, and a new PostgreSQL connection costs a process and milliseconds).
        return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=10)

    if parsed.database and parsed.database != ":memory:":
        from pathlib import Path

        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, issue BEGIN, so SAVEPOINTs work.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE): a deferred
        # transaction that reads and then writes cannot wait for a busy lock and
        # fails with "database is locked" instead.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@cache
def get_engine() -> Engine:
    return make_engine(get_settings().effective_database_url)


@cache
def _writer(engine: Engine) -> Engine:
    """The engine as writers use it: on SQLite, transactions begin IMMEDIATE."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error.

    ``write=False`` marks a transaction that only reads, which SQLite can run
    beside a writer.
    """
    bind = _writer(engine) if write else engine
    with Session(bind=bind, expire_on_commit=False) as session, session.begin():
        yield session


def session_scope(*, write: bool = True) -> AbstractContextManager[Session]:
    """A transaction on the configured database."""
    return transaction(get_engine(), write=write)


_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def read_only_session(request: Request) -> None:
    """Route dependency: the request's session only reads, though the method writes.

    For endpoints that do their writing in transactions of their own (a clearing
    round): on SQLite a request holding the write lock would block them.
    """
    request.state.read_only_session = True


async def request_engine() -> Engine:
    """Request dependency: the configured engine (tests override it).

    async, like every dependency that does no I/O: FastAPI sends a sync one to a
    worker thread and back, which costs more than the call."""
    return get_engine()


async def get_session(
    request: Request, engine: Annotated[Engine, Depends(request_engine)]
) -> AsyncIterator[Session]:
    """Request dependency: one transaction per request, committed if the handler succeeds.

    Opening the session does no I/O (it connects on its first query), so it runs on
    the event loop; only the commit or rollback goes to a worker thread. A sync
    dependency would cost a thread hop each way.
    """
    write = request.method not in _READ_METHODS and not getattr(
        request.state, "read_only_session", False
    )
    async with _sqlite_writer_turn(engine, write):
        scope = transaction(engine, write=write)
        session = scope.__enter__()
        # As FastAPI does for sync generator dependencies: the exit is shielded from
        # cancellation and takes no token of the shared thread pool, so a pool full of
        # requests waiting for a database connection cannot keep one from being returned.
        exit_limiter = anyio.CapacityLimiter(1)
        try:
            yield session
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    scope.__exit__, type(exc), exc, exc.__traceback__, limiter=exit_limiter
                )
            raise
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(scope.__exit__, None, None, None, limiter=exit_limiter)


_sqlite_writers: WeakKeyDictionary[
    Engine, WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.Semaphore]
] = WeakKeyDictionary()


@asynccontextmanager
async def _sqlite_writer_turn(engine: Engine, write: bool) -> AsyncIterator[None]:
    """On SQLite, one writing request at a time per process waits for the database.

    SQLite has one writer. A writing request takes its lock with its first query
    (in the key check) and needs a worker thread again for its handler; were the
    thread pool full of requests blocked on that lock, it would get none until
    they timed out. So writers queue here, on the event loop, holding no thread.
    """
    if not write or engine.dialect.name != "sqlite":
        yield
        return
    turns = _sqlite_writers.setdefault(engine, WeakKeyDictionary())
    loop = asyncio.get_running_loop()  # one per event loop (test clients run several)
    if loop not in turns:
        turns[loop] = anyio.Semaphore(1)
    async with turns[loop]:
        yield


Transactions = Callable[..., AbstractContextManager[Session]]


@dataclass(frozen=True)
class EngineTransactions:
    """``transactions(write=...)``: a new transaction on ``engine``. Equal for equal
    engines, so work for one database can be batched (``broker.coalesce``)."""

    engine: Engine

    def __call__(self, *, write: bool = True) -> AbstractContextManager[Session]:
        return transaction(self.engine, write=write)


async def get_transactions(engine: Annotated[Engine, Depends(request_engine)]) -> Transactions:
    """Request dependency for handlers that run short transactions of their own (uploads
    that stream first, long polls, batched work) instead of holding one for the whole
    request: ``with transactions(write=False) as session: ...``."""
    return EngineTransactions(engine)


TransactionsDep = Annotated[Transactions, Depends(get_transactions)]


async def request_transactions(request: Request) -> Transactions:
    """What ``TransactionsDep`` gives, for a handler that reads its request itself
    (without FastAPI's dependency solving), with the app's overrides of
    ``get_transactions`` or ``request_engine`` (tests; they take no parameters)."""
    overrides = request.app.dependency_overrides
    if get_transactions in overrides:
        return cast(Transactions, await _maybe_await(overrides[get_transactions]()))
    engine = await _maybe_await(overrides.get(request_engine, request_engine)())
    return EngineTransactions(engine)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# scope="function": the transaction commits when the handler returns, before the
# response is sent, so a failed commit is reported to the client, not hidden.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
EngineDep = Annotated[Engine, Depends(request_engine)]
