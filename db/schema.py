"""Keeping a database at this code's schema, with Alembic (revisions in db/migrations/versions).

Opening a Store runs `migrate`; `python -m db upgrade --db URL` runs `upgrade`. Both work on a
connection they hand to Alembic, so no alembic.ini is needed. Three cases:

- an empty database gets every revision from the baseline on;
- a SQLite file of the release before Alembic (schema_info version 1, no alembic_version) is
  stamped with the baseline, which is exactly its schema, and then upgraded in place;
- a database at a revision this code does not know was written by newer code and is refused.
"""

from pathlib import Path
from typing import Optional

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text

from .models import SchemaError, SchemaInfo

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"  # the schema of the last release before Alembic
LEGACY_VERSION = 1  # its schema_info.schema_version
_PG_LOCK = 0x1AB5C4E3A  # advisory lock key: one migrator at a time on a PostgreSQL database


def alembic_config(connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    return script().get_current_head()


def known_revisions() -> set:
    return {r.revision for r in script().walk_revisions()}


def state(conn) -> tuple[Optional[str], Optional[int], bool]:
    """(alembic revision, schema_info version, any lab table present) of the database."""
    names = set(inspect(conn).get_table_names())
    revision = MigrationContext.configure(conn).get_current_revision() if "alembic_version" in names else None
    legacy = (
        conn.execute(select(SchemaInfo.schema_version).where(SchemaInfo.id == 1)).scalar()
        if SchemaInfo.__tablename__ in names
        else None
    )
    return revision, legacy, bool(names - {"alembic_version"})


def _refuse_newer(name, revision, legacy, has_tables):
    if revision is not None and revision not in known_revisions():
        raise SchemaError(
            f"the database is at schema revision {revision}, which this code does not know "
            f"(newer code wrote it; this code's newest is {head()}); update the lab code "
            f"before opening it"
        )
    if revision is None and legacy is not None and legacy > LEGACY_VERSION:
        raise SchemaError(
            f"the database has schema version {legacy} but no Alembic revision; it was not "
            f"written by this lab code or by a release it can upgrade"
        )
    if revision is None and legacy is None and has_tables:
        raise SchemaError("the database has tables but no lab schema marker; it is not a lab database")


def migrate(engine, write_engine=None, target: str = "head") -> str:
    """Bring the database to `target` (default: this code's newest revision; an older one
    downgrades, for tests and for going back a release); returns the revision.
    The check runs without a write lock; upgrading is one write transaction (write_engine lets
    SQLite take its lock up front, PostgreSQL takes an advisory lock), re-checked under the lock
    so that two openers do not both migrate."""
    with engine.connect() as conn:
        revision, legacy, has_tables = state(conn)
    _refuse_newer(engine.url, revision, legacy, has_tables)
    want = head() if target == "head" else target
    if revision == want:
        return revision
    sqlite = engine.dialect.name == "sqlite"
    with (write_engine or engine).connect() as conn:
        if sqlite:  # a batch migration copies tables: a DROP must not cascade (pragma: outside a transaction)
            conn.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
                revision, legacy, has_tables = state(conn)
                _refuse_newer(engine.url, revision, legacy, has_tables)
                cfg = alembic_config(conn)
                if revision is None and legacy == LEGACY_VERSION:
                    command.stamp(cfg, BASELINE)  # the pre-Alembic release's file: exactly the baseline
                older = revision is not None and want in {
                    r.revision for r in script().iterate_revisions(revision, "base")
                }
                try:
                    (command.downgrade if older else command.upgrade)(cfg, want)
                except SchemaError:
                    raise
                except Exception as e:  # a migration that cannot run (e.g. refused data): one line
                    raise SchemaError(f"cannot upgrade the database: {' '.join(str(e).split())}") from e
                if sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").first()
                    if bad is not None:
                        raise SchemaError(f"upgrading would break a reference in table {bad[0]}; nothing changed")
                revision = MigrationContext.configure(conn).get_current_revision()
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys = ON")
    return revision


def current(engine) -> Optional[str]:
    with engine.connect() as conn:
        return state(conn)[0]
