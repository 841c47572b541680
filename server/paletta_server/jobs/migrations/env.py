"""Alembic environment: runs on the connection JobStore hands it (no alembic.ini, no URL of its own)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
# SQLite alters tables by copying them ("batch" mode); PostgreSQL alters them in place.
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
