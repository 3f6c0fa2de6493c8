"""Brand-new databases for tests that need their own (migrations, live servers)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@contextmanager
def fresh_database(like_url: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a new empty database on the same server (or a new SQLite file)."""
    url = make_url(like_url)
    if url.get_backend_name() == "sqlite":
        yield f"sqlite:///{tmp_path / f'fresh-{secrets.token_hex(4)}.db'}"
        return
    name = f"broker_fresh_{secrets.token_hex(4)}"
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
