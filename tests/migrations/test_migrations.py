from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from broker.db import make_engine
from broker.migrate import alembic_config, downgrade, upgrade
from broker.models import Base

TABLES = {"accounts", "api_keys", "offers", "jobs"}


def test_upgrade_from_empty_to_head_and_back(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        upgrade("head", url=empty_database_url)
        assert set(inspect(engine).get_table_names()) >= TABLES

        downgrade("base", url=empty_database_url)
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) - {"alembic_version"} == set()

        upgrade("head", url=empty_database_url)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_models_and_migrations_agree(empty_database_url: str) -> None:
    """A model change without its migration fails here."""
    upgrade("head", url=empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_one_head_and_every_step_reversible() -> None:
    config = alembic_config("sqlite://")
    script = ScriptDirectory.from_config(config)
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        assert revision.module.downgrade is not None
