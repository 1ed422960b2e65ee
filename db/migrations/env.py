"""Alembic's entry point for the lab's schema. It runs on the connection that db.schema hands it
(config.attributes["connection"], already inside the migration transaction), so no alembic.ini and
no second engine are needed; db.schema.migrate and `python -m db upgrade` are the ways in."""

from alembic import context

from db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `python -m db upgrade --db URL` (db.schema), not the alembic CLI")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters a table by copying it: batch mode does that for every ALTER a migration asks for
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
