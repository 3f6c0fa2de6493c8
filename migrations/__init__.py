"""Alembic migrations: the only way the schema changes. Apply with `broker db upgrade`."""
