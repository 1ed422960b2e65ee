"""The record must give back exactly what it was handed, refuse what it cannot keep
honestly, and fail with one readable line; all against real SQLite files."""

import json
import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from db import STANCE_LABELS, Store, StoreError, default_db_url
from db.export import (
    ANNOTATION_COLUMNS,
    SCORE_COLUMNS,
    TURN_COLUMNS,
    annotations_frame,
    export,
    export_bundle,
    import_bundle,
    safe_path,
    turns_frame,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
ARMS = [
    {"index": 0, "label": "observer", "spec": "observer", "settings": {"temperature": 0.7}, "seed": 11},
    {
        "index": 1,
        "label": "continuity λ=1",
        "spec": "continuity:linkage=1,gain=0.3,layers=15/22/28",
        "settings": {"mechanism": {"linkage": 1.0, "gain": 0.3, "layers": [15, 22, 28]}, "temperature": 0.7},
        "seed": 12,
    },
]
MODEL = {"name": "tiny-llm", "weights_hash": "abc123", "dtype": "bfloat16", "quantization": None}


META = {
    "note": "ü ✓",
    "revealed_at": "2026-11-01T00:00:00+00:00",
}  # blind, revealed: exports show arms (see test_db_blind)


def fill(store, n_turns=2, experiment=True):
    """An experiment session with two arms, n_turns exchanges each, and one of everything else."""
    eid = (
        store.create_experiment(
            "stance drift",
            "contradiction-v1",
            {"items": [{"q": "x"}]},
            {"arms": ["observer", "continuity"], "seeds": [7], "max_new_tokens": 64},
            MODEL,
        )
        if experiment
        else None
    )
    sid = store.create_session(
        "experiment" if experiment else "lab",
        "item 3 / seed 7",
        MODEL,
        ARMS,
        system_prompt="Be brief.",
        blind=True,
        pane_order=[1, 0],
        user="ana",
        experiment_id=eid,
        item_key=3 if experiment else None,
        seed=7 if experiment else None,
        meta=META,
    )
    ids = {}
    for arm in (0, 1):
        for k in range(n_turns):
            start = T0 + timedelta(seconds=10 * k)
            ids[arm, k, "user"] = store.log_turn(
                sid, arm, k, "user", f"question {k}", [1, 2, 3 + k], started_at=start, finished_at=start
            )
            ids[arm, k, "assistant"] = store.log_turn(
                sid,
                arm,
                k,
                "assistant",
                f"answer {k} from arm {arm}",
                [40, 41, 42, 43 + arm],
                start,
                start + timedelta(seconds=1.5),
                0.25,
                1.5,
                "eos",
                {"seed": 1000 + k, "temperature": 0.7, "max_new_tokens": 64},
                meta={"kv_len": 17 + k},
            )
    last = ids[1, n_turns - 1, "assistant"]
    store.annotate(last, "ana", "maintained", "holds its view", 0.8)
    store.annotate(last, "bo", "fully revised")
    store.put_score(last, "answer_flip", "flip", 1.0, {"from": "A", "to": "B"})
    store.add_probe(sid, 1, "linear_probe", {"acc": 0.91, "layer": 22}, turn_id=last)
    store.add_probe(sid, 0, "arm_summary", {"mean_len": 4.0})
    store.put_capture(last, "reads", path="captures/reads_1.npz", data={"shape": [3, 4]})
    return eid, sid, ids


def test_roundtrip_every_entity(tmp_path, new_db):
    path = new_db("lab")
    eid, sid, ids = fill(Store(path))
    st = Store(path)  # a fresh Store: what comes back is what is on disk

    exp = st.get_experiment(eid)
    assert exp["name"] == "stance drift" and exp["protocol_name"] == "contradiction-v1"
    assert exp["protocol"] == {"items": [{"q": "x"}]} and exp["model"] == MODEL
    assert exp["args"]["max_new_tokens"] == 64 and exp["status"] == "running" and exp["finished_at"] is None
    assert exp["created_at"].tzinfo is not None

    s = st.get_session(sid)
    assert (s["kind"], s["title"], s["user"], s["system_prompt"]) == (
        "experiment",
        "item 3 / seed 7",
        "ana",
        "Be brief.",
    )
    assert s["model"] == MODEL and s["blind"] is True and s["pane_order"] == [1, 0]
    assert (s["experiment_id"], s["item_key"], s["seed"], s["meta"]) == (eid, "3", 7, META)
    assert [{k: a[k] for k in ("index", "label", "spec", "settings", "seed")} for a in s["arms"]] == ARMS

    turns = st.get_turns(sid)
    assert [(t["turn_index"], t["role"], t["arm_index"]) for t in turns] == [
        (0, "user", 0),
        (0, "user", 1),
        (0, "assistant", 0),
        (0, "assistant", 1),
        (1, "user", 0),
        (1, "user", 1),
        (1, "assistant", 0),
        (1, "assistant", 1),
    ]
    a = st.get_turn(ids[1, 1, "assistant"])
    assert a["text"] == "answer 1 from arm 1" and a["token_ids"] == [40, 41, 42, 44] and a["n_tokens"] == 4
    assert a["started_at"] == T0 + timedelta(seconds=10) and a["finished_at"] == T0 + timedelta(seconds=11.5)
    assert (a["ttft_s"], a["duration_s"], a["finish_reason"], a["error"]) == (0.25, 1.5, "eos", None)
    assert a["gen_settings"] == {"seed": 1001, "temperature": 0.7, "max_new_tokens": 64}
    assert a["meta"] == {"kv_len": 18}
    assert [t["arm_index"] for t in st.get_turns(sid, arm_index=1)] == [1, 1, 1, 1]

    ann = st.get_annotations(sid)
    assert [(x["annotator"], x["stance_label"], x["note"], x["confidence"]) for x in ann] == [
        ("ana", "maintained", "holds its view", 0.8),
        ("bo", "fully revised", "", None),
    ]
    assert ann[0]["turn_id"] == ids[1, 1, "assistant"] and (ann[0]["arm_index"], ann[0]["turn_index"]) == (1, 1)

    [score] = st.get_scores(session_id=sid)
    assert (score["scorer"], score["label"], score["value"], score["data"]) == (
        "answer_flip",
        "flip",
        1.0,
        {"from": "A", "to": "B"},
    )
    assert st.get_scores(experiment_id=eid) == [score] and st.get_scores(experiment_id="nope") == []

    probes = st.get_probes(sid)
    assert [(p["kind"], p["arm_index"], p["turn_index"], p["metrics"]) for p in probes] == [
        ("linear_probe", 1, 1, {"acc": 0.91, "layer": 22}),
        ("arm_summary", 0, None, {"mean_len": 4.0}),
    ]

    cap = st.get_capture(ids[1, 1, "assistant"], "reads")
    assert (cap["path"], cap["data"]) == ("captures/reads_1.npz", {"shape": [3, 4]})
    assert st.get_capture(ids[1, 1, "assistant"], "attention") is None
    if not st.is_sqlite:  # jsonb, not json: equality, DISTINCT and GROUP BY work on it
        with st.engine.connect() as c:
            assert (
                c.exec_driver_sql(
                    "SELECT data_type FROM information_schema.columns WHERE table_name = "
                    "'sessions' AND column_name = 'meta'"
                ).scalar()
                == "jsonb"
            )
        return
    assert st.dir == path.parent.resolve()
    with st.engine.connect() as c:  # the settings the crash/concurrency guarantees rest on
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000


def test_timestamps_accept_epoch_iso_and_aware_datetimes(tmp_path, new_db):
    st = Store(new_db("t"))
    sid = st.create_session("lab", "t", MODEL, ARMS[:1])
    epoch = T0.timestamp()
    st.log_turn(sid, 0, 0, "user", "a", [1], started_at=epoch, finished_at=T0.isoformat())
    st.log_turn(sid, 0, 0, "assistant", "b", [2], started_at=T0.astimezone(timezone(timedelta(hours=5))))
    u, a = st.get_turns(sid)
    assert u["started_at"] == u["finished_at"] == a["started_at"] == T0
    assert a["started_at"].utcoffset() == timedelta(0)


def test_experiment_status_find_and_list_sessions(tmp_path, new_db):
    st = Store(new_db("e"))
    eid, sid, ids = fill(st)
    lab_sid = st.create_session("lab", "free chat", MODEL, ARMS[:1])
    assert st.find_session(eid, 3, 7)["id"] == sid  # item_key given as int, stored as "3"
    assert st.find_session(eid, "3", 8) is None and st.find_session(eid, "4", 7) is None
    assert [a["label"] for a in st.find_session(eid, "3", 7)["arms"]] == ["observer", "continuity λ=1"]

    listed = st.list_sessions()
    assert [x["id"] for x in listed] == [lab_sid, sid]  # newest first
    # n_turns counts exchanges as the lab's Sessions tab does (2 turns), n_messages the rows (2 arms x 2 roles x 2)
    assert [listed[1][k] for k in ("n_arms", "n_turns", "n_messages", "n_annotations")] == [2, 2, 8, 2]
    assert [listed[0][k] for k in ("n_arms", "n_turns", "n_messages", "n_annotations")] == [1, 0, 0, 0]
    assert [x["id"] for x in st.list_sessions(kind="lab")] == [lab_sid]
    assert [x["id"] for x in st.list_sessions(experiment_id=eid)] == [sid]

    st.update_experiment(eid, status="finished")
    exp = st.list_experiments()[0]
    assert exp["status"] == "finished" and exp["finished_at"] is not None and exp["n_sessions"] == 1
    st.update_session(sid, title="renamed", meta={"x": 1}, pane_order=[0, 1])
    s = st.get_session(sid)
    assert (s["title"], s["meta"], s["pane_order"]) == ("renamed", {"x": 1}, [0, 1])
    with pytest.raises(ValueError, match="pane_order"):
        st.update_session(sid, pane_order=[0, 0])
    with pytest.raises(ValueError, match="can change only"):
        st.update_session(sid, kind="lab")


def test_annotation_history_and_latest(tmp_path, new_db):
    st = Store(new_db("a"))
    _, sid, ids = fill(st)
    turn = ids[0, 0, "assistant"]
    st.annotate(turn, "ana", "initial stance")
    st.annotate(turn, "ana", "partially revised", "second look", 0.4)
    st.annotate(turn, "bo", "maintained")
    history = [x for x in st.get_annotations(sid) if x["turn_id"] == turn]
    assert [x["stance_label"] for x in history] == ["initial stance", "partially revised", "maintained"]
    latest = {(x["turn_id"], x["annotator"]): x["stance_label"] for x in st.latest_annotations(sid)}
    assert latest[turn, "ana"] == "partially revised" and latest[turn, "bo"] == "maintained"
    assert len(st.latest_annotations(sid)) == 4  # 2 on this turn + the 2 fill() made on another


def test_scores_and_captures_are_upserts(tmp_path, new_db):
    st = Store(new_db("u"))
    _, sid, ids = fill(st)
    turn = ids[1, 1, "assistant"]
    st.put_score(turn, "answer_flip", "no_flip", 0.0, {"v": 2})
    st.put_capture(turn, "reads", data={"shape": [9]})
    [score] = st.get_scores(session_id=sid)
    assert (score["label"], score["value"], score["data"]) == ("no_flip", 0.0, {"v": 2})
    caps = st.get_captures(sid)
    assert len(caps) == 1 and caps[0]["path"] is None and caps[0]["data"] == {"shape": [9]}


def test_regenerate_deletes_from_position_with_dependents(tmp_path, new_db):
    st = Store(new_db("r"))
    _, sid, ids = fill(st, n_turns=3)
    st.annotate(ids[0, 1, "assistant"], "ana", "maintained")
    # regenerate arm 0's reply to turn 1: its user message 1 stays, reply 1 and all of turn 2 go
    assert st.delete_turns_from(sid, 0, 1, role="assistant") == 3
    assert [(t["turn_index"], t["role"]) for t in st.get_turns(sid, 0)] == [(0, "user"), (0, "assistant"), (1, "user")]
    assert len(st.get_turns(sid, 1)) == 6  # other arm untouched
    assert all(a["arm_index"] == 1 for a in st.get_annotations(sid))
    new = st.log_turn(sid, 0, 1, "assistant", "a new reply", [9, 9])
    assert st.get_turn(new)["text"] == "a new reply"
    # all arms from turn 2 on: the other arm's capture, score and probe on turn 2 go with it
    assert st.delete_turns_from(sid, None, 2) == 2
    assert st.get_scores(session_id=sid) == [] and st.get_captures(sid) == []
    assert [p["kind"] for p in st.get_probes(sid)] == ["arm_summary"]


def test_duplicate_turn_is_refused_and_earlier_rows_survive(tmp_path, new_db):
    st = Store(new_db("d"))
    _, sid, _ = fill(st)
    before = st.get_turns(sid)
    with pytest.raises(StoreError, match="already logged"):
        st.log_turn(sid, 0, 1, "assistant", "again", [1])
    assert st.get_turns(sid) == before


def test_invalid_input_is_refused_with_clear_errors(tmp_path, new_db):
    st = Store(new_db("v"))
    _, sid, ids = fill(st)
    turn = ids[0, 0, "assistant"]
    with pytest.raises(ValueError, match="unknown stance label 'kinda revised'; expected one of"):
        st.annotate(turn, "ana", "kinda revised")
    with pytest.raises(ValueError, match="between 0 and 1"):
        st.annotate(turn, "ana", STANCE_LABELS[0], confidence=1.5)
    with pytest.raises(ValueError, match="only assistant turns"):
        st.annotate(ids[0, 0, "user"], "ana", STANCE_LABELS[0])
    with pytest.raises(ValueError, match="role"):
        st.log_turn(sid, 0, 5, "bot", "x", [1])
    with pytest.raises(ValueError, match="finish_reason"):
        st.log_turn(sid, 0, 5, "assistant", "x", [1], finish_reason="tired")
    with pytest.raises(ValueError, match="token_ids"):
        st.log_turn(sid, 0, 5, "assistant", "x", [1.5])
    with pytest.raises(ValueError, match="gen_settings: must be JSON-serialisable"):
        st.log_turn(sid, 0, 5, "assistant", "x", [1], gen_settings={"dtype": object()})
    with pytest.raises(ValueError, match="capture path"):
        st.put_capture(turn, "attention", path="../../etc/passwd")
    with pytest.raises(ValueError, match="pane_order"):
        st.create_session("lab", "t", MODEL, ARMS, pane_order=[0, 5])
    assert len(st.get_turns(sid)) == 8 and len(st.get_annotations(sid)) == 2


def test_unknown_ids_raise_store_error(tmp_path, new_db):
    st = Store(new_db("k"))
    _, sid, _ = fill(st)
    with pytest.raises(StoreError, match="unknown session id 'nope'"):
        st.log_turn("nope", 0, 0, "user", "x", [1])
    with pytest.raises(StoreError, match="has no arm 7"):
        st.log_turn(sid, 7, 0, "user", "x", [1])
    with pytest.raises(StoreError, match="unknown session id"):
        st.get_session("nope")
    with pytest.raises(StoreError, match="unknown session id"):
        st.get_turns("nope")
    with pytest.raises(StoreError, match="unknown turn id 999"):
        st.annotate(999, "ana", STANCE_LABELS[0])
    with pytest.raises(StoreError, match="unknown turn id"):
        st.put_score(999, "answer_flip", "x", 1.0)
    with pytest.raises(StoreError, match="unknown experiment id"):
        st.create_session("experiment", "t", MODEL, ARMS, experiment_id="nope")
    with pytest.raises(StoreError, match="unknown experiment id"):
        st.update_experiment("nope", status="failed")
    with pytest.raises(StoreError, match="already exists"):
        st.create_session("lab", "t", MODEL, ARMS, id=sid)
    assert [x["id"] for x in st.list_sessions()] == [sid]  # refused sessions left nothing behind


def test_locked_database_gives_one_readable_line_and_keeps_rows(tmp_path):
    path = tmp_path / "locked.db"
    st = Store(path, busy_timeout=0.2)
    sid = st.create_session("lab", "t", MODEL, ARMS[:1])
    st.log_turn(sid, 0, 0, "user", "kept", [1])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert [t["text"] for t in st.get_turns(sid)] == ["kept"]  # WAL: reading still works
        t = time.monotonic()
        with pytest.raises(StoreError) as err:
            st.log_turn(sid, 0, 0, "assistant", "lost", [2])
        waited = time.monotonic() - t
    finally:
        other.rollback()
        other.close()
    msg = str(err.value)
    assert msg == f"the database {path.resolve()} is locked by another process; try again"
    assert 0.15 < waited < 5  # it waited for the busy timeout, then gave up
    assert [t["text"] for t in st.get_turns(sid)] == ["kept"]
    st.log_turn(sid, 0, 0, "assistant", "now it goes in", [2])
    assert len(st.get_turns(sid)) == 2


def test_open_forms_and_open_errors(tmp_path, monkeypatch):
    sid = Store(tmp_path / "p.db").create_session("lab", "t", MODEL, ARMS[:1])
    assert Store(str(tmp_path / "p.db")).get_session(sid)["id"] == sid
    assert Store(f"sqlite:///{tmp_path / 'p.db'}").get_session(sid)["id"] == sid
    monkeypatch.chdir(tmp_path)
    assert Store("p.db").get_session(sid)["id"] == sid  # relative path
    monkeypatch.setenv("LAB_DB", "sqlite:///elsewhere.db")
    assert default_db_url() == "sqlite:///elsewhere.db"
    monkeypatch.delenv("LAB_DB")
    assert default_db_url() == "sqlite:///lab.db"
    assert Store().path == tmp_path.resolve() / "lab.db"

    with pytest.raises(StoreError, match="cannot use the database URL nosuchdialect://x"):
        Store("nosuchdialect://x")
    with pytest.raises(StoreError, match="no database at"):
        Store(tmp_path / "missing.db", create=False)
    with pytest.raises(StoreError, match="folder does not exist"):
        Store(tmp_path / "no" / "such" / "dir.db")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="is not a database file"):
        Store(tmp_path / "junk.db")


# ----------------------------------------------------------------- export


def test_bundle_moves_a_session_between_databases_without_loss(tmp_path, new_db):
    a = Store(new_db("a"))
    _, sid, _ = fill(a, n_turns=3)
    bundle = export_bundle(a, sid)
    text = json.dumps(bundle)  # it is JSON as promised
    b = Store(new_db("b"))
    b.create_session("lab", "unrelated", MODEL, ARMS)  # B's ids do not line up with A's
    assert import_bundle(b, json.loads(text)) == sid
    assert export_bundle(b, sid) == bundle
    assert len(bundle["turns"]) == 12 and len(bundle["annotations"]) == 2 and len(bundle["probes"]) == 2

    with pytest.raises(StoreError, match=f"session {sid} already exists"):
        import_bundle(b, bundle)
    # one dialogue per (experiment, item, seed): a copy of the same dialogue would be a second one
    with pytest.raises(StoreError, match="already has the dialogue of item '3' seed 7"):
        import_bundle(b, bundle, new_id=True)
    other_seed = {**bundle, "session": {**bundle["session"], "seed": 8}}
    copy = import_bundle(b, other_seed, new_id=True)
    assert copy != sid and export_bundle(b, copy) == {**other_seed, "session": {**other_seed["session"], "id": copy}}
    # a second session of the same experiment reuses the experiment row that is already there
    assert len(b.list_experiments()) == 1 and b.list_experiments()[0]["n_sessions"] == 2


def test_broken_bundle_imports_nothing(tmp_path, new_db):
    a = Store(new_db("a"))
    _, sid, _ = fill(a)
    bundle = export_bundle(a, sid)
    bundle["annotations"][0]["turn_index"] = 42  # refers to a turn that is not there
    b = Store(new_db("b"))
    with pytest.raises(StoreError, match=r"invalid session bundle: annotations\[0\]: refers to turn 42 \(assistant\)"):
        import_bundle(b, bundle)
    assert b.list_sessions() == [] and b.list_experiments() == []
    with pytest.raises(StoreError, match="not a session bundle"):
        import_bundle(b, {"session": {}})


def test_table_exports_have_documented_columns_and_rows(tmp_path, new_db):
    st = Store(new_db("x"))
    eid, sid, _ = fill(st)
    fill(st, experiment=False)  # a lab session that the filters must leave out
    turns = turns_frame(st, experiment_id=eid)
    assert list(turns.columns) == TURN_COLUMNS + ["score_answer_flip_label", "score_answer_flip_value"]
    assert len(turns) == 8 and set(turns["session_id"]) == {sid}
    row = turns[(turns.arm_index == 1) & (turns.turn_index == 1) & (turns.role == "assistant")].iloc[0]
    assert json.loads(row.token_ids) == [40, 41, 42, 44] and json.loads(row.gen_settings)["seed"] == 1001
    assert json.loads(row.settings)["mechanism"]["layers"] == [15, 22, 28] and row.model_name == "tiny-llm"
    assert (row.score_answer_flip_label, row.score_answer_flip_value) == ("flip", 1.0)
    assert len(turns_frame(st)) == 16 and len(annotations_frame(st)) == 4

    for fmt, read in (
        ("csv", pd.read_csv),
        ("jsonl", lambda p: pd.read_json(p, lines=True)),
        ("parquet", pd.read_parquet),
    ):
        out = tmp_path / f"out_{fmt}"
        paths = export(st, fmt, out, session_id=sid)
        assert [p.name for p in paths] == [f"turns.{fmt}", f"annotations.{fmt}", f"scores.{fmt}"]
        t, a, s = (read(p) for p in paths)
        assert list(t.columns) == list(turns.columns) and len(t) == 8
        assert list(a.columns) == ANNOTATION_COLUMNS and len(a) == 2
        assert list(s.columns) == SCORE_COLUMNS and len(s) == 1
        assert sorted(a.stance_label) == ["fully revised", "maintained"]
        assert list(t.seed.unique()) == [7]  # an int, not 7.0
    back = pd.read_parquet(tmp_path / "out_parquet" / "turns.parquet")
    assert back.started_at.dt.tz is not None and back.text.tolist() == turns.text.tolist()


def test_export_of_an_empty_database_still_has_headers(tmp_path, new_db):
    st = Store(new_db("empty"))
    paths = export(st, "csv", tmp_path / "out")
    assert pd.read_csv(paths[0]).columns.tolist() == TURN_COLUMNS
    assert export(st, "bundle", tmp_path / "out2") == []


def test_export_stays_inside_the_folder_asked_for(tmp_path, new_db):
    st = Store(new_db("x"))
    fill(st)
    out = tmp_path / "deep" / ".." / "out"  # the folder itself may be any path
    for bad in ("../evil.csv", "a/b.csv", "a\\b.csv", "..", "", "x..csv"):
        with pytest.raises(ValueError, match="unsafe export file name"):
            safe_path(out, bad)
    with pytest.raises(ValueError, match="unsafe export file name"):
        export(st, "csv", out, prefix="../")
    assert not (tmp_path / "turns.csv").exists() and not (tmp_path / "deep").exists()
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "outside.csv", tmp_path / "out" / "turns.csv")  # planted link out
    with pytest.raises(ValueError, match="outside"):
        export(st, "csv", out)
    assert not (tmp_path / "outside.csv").exists()
    with pytest.raises(StoreError, match="unknown session id"):
        export(st, "bundle", tmp_path / "b", session_id="../../etc")
    with pytest.raises(ValueError, match="unknown export format"):
        export(st, "xlsx", out)


def test_the_store_refuses_what_sqlite_cannot_hold_and_writes_nothing(tmp_path, new_db):
    """The same rules as bundle imports (db/rules.py), so no way in reaches the driver with bad values."""
    st = Store(new_db("w"))
    _, sid, ids = fill(st)
    before = st.get_turns(sid)
    bad = [
        (lambda: st.create_session("lab", "t", MODEL, ARMS, seed=10**30), "seed: expected a seed from 0 to"),
        (lambda: st.create_session("lab", "x" * 2_000_000, MODEL, ARMS), "title: at most 500 characters"),
        (lambda: st.create_session("lab", "t", MODEL, ARMS, id="../../tmp/evil"), "id: expected an id"),
        (lambda: st.create_session("lab", "t", MODEL, [{"label": "a", "seed": 2**63}]), r"arms\[0\].seed"),
        (lambda: st.create_session("lab", "t", MODEL, [{"label": "a", "settings": [1]}]), r"arms\[0\].settings"),
        (lambda: st.create_session("lab", "t", MODEL, ARMS, blind="yes"), "blind: expected true or false"),
        (lambda: st.log_turn(sid, 0, 9, "user", "a\udc80b", [1]), "text: not valid Unicode text"),
        (lambda: st.log_turn(sid, 0, 9, "user", "x", [1], n_tokens=float("inf")), "n_tokens: expected an int"),
        (lambda: st.log_turn(sid, 0, 9, "user", "x", "abc"), "token_ids: expected a list of ints"),
        (lambda: st.log_turn(sid, 0, 9, "user", "x", [2**63]), "token_ids"),
        (lambda: st.log_turn(sid, 0, "abc", "user", "x", [1]), "turn_index: expected an int"),
        (lambda: st.log_turn(sid, 0, 9, "user", "x", [1], started_at="yesterday"), "started_at: expected a timestamp"),
        (
            lambda: st.log_turn(sid, 0, 9, "assistant", "x", [1], ttft_s=float("nan")),
            "ttft_s: expected a finite number",
        ),
        (lambda: st.annotate(ids[0, 0, "assistant"], "", STANCE_LABELS[0]), "annotator: expected a non-empty name"),
        (lambda: st.put_score(ids[0, 0, "assistant"], "s" * 101, "x", 1.0), "scorer: at most 100 characters"),
        (lambda: st.put_capture(ids[0, 0, "assistant"], "reads", path="/etc/passwd"), "capture path"),
        (lambda: st.update_session(sid, title="t" * 501), "title: at most 500"),
        (
            lambda: st.update_experiment(st.list_experiments()[0]["id"], finished_at="soon"),
            "finished_at: expected a timestamp",
        ),
        # PostgreSQL's text and jsonb cannot hold NUL: refused on every backend alike, in one line
        (lambda: st.log_turn(sid, 0, 9, "user", "a\x00b", [1]), r"text: contains a NUL character \(\\x00\)"),
        (
            lambda: st.log_turn(sid, 0, 9, "user", "x", [1], meta={"k": ["a\x00"]}),
            "meta: a string in it contains a NUL",
        ),
        (lambda: st.create_session("lab", "t", {"name\x00": 1}, ARMS), "model: a string in it contains a NUL"),
        (lambda: st.update_session(sid, user="an\x00a"), "user: contains a NUL"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    assert st.get_turns(sid) == before and len(st.list_sessions()) == 1
    assert st.get_session(sid)["title"] == "item 3 / seed 7"
    # the largest values the rules let through fit every backend (PostgreSQL's INTEGER is 32-bit)
    big = st.create_session("lab", "t", MODEL, [{"label": "a", "seed": 2**63 - 1}], seed=2**63 - 1)
    st.log_turn(big, 0, 2**40, "user", "x", [2**63 - 1])
    assert st.get_session(big)["arms"][0]["seed"] == 2**63 - 1 and st.get_turns(big)[0]["token_ids"] == [2**63 - 1]
