"""python -m db, run as a user would: outputs, files, exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from db import Store
from db.export import TURN_COLUMNS, export_bundle

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "LAB_DB"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "db", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(r, pattern):
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert pattern in r.stderr, r.stderr


def make_db(path):
    st = Store(path)
    eid = st.create_experiment("drift", "contradiction-v1", {}, {"seeds": [1]}, {"name": "tiny"})
    sid = st.create_session(
        "experiment",
        "item 0",
        {"name": "tiny"},
        [
            {"label": "observer", "spec": "observer", "seed": 1},
            {"label": "continuity", "spec": "continuity:linkage=1", "seed": 1},
        ],
        experiment_id=eid,
        item_key=0,
        seed=1,
    )
    for arm in (0, 1):
        st.log_turn(sid, arm, 0, "user", "Is the sky green?", [5, 6, 7])
        t = st.log_turn(sid, arm, 0, "assistant", "No.", [8], finish_reason="eos")
    st.annotate(t, "ana", "initial stance")
    return sid


@pytest.mark.slow
def test_cli_export_import_list(tmp_path, new_db):
    a, b = str(new_db("a")), str(new_db("b"))
    sid = make_db(a)

    r = cli("export", "--db", a, "--format", "parquet", "--out", "tables", "--session", sid, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in paths] == ["turns.parquet", "annotations.parquet", "scores.parquet"]
    turns = pd.read_parquet(paths[0])
    assert list(turns.columns) == TURN_COLUMNS and len(turns) == 4
    assert len(pd.read_parquet(paths[1])) == 1

    r = cli("export", "--db", a, "--format", "bundle", "--out", "bundles", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [bundle] = [Path(p) for p in r.stdout.split()]
    assert bundle == tmp_path / "bundles" / f"bundle-{sid}.json"

    r = cli("import", "--db", b, bundle, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == sid
    assert export_bundle(Store(b), sid) == json.loads(bundle.read_text())

    r = cli("list", "--db", b, cwd=tmp_path)
    assert r.returncode == 0 and sid in r.stdout and "   1 turn " in r.stdout and "drift" in r.stdout

    r = cli("import", "--db", b, bundle, cwd=tmp_path)
    assert_one_line_error(r, f"session {sid} already exists")


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    assert_one_line_error(cli("list", "--db", "nosuchdialect://x", cwd=tmp_path), "cannot use the database URL")
    assert_one_line_error(cli("list", "--db", "missing.db", cwd=tmp_path), "no database at")
    assert not (tmp_path / "missing.db").exists()  # reading commands never create a database
    make_db(tmp_path / "a.db")
    assert_one_line_error(
        cli("export", "--db", "a.db", "--format", "csv", "--out", "o", "--session", "nope", cwd=tmp_path),
        "unknown session id 'nope'",
    )
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(cli("import", "--db", "a.db", "bad.json", cwd=tmp_path), "is not JSON")


def test_cli_offers_every_export_format():
    from db.__main__ import FORMATS
    from db.export import FORMATS as EXPORT_FORMATS

    assert FORMATS == EXPORT_FORMATS


def test_db_imports_no_model_or_ui_code(tmp_path):
    """db/ must stay importable (and cheap) where torch, gradio or the engine are absent."""
    code = (
        "import sys, db, db.export, db.__main__; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'gradio', 'engine', 'lab', 'experiments')]; print(bad)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
