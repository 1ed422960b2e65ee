"""Alembic keeps the schema: a file of the release before Alembic upgrades in place without loss,
a database newer than the code is refused in one line, and the models agree with the migrations."""

import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db import Store, StoreError
from db.export import export_bundle
from db.models import Base
from db.schema import head, migrate

ROOT = Path(__file__).resolve().parents[2]
OLD = ROOT / "tests" / "data" / "lab-v1.db"  # written by the release before Alembic (tests/data/make_lab_v1.py)
TABLES = ("experiments", "sessions", "arms", "turns", "annotations", "scores", "probe_results", "captures")


def rows(path) -> dict:
    with sqlite3.connect(path) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in TABLES}


def diff(engine, metadata=Base.metadata) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)


@pytest.fixture
def old_db(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(OLD, path)
    return path


def test_file_of_the_release_before_alembic_upgrades_in_place_without_loss(old_db):
    before = rows(old_db)
    assert sum(map(len, before.values())) > 20
    store = Store(old_db)
    assert rows(old_db) == before  # every row of every table, byte for byte
    with sqlite3.connect(old_db) as con:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(head(),)]
        assert con.execute("SELECT schema_version FROM schema_info").fetchall() == [(2,)]  # older releases refuse it
    assert diff(store.engine) == []  # the upgraded file has exactly the models' schema
    exp = store.list_experiments()[0]
    session = store.list_sessions(experiment_id=exp["id"])[0]
    bundle = export_bundle(store, session["id"])
    assert len(bundle["turns"]) == 12 and len(bundle["annotations"]) == 2 and bundle["session"]["meta"]["note"] == "ü ✓"
    # and it is a working database: new rows go in, the new unique dialogue key holds
    store.log_turn(session["id"], 0, 3, "user", "one more", [1])
    with pytest.raises(StoreError):
        store.create_session(
            "experiment", "dup", {}, [], experiment_id=exp["id"], item_key=session["item_key"], seed=session["seed"]
        )


def test_cli_upgrade_runs_pending_migrations(old_db):
    cmd = [sys.executable, "-m", "db", "upgrade", "--db", f"sqlite:///{old_db}"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        f"{old_db}: upgraded from the schema before Alembic (version 1) to schema revision {head()}"
    )
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    missing = subprocess.run(cmd[:-1] + [str(old_db.parent / "nope.db")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no database at" in missing.stderr


def test_two_openers_of_an_old_file_migrate_it_once(old_db):
    errors = []

    def open_it():
        try:
            Store(old_db).close()
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sqlite3.connect(old_db) as con:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(head(),)]


def test_downgrade_and_upgrade_again_keep_the_data(old_db):
    """The SQLite side of the migrations runs in batch mode; going back and forth keeps every row."""
    before = rows(old_db)
    store = Store(old_db)
    assert migrate(store.engine, target="0001") == "0001"
    with sqlite3.connect(old_db) as con:
        assert con.execute("SELECT schema_version FROM schema_info").fetchall() == [(1,)]
    assert Store(old_db, upgrade=False).upgrade() == ("0001", head())
    assert rows(old_db) == before


def test_newer_database_is_refused_in_one_line(tmp_path):
    path = tmp_path / "future.db"
    Store(path).close()
    with sqlite3.connect(path) as con:
        con.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")
    with pytest.raises(StoreError, match="schema revision f00dfeed, which this code does not know"):
        Store(path)
    out = subprocess.run(
        [sys.executable, "-m", "db", "list", "--db", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "update the lab code" in out.stderr
    with sqlite3.connect(path) as con:  # refused, not touched
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [("f00dfeed",)]


def test_legacy_file_with_duplicate_dialogues_is_refused_untouched(old_db):
    with sqlite3.connect(old_db) as con:
        con.execute(
            "INSERT INTO sessions SELECT 'dupe' || substr(id, 5), created_at, kind, title, user, model, "
            "system_prompt, blind, pane_order, experiment_id, item_key, seed, meta FROM sessions "
            "WHERE experiment_id IS NOT NULL"
        )
    before = rows(old_db)
    with pytest.raises(StoreError, match="has 2 sessions for item '3' seed 7; delete all but one"):
        Store(old_db)
    assert rows(old_db) == before
    with sqlite3.connect(old_db) as con:
        assert "alembic_version" not in {r[0] for r in con.execute("SELECT name FROM sqlite_master")}


def test_models_and_migrations_agree(new_db):
    """A fresh database gets every migration from the baseline on; its schema must be the models',
    on SQLite and on PostgreSQL. Someone who edits a model without a migration (or the reverse) fails here."""
    store = Store(new_db("fresh"))
    assert diff(store.engine) == []
    # the comparison sees a change: a column the migrations do not have
    edited = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(edited)
    edited.tables["sessions"].append_column(sa.Column("tag", sa.Text()))
    assert [d[0] for d in diff(store.engine, edited)] == ["add_column"]


def test_newer_postgresql_database_is_refused(pg_server):
    url = pg_server.create_database("future")
    Store(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    with pytest.raises(StoreError, match="schema revision f00dfeed, which this code does not know"):
        Store(url)
    engine.dispose()
    pg_server.drop_database("future")
