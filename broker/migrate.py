"""Alembic, driven from code: the migrations live in the ``migrations`` package."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config

from broker.config import get_settings


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    # Percent signs in passwords would otherwise be read as interpolation.
    db_url = url or get_settings().effective_database_url
    config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return config


def upgrade(revision: str = "head", url: str | None = None) -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(revision: str, url: str | None = None) -> None:
    command.downgrade(alembic_config(url), revision)
