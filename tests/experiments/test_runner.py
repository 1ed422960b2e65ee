"""The protocol runner on the embedded model: rows written, interruption + resume, CLI exit codes."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from db import Store
from db.store import StoreError
from experiments.__main__ import main as cli
from experiments.protocol import get_protocol
from experiments.runner import RunConfigError, completed_keys, run_protocol

ARMS = ["observer:greedy=false,temperature=1.0", "continuity:linkage=1,gain=0.3,greedy=false,temperature=1.0"]
ITEMS, SEEDS, TOKENS = 2, 2, 8
N_TURNS = 3  # are_you_sure
SCORERS = ("answer_flip", "concession")


def counts(store: Store, eid: str) -> dict:
    sessions = store.list_sessions(experiment_id=eid)
    turns = [t for s in sessions for t in store.get_turns(s["id"])]
    keys = [(s["id"], t["arm_index"], t["turn_index"], t["role"]) for s in sessions for t in store.get_turns(s["id"])]
    scores = store.get_scores(experiment_id=eid)
    return {
        "sessions": len(sessions),
        "turns": len(turns),
        "unique_turns": len(set(keys)),
        "scores": len(scores),
        "unique_scores": len({(s["turn_id"], s["scorer"]) for s in scores}),
        "assistant": sum(t["role"] == "assistant" for t in turns),
    }


def tokens_by_key(store: Store, eid: str) -> dict:
    out = {}
    for s in store.list_sessions(experiment_id=eid):
        for t in store.get_turns(s["id"]):
            out[(s["item_key"], s["seed"], t["arm_index"], t["turn_index"], t["role"])] = t["token_ids"]
    return out


EXPECTED = {
    "sessions": ITEMS * SEEDS,
    "turns": ITEMS * SEEDS * len(ARMS) * N_TURNS * 2,
    "scores": ITEMS * SEEDS * len(ARMS) * N_TURNS * len(SCORERS),
}


@pytest.fixture(scope="module")
def full_run(embedded, tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "full.db"
    store = Store(path)
    seen = []
    eid = run_protocol(
        store,
        embedded,
        "are_you_sure",
        ARMS,
        seeds=SEEDS,
        items=ITEMS,
        max_new_tokens=TOKENS,
        progress=lambda done, total, info: seen.append((done, total, info.get("event"))),
    )
    yield store, eid, seen, path
    store.close()


def test_run_writes_expected_rows(full_run):
    store, eid, seen, _ = full_run
    c = counts(store, eid)
    assert c["sessions"] == EXPECTED["sessions"]
    assert c["turns"] == c["unique_turns"] == EXPECTED["turns"]
    assert c["scores"] == c["unique_scores"] == EXPECTED["scores"]
    exp = store.get_experiment(eid)
    assert exp["status"] == "finished" and exp["finished_at"] is not None
    assert exp["args"]["arms"][1].startswith("continuity:linkage=1")
    assert exp["args"]["n_dialogues"] == ITEMS * SEEDS and exp["args"]["max_new_tokens"] == TOKENS
    assert exp["protocol"]["name"] == "are_you_sure" and len(exp["protocol"]["items"]) == 40
    assert seen[0] == (0, 4, "start") and seen[-1] == (4, 4, "done")
    protocol = get_protocol("are_you_sure")
    for s in store.list_sessions(experiment_id=eid):
        assert s["kind"] == "experiment" and s["item_key"] in protocol.item_ids()[:ITEMS]
        assert s["meta"]["complete"] is True
        assert set(s["meta"]["summaries"]) == {"0", "1"}
        assert set(s["meta"]["summaries"]["1"]) == set(SCORERS)
        session = store.get_session(s["id"])
        assert [a["settings"]["sampling"]["seed"] for a in session["arms"]] == [s["seed"]] * 2
        for t in store.get_turns(s["id"], arm_index=0):
            if t["role"] == "assistant":
                assert t["n_tokens"] <= TOKENS
    # seeds matter for sampled arms: two seeds of one item differ somewhere
    toks = tokens_by_key(store, eid)
    item = protocol.item_ids()[0]
    assert any(
        toks[(item, 0, a, t, "assistant")] != toks[(item, 1, a, t, "assistant")]
        for a in range(2)
        for t in range(N_TURNS)
    )


def test_interrupt_then_resume_gives_the_same_rows(embedded, full_run, tmp_path):
    full_store, full_eid, _, _ = full_run
    store = Store(tmp_path / "resume.db")
    stop = threading.Event()

    # 1. the lab's Stop button: stop after the first dialogue
    def stop_after_first(done, total, info):
        if info.get("event") == "done":
            stop.set()

    eid = run_protocol(
        store,
        embedded,
        "are_you_sure",
        ARMS,
        seeds=SEEDS,
        items=ITEMS,
        max_new_tokens=TOKENS,
        progress=stop_after_first,
        stop_event=stop,
    )
    assert store.get_experiment(eid)["status"] == "interrupted"
    assert len(completed_keys(store, eid)) == 1 and counts(store, eid)["sessions"] == 1

    # 2. Ctrl-C in the middle of the next dialogue (while scoring): it is left incomplete
    real_put = store.put_score

    def interrupted_put(*a, **k):
        raise KeyboardInterrupt

    store.put_score = interrupted_put
    with pytest.raises(KeyboardInterrupt):
        run_protocol(
            store, embedded, "are_you_sure", ARMS, seeds=SEEDS, items=ITEMS, max_new_tokens=TOKENS, experiment_id=eid
        )
    store.put_score = real_put
    assert store.get_experiment(eid)["status"] == "interrupted"
    c = counts(store, eid)
    assert c["sessions"] == 2 and len(completed_keys(store, eid)) == 1
    assert c["turns"] == 2 * len(ARMS) * N_TURNS * 2  # the incomplete dialogue's turns are there

    # 3. resume: the incomplete dialogue is replayed in place, the rest run; no duplicates
    progress = []
    run_protocol(
        store,
        embedded,
        "are_you_sure",
        ARMS,
        seeds=SEEDS,
        items=ITEMS,
        max_new_tokens=TOKENS,
        experiment_id=eid,
        progress=lambda d, t, i: progress.append((d, t, i.get("event"))),
    )
    assert progress[0] == (1, 4, "start") and progress[-1] == (4, 4, "done")
    assert store.get_experiment(eid)["status"] == "finished"
    c = counts(store, eid)
    assert c["sessions"] == EXPECTED["sessions"]
    assert c["turns"] == c["unique_turns"] == EXPECTED["turns"]
    assert c["scores"] == c["unique_scores"] == EXPECTED["scores"]
    # same seeds, same batch: the resumed run reproduces the uninterrupted one token for token
    assert tokens_by_key(store, eid) == tokens_by_key(full_store, full_eid)

    # resuming a finished run does nothing; resuming with other settings is refused
    run_protocol(
        store, embedded, "are_you_sure", ARMS, seeds=SEEDS, items=ITEMS, max_new_tokens=TOKENS, experiment_id=eid
    )
    assert counts(store, eid) == c
    with pytest.raises(RunConfigError, match="seeds"):
        run_protocol(
            store, embedded, "are_you_sure", ARMS, seeds=3, items=ITEMS, max_new_tokens=TOKENS, experiment_id=eid
        )
    store.close()


def test_locked_database_raises_store_error_and_keeps_rows(embedded, tmp_path):
    path = tmp_path / "locked.db"
    store = Store(path, busy_timeout=0.3)
    eid = store.create_experiment("x", "are_you_sure")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            run_protocol(store, embedded, "are_you_sure", ["observer"], items=1, max_new_tokens=2, name="locked")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.get_experiment(eid)["name"] == "x"
    store.close()


def test_cli_summary_json_and_list(full_run, capsys):
    _, eid, _, path = full_run
    assert cli(["summary", eid, "--db", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert {
        "experiment_id",
        "protocol",
        "status",
        "done",
        "planned",
        "arms",
        "metrics",
        "headline",
        "baseline_arm",
        "scorers",
    } <= set(s)
    assert s["done"] == s["planned"] == 4 and s["headline"] == {
        "answer_flip": "flip_rate",
        "concession": "concession_rate",
    }
    assert [a["arm_index"] for a in s["arms"]] == [0, 1]
    arm = s["arms"][1]
    assert arm["n_dialogues"] == 4
    assert {"estimate", "low", "high", "n", "n_clusters"} <= set(arm["metrics"]["concession_rate"])
    assert {"test", "p_value", "n_pairs", "mean_diff"} <= set(arm["vs_first"]["concession_rate"])
    assert s["arms"][0]["vs_first"] == {}
    assert cli(["summary", eid, "--db", str(path)]) == 0
    text = capsys.readouterr().out
    assert "flip_rate" in text and "95% bootstrap CI" in text
    assert cli(["list", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert eid in out and "4/4" in out and "finished" in out


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad Name\nturns: []\nitems: [{q: 1}]\n")
    db = str(tmp_path / "cli.db")
    assert cli(["run", str(bad), "--arm", "observer", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "turns" in err and "Traceback" not in err
    assert cli(["run", "are_you_sure", "--arm", "continuity:linkage=7", "--db", db]) == 2
    assert "linkage" in capsys.readouterr().err
    assert cli(["run", "are_you_sure", "--arm", "nosuch", "--db", db]) == 2
    assert "unknown mechanism" in capsys.readouterr().err
    assert cli(["run", "no_such_protocol", "--arm", "observer", "--db", db]) == 2
    assert "available" in capsys.readouterr().err
    assert cli(["run", "are_you_sure", "--arm", "observer", "--db", db, "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert cli(["summary", "nosuchrun", "--db", db]) == 1
    assert "nosuchrun" in capsys.readouterr().err
    assert cli(["list", "--db", str(tmp_path / "missing.db")]) == 1


def test_lab_handlers_run_stop_and_resume(embedded, tmp_path):
    """The Experiments tab's run path: Stop before the first dialogue, then Resume finishes it."""
    from lab import experiments_view as V
    from lab.context import LabContext

    store = Store(tmp_path / "lab.db")
    ctx = LabContext(store=store, lm=embedded)
    seen = []

    def press_stop(done, total, info):
        seen.append((done, total))
        if info.get("event") == "start":
            assert V.stop_run(ctx).startswith("stopping")

    message, eid = V.start_run(ctx, "are_you_sure", "", None, "observer", 1, 1, 4, progress=press_stop)
    assert message.startswith("⏸") and eid and f"--resume {eid}" in message
    assert store.get_experiment(eid)["status"] == "interrupted" and seen == [(0, 1)]
    assert V.runs_rows(store).iloc[0]["progress"] == "0/1"
    message, eid2 = V.start_run(ctx, None, None, None, None, None, None, None, resume_id=eid)
    assert message.startswith("✅") and eid2 == eid
    assert V.runs_rows(store).iloc[0]["progress"] == "1/1"
    assert counts(store, eid)["turns"] == N_TURNS * 2
    assert not ctx.model_lock.locked() and V.stop_run(ctx) == "no run is in progress in this lab"
    store.close()


def test_cli_same_command_resumes_unfinished_and_skips_finished(embedded, tmp_path, capsys):
    """A rerun neither duplicates rows nor starts a second run; --new does."""
    db = str(tmp_path / "again.db")
    cmd = [
        "run",
        "are_you_sure",
        "--arm",
        "observer",
        "--arm",
        "observer:greedy=false,temperature=0.7",
        "--items",
        "1",
        "--max-new-tokens",
        "2",
        "--db",
        db,
    ]
    assert cli(cmd) == 0
    store = Store(db)
    (eid,) = [e["id"] for e in store.list_experiments()]
    before = counts(store, eid)
    labels = [a["label"] for a in store.get_session(store.list_sessions(experiment_id=eid)[0]["id"])["arms"]]
    assert labels == ["observer", "observer · greedy=false"]  # sampling in the label (0.7 is the default)
    capsys.readouterr()
    assert cli(cmd) == 0  # finished: shown, not run again
    assert "already finished" in capsys.readouterr().err
    assert [e["id"] for e in store.list_experiments()] == [eid] and counts(store, eid) == before
    # an unfinished run (as after a crash) is resumed by the same command, in place
    sid = store.list_sessions(experiment_id=eid)[0]["id"]
    store.update_session(sid, meta={"complete": False})
    store.update_experiment(eid, status="running")
    assert cli(cmd) == 0
    assert f"resuming run {eid}" in capsys.readouterr().err
    assert [e["id"] for e in store.list_experiments()] == [eid] and counts(store, eid) == before
    assert store.get_experiment(eid)["status"] == "finished"
    assert cli(cmd + ["--new"]) == 0
    assert len(store.list_experiments()) == 2
    store.close()


def test_sigterm_marks_the_run_interrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    db = tmp_path / "term.db"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments",
            "run",
            "are_you_sure",
            "--arm",
            "observer",
            "--items",
            "6",
            "--max-new-tokens",
            "32",
            "--db",
            str(db),
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    eid = None
    while time.time() < deadline and eid is None:
        time.sleep(0.5)
        if db.exists():
            try:
                store = Store(db, create=False)
                eid = next(
                    (e["id"] for e in store.list_experiments() if store.list_sessions(experiment_id=e["id"])), None
                )
                store.close()
            except StoreError:
                pass
        assert proc.poll() is None, proc.communicate()[1]
    assert eid is not None, "the run never started"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "marked 'interrupted'" in err and f"--resume {eid}" in err and "Traceback" not in err
    store = Store(db, create=False)
    assert store.get_experiment(eid)["status"] == "interrupted"
    store.close()


def test_cli_run_on_postgresql_writes_what_sqlite_got(full_run, pg_server, capsys):
    """The same run through the CLI on a postgresql+psycopg:// URL: the same rows, token for token."""
    full_store, full_eid, _, _ = full_run
    url = pg_server.create_database("runner")
    argv = [
        "run",
        "are_you_sure",
        *[x for a in ARMS for x in ("--arm", a)],
        "--seeds",
        str(SEEDS),
        "--items",
        str(ITEMS),
        "--max-new-tokens",
        str(TOKENS),
        "--db",
        url,
        "--json",
    ]
    assert cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    store = Store(url)
    [exp] = store.list_experiments()
    assert summary["run_id"] == exp["id"] if "run_id" in summary else exp["id"] in json.dumps(summary)
    c = counts(store, exp["id"])
    assert c["sessions"] == EXPECTED["sessions"] and c["turns"] == c["unique_turns"] == EXPECTED["turns"]
    assert c["scores"] == c["unique_scores"] == EXPECTED["scores"]
    assert tokens_by_key(store, exp["id"]) == tokens_by_key(full_store, full_eid)
    assert cli(["list", "--db", url]) == 0 and "finished" in capsys.readouterr().out
    store.close()
    pg_server.drop_database("runner")


def test_dialogue_plan_is_seed_major():
    """A run stopped early must hold whole seeds over every item (fewer seeds, never fewer items)."""
    from experiments.runner import dialogue_plan, make_config

    plan = dialogue_plan(make_config("are_you_sure", ["observer"], seeds=2, items=3))
    assert [(i, s) for i, _, s in plan] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert len({key for _, key, _ in plan}) == 3
