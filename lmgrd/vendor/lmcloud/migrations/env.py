"""Alembic environment of lmcloud: always run on a connection lmcloud opened (``lmgrd.vendor.lmcloud.db.upgrade``)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through lmcloud db upgrade
    raise RuntimeError("run the migrations with: lmcloud db upgrade --db URL")
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
