"""A battery of bad inputs to the command lines (`python -m engine|db|experiments`) and to bundle imports.

Every case: the documented error status (2 for a mistake in the command or its input, 1 for a
database problem), exactly one line on stderr that starts with "error:" and names the problem, no
traceback. Database cases also check that the database is intact (PRAGMA integrity_check) and that
every turn logged before is still there, unchanged. The CLIs run in-process through their main(argv)
(fast); a few real subprocesses prove the wiring of `python -m ...`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from db import Store
from db.export import export_bundle

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def run_main(main, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_clear_line(rc, err, status, message):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert rc == status, (rc, err)


# ------------------------------------------------------------------ the database under test


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A database with one logged session, and a valid bundle of it (exported, then removed from a copy)."""
    d = tmp_path_factory.mktemp("battery")
    st = Store(d / "lab.db")
    eid = st.create_experiment("drift", "are_you_sure", {"items": []}, {"seeds": [1]}, {"name": "tiny"})
    sid = st.create_session(
        "experiment",
        "item 0",
        {"name": "tiny"},
        [
            {"label": "observer", "spec": "observer", "settings": {}, "seed": 1},
            {"label": "continuity", "spec": "continuity:linkage=1", "settings": {}, "seed": 1},
        ],
        experiment_id=eid,
        item_key=0,
        seed=1,
    )
    for arm in (0, 1):
        for k in range(2):
            st.log_turn(sid, arm, k, "user", f"question {k}", [5, 6, 7], started_at=1.7e9, finished_at=1.7e9)
            t = st.log_turn(
                sid,
                arm,
                k,
                "assistant",
                f"answer {k}",
                [8, 9],
                started_at=1.7e9,
                finished_at=1.7e9 + 1,
                ttft_s=0.1,
                duration_s=1.0,
                finish_reason="eos",
                gen_settings={"seed": 1},
            )
    st.annotate(t, "ana", "maintained", "ok", 0.5)
    st.put_score(t, "answer_flip", "no_flip", 0.0, {"x": 1})
    st.put_capture(t, "reads", path="captures/r.npz", data={"shape": [2]})
    st.add_probe(sid, 1, "reads", {"mean": 1.0}, turn_id=t)
    st.add_probe(sid, 0, "summary", {"n": 2})
    bundle = export_bundle(st, sid)
    bundle["session"]["id"] = "b" * 32  # not in the database: a valid import unless broken
    turns = st.get_turns(sid)
    st.close()
    return {"dir": d, "db": d / "lab.db", "sid": sid, "bundle": bundle, "turns": turns}


def assert_db_intact(lab):
    with sqlite3.connect(lab["db"]) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    st = Store(lab["db"], create=False)
    try:
        assert st.get_turns(lab["sid"]) == lab["turns"]
        assert [s["id"] for s in st.list_sessions()] == [lab["sid"]]  # nothing imported
    finally:
        st.close()


# ------------------------------------------------------------------ bundle imports


def setter(path, value):
    """A change to the bundle: set the value at a key path like ('turns', 1, 'n_tokens')."""

    def change(b):
        target = b
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def deleter(path):
    def change(b):
        target = b
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


BUNDLE_CASES = {
    # the list
    "n_tokens 1e400": (setter(("turns", 1, "n_tokens"), float("inf")), "turns[1].n_tokens: expected an int"),
    "turn_index abc": (setter(("turns", 2, "turn_index"), "abc"), "turns[2].turn_index: expected an int"),
    "token_ids string": (setter(("turns", 3, "token_ids"), "[1, 2]"), "turns[3].token_ids: expected a list of ints"),
    "settings list": (setter(("arms", 0, "settings"), [1, 2]), "arms[0].settings: expected a JSON object"),
    "role admin": (setter(("turns", 0, "role"), "admin"), "turns[0].role: expected one of system, user, assistant"),
    "finish exploded": (setter(("turns", 1, "finish_reason"), "exploded"), "turns[1].finish_reason: expected one of"),
    "confidence 7.5": (
        setter(("annotations", 0, "confidence"), 7.5),
        "annotations[0].confidence: expected a number between 0 and 1",
    ),
    "5000-char id": (setter(("session", "id"), "x" * 5000), "session.id: expected an id of 1 to 32"),
    "2 MB title": (setter(("session", "title"), "t" * 2_000_000), "session.title: at most 500 characters"),
    "capture ../ path": (
        setter(("captures", 0, "path"), "../../../../etc/passwd"),
        "captures[0].path: a capture path must be relative",
    ),
    "capture absolute path": (
        setter(("captures", 0, "path"), "/etc/passwd"),
        "captures[0].path: a capture path must be relative",
    ),
    "capture drive path": (
        setter(("captures", 0, "path"), "C:\\x.npz"),
        "captures[0].path: a capture path must be relative",
    ),
    "capture nul path": (setter(("captures", 0, "path"), "a\0b"), "captures[0].path: a capture path must be relative"),
    "session id traversal": (setter(("session", "id"), "../../../../tmp/evil-session"), "session.id: expected an id"),
    "seed 10**30": (setter(("session", "seed"), 10**30), "session.seed: expected a seed from 0 to"),
    "bad timestamp": (setter(("turns", 0, "started_at"), "yesterday"), "turns[0].started_at: expected a timestamp"),
    # more fields
    "seed -1": (setter(("session", "seed"), -1), "session.seed: expected a seed"),
    "arm seed 2**63": (setter(("arms", 1, "seed"), 2**63), "arms[1].seed: expected a seed"),
    "arm index string": (setter(("arms", 1, "index"), "1"), "arms[1].index: expected an int"),
    "created_at inf": (setter(("session", "created_at"), float("inf")), "session.created_at: expected a timestamp"),
    "finished_at list": (setter(("turns", 1, "finished_at"), [2026]), "turns[1].finished_at: expected a timestamp"),
    "stance kinda": (
        setter(("annotations", 0, "stance_label"), "kinda revised"),
        "annotations[0].stance_label: unknown stance label",
    ),
    "annotator empty": (
        setter(("annotations", 0, "annotator"), " "),
        "annotations[0].annotator: expected a non-empty name",
    ),
    "confidence text": (
        setter(("annotations", 0, "confidence"), "high"),
        "annotations[0].confidence: expected a number",
    ),
    "confidence negative": (setter(("annotations", 0, "confidence"), -0.1), "annotations[0].confidence"),
    "kind party": (setter(("session", "kind"), "party"), "session.kind: expected one of lab, experiment"),
    "blind yes": (setter(("session", "blind"), "yes"), "session.blind: expected true or false"),
    "pane_order repeat": (setter(("session", "pane_order"), [0, 0]), "session.pane_order: [0, 0] must list distinct"),
    "pane_order unknown arm": (setter(("session", "pane_order"), [5]), "session.pane_order: [5] must list distinct"),
    "pane_order string": (setter(("session", "pane_order"), "01"), "session.pane_order: expected a list of ints"),
    "experiment status": (setter(("experiment", "status"), "done"), "experiment.status: expected one of running"),
    "experiment other id": (setter(("experiment", "id"), "c" * 32), "experiment.id: the bundle carries experiment"),
    "experiment name long": (setter(("experiment", "name"), "n" * 201), "experiment.name: at most 200 characters"),
    "experiment missing": (
        lambda b: b.update(experiment=None, session={**b["session"], "experiment_id": "d" * 32}),
        "experiment: the session belongs to experiment " + "d" * 32,
    ),
    "turn of no arm": (setter(("turns", 0, "arm_index"), 9), "turns[0].arm_index: the bundle has no arm 9"),
    "duplicate turn": (
        lambda b: b["turns"].append(copy.deepcopy(b["turns"][0])),
        "turns[8]: turn 0 (user) of arm 0 appears twice",
    ),
    "annotation on user turn": (
        setter(("annotations", 0, "role"), "user"),
        "annotations[0].role: only assistant turns",
    ),
    "annotation of no turn": (
        setter(("annotations", 0, "turn_index"), 42),
        "annotations[0]: refers to turn 42 (assistant) of arm 1",
    ),
    "score twice": (
        lambda b: b["scores"].append(copy.deepcopy(b["scores"][0])),
        "scores[1]: a second 'answer_flip' row",
    ),
    "score NaN": (setter(("scores", 0, "value"), float("nan")), "scores[0].value: expected a finite number"),
    "scorer long": (setter(("scores", 0, "scorer"), "s" * 101), "scores[0].scorer: at most 100 characters"),
    "probe of no arm": (setter(("probes", 0, "arm_index"), 9), "probes[0].arm_index: the bundle has no arm 9"),
    "probe half key": (setter(("probes", 0, "role"), None), "probes[0]: turn_index and role are both set or both null"),
    "capture of no turn": (setter(("captures", 0, "turn_index"), 7), "captures[0]: refers to turn 7"),
    "unknown top key": (setter(("extra",), 1), "extra: unknown key"),
    "unknown row key": (setter(("turns", 0, "arm_id"), 3), "turns[0].arm_id: unknown key"),
    "missing session": (deleter(("session",)), "session: missing"),
    "missing turn role": (deleter(("turns", 0, "role")), "turns[0].role: missing"),
    "session not object": (setter(("session",), "s"), "session: expected an object"),
    "turns not list": (setter(("turns",), {"a": 1}), "turns: expected a list"),
    "no format": (deleter(("format",)), "not a session bundle"),
    "version 2": (setter(("version",), 2), "bundle version 2 is not supported"),
    "schema 99": (setter(("schema_version",), 99), "schema_version: expected a schema version"),
    "lone surrogate text": (setter(("turns", 1, "text"), "a\udc80b"), "turns[1].text: not valid Unicode text"),
    "text not string": (setter(("turns", 1, "text"), 5), "turns[1].text: expected a string"),
    "gen_settings string": (
        setter(("turns", 1, "gen_settings"), "seed=1"),
        "turns[1].gen_settings: expected a JSON object",
    ),
    "model list": (setter(("session", "model"), ["tiny"]), "session.model: expected a JSON object"),
    "ttft negative": (setter(("turns", 1, "ttft_s"), -1), "turns[1].ttft_s: expected a number >= 0"),
    "duration text": (setter(("turns", 1, "duration_s"), "fast"), "turns[1].duration_s: expected a number"),
    "arm label long": (setter(("arms", 0, "label"), "l" * 300), "arms[0].label: at most 200 characters"),
    "item_key list": (setter(("session", "item_key"), [1]), "session.item_key: expected a string or an int"),
    "user long": (setter(("session", "user"), "u" * 201), "session.user: at most 200 characters"),
    "sealed garbage": (setter(("sealed",), "not base64!"), "sealed: not a sealed bundle"),
    "duplicate arm": (lambda b: b["arms"].append(copy.deepcopy(b["arms"][0])), "arms[2].index: arm 0 appears twice"),
}


@pytest.mark.parametrize("name", list(BUNDLE_CASES))
def test_bad_bundle_is_refused_whole(name, lab, capsys):
    from db.__main__ import main

    change, message = BUNDLE_CASES[name]
    b = copy.deepcopy(lab["bundle"])
    change(b)
    path = lab["dir"] / "bad.json"
    path.write_text(json.dumps(b, ensure_ascii=True), encoding="utf-8")  # \udc80 survives as an escape
    rc, err = run_main(main, ["import", "--db", lab["db"], path], capsys)
    assert_one_clear_line(rc, err, 2, "invalid session bundle: " + message)
    assert_db_intact(lab)


def test_the_battery_bundle_itself_imports(lab, tmp_path, capsys):
    """The unbroken bundle is valid (so each case above fails for its own change only)."""
    from db.__main__ import main

    path = tmp_path / "good.json"
    path.write_text(json.dumps(lab["bundle"]))
    rc, err = run_main(main, ["import", "--db", tmp_path / "copy.db", path], capsys)
    assert rc == 0 and err == ""
    assert Store(tmp_path / "copy.db").get_session("b" * 32)["title"] == "item 0"


BUNDLE_FILES = {
    "not json": (b"{not json", 2, "is not JSON"),
    "empty file": (b"", 2, "is not JSON"),
    "invalid utf-8": (b'{"format": "\xff\xfe"}', 2, "is not UTF-8 text"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, 2, "is not JSON"),
    "5000-digit number": (b'{"n": ' + b"1" * 5000 + b"}", 2, "is not JSON"),
    "json list": (b"[1, 2]", 2, "not a session bundle"),
    "json string": (b'"bundle"', 2, "not a session bundle"),
    "1e400 everywhere": (b'{"format": 1e400}', 2, "not a session bundle"),
}


@pytest.mark.parametrize("name", list(BUNDLE_FILES))
def test_unreadable_bundle_files(name, lab, capsys):
    from db.__main__ import main

    content, status, message = BUNDLE_FILES[name]
    path = lab["dir"] / "file.json"
    path.write_bytes(content)
    rc, err = run_main(main, ["import", "--db", lab["db"], path], capsys)
    assert_one_clear_line(rc, err, status, message)
    assert_db_intact(lab)


def test_import_refused_before_the_database_exists(lab, tmp_path, capsys):
    from db.__main__ import main

    b = copy.deepcopy(lab["bundle"])
    b["turns"][3]["token_ids"] = "abc"
    (tmp_path / "b.json").write_text(json.dumps(b))
    rc, err = run_main(main, ["import", "--db", tmp_path / "new.db", tmp_path / "b.json"], capsys)
    assert_one_clear_line(rc, err, 2, "turns[3].token_ids: expected a list of ints")
    assert not (tmp_path / "new.db").exists()


# ------------------------------------------------------------------ python -m db, other commands


def db_cases(lab):
    d, db = lab["dir"], lab["db"]
    good = d / "good.json"
    return {
        "import existing id": (["import", "--db", db, good], 1, f"session {lab['sid']} already exists"),
        "import missing file": (["import", "--db", db, d / "nope.json"], 2, "No such file"),
        "import a folder": (["import", "--db", db, d], 2, "Is a directory"),
        "import no bundle arg": (["import", "--db", db], 2, "the following arguments are required: bundle"),
        "import bad url": (["import", "--db", "nosuchdialect://x", good], 1, "cannot use the database URL"),
        "list missing db": (["list", "--db", d / "missing.db"], 1, "no database at"),
        "list bad url": (["list", "--db", "nosuchdialect://x"], 1, "cannot use the database URL"),
        "list not a database": (["list", "--db", good], 1, "is not a database file"),
        "list extra arg": (["list", "--db", db, "extra"], 2, "unrecognized arguments: extra"),
        "export bad format": (
            ["export", "--db", db, "--format", "xlsx", "--out", d / "o"],
            2,
            "invalid choice: 'xlsx'",
        ),
        "export no out": (["export", "--db", db, "--format", "csv"], 2, "the following arguments are required: --out"),
        "export unknown session": (
            ["export", "--db", db, "--format", "csv", "--out", d / "o", "--session", "nope"],
            1,
            "unknown session id 'nope'",
        ),
        "export traversal session": (
            ["export", "--db", db, "--format", "bundle", "--out", d / "o", "--session", "../../etc"],
            1,
            "unknown session id '../../etc'",
        ),
        "export unknown experiment": (
            ["export", "--db", db, "--format", "jsonl", "--out", d / "o", "--experiment", "nope"],
            1,
            "unknown experiment id 'nope'",
        ),
        "export out is a file": (["export", "--db", db, "--format", "csv", "--out", good], 2, "File exists"),
        "no command": ([], 2, "the following arguments are required: command"),
        "unknown command": (["drop"], 2, "invalid choice: 'drop'"),
    }


DB_CASE_NAMES = list(db_cases({"dir": Path("."), "db": Path("x"), "sid": "s"}))


@pytest.mark.parametrize("name", DB_CASE_NAMES)
def test_db_cli_mistakes(name, lab, capsys):
    from db.__main__ import main

    good = lab["dir"] / "good.json"
    b = copy.deepcopy(lab["bundle"])
    b["session"]["id"] = lab["sid"]
    good.write_text(json.dumps(b))
    argv, status, message = db_cases(lab)[name]
    rc, err = run_main(main, argv, capsys)
    assert_one_clear_line(rc, err, status, message)
    assert_db_intact(lab)


# ------------------------------------------------------------------ python -m engine

ENGINE_SPEC_CASES = [
    ("continuity:linkage=7", "linkage"),
    ("continuity:linkage=-0.1", "linkage"),
    ("continuity:linkage=abc", "linkage"),
    ("bogus", "unknown mechanism 'bogus'"),
    (":", "unknown mechanism ''"),
    ("", "empty arm spec"),
    ("continuity:foo=1", "unknown key 'foo'"),
    ("continuity:linkage", "is not key=value"),
    ("continuity:=1", "is not key=value"),
    ("observer:linkage=1", "observer takes no mechanism settings"),
    ("continuity:source=everything", "source"),
    ("observer:temperature=0", "temperature"),
    ("observer:temperature=99", "temperature"),
    ("observer:top_p=1.5", "top_p"),
    ("observer:seed=-1", "seed"),
    ("observer:seed=9223372036854775808", "seed"),
    ("observer:max_new_tokens=0", "max_new_tokens"),
    ("observer:greedy=maybe", "greedy"),
    ("neural_memory:persistent=-1", "neural_memory: persistent: input should be greater than or equal to 0"),
    ('neural_memory:persistent=4,persistent_text=" "', "neural_memory: persistent_text is empty"),
    ('neural_memory:persistent_text="abc"', "but persistent=0: set persistent=P (P >= 1)"),
    ("neural_memory:memory=gru", "memory: input should be 'linear' or 'mlp'"),
    ("partial_attention:lora_rank=-2", "lora_rank"),
    ("partial_attention:linkage=0.5,spe=true", "spe edits the model's own attention mask / positions"),
    ("partial_attention:linkage=0.5,bidirectional=true", "bidirectional edits the model's own attention mask"),
]


@pytest.mark.parametrize("spec, message", ENGINE_SPEC_CASES)
def test_engine_bad_arm(spec, message, capsys):
    from engine.__main__ import main

    rc, err = run_main(main, ["generate", "--prompt", "Hi", "--arm", spec, "--max-new-tokens", "2"], capsys)
    assert_one_clear_line(rc, err, 2, message)


ENGINE_CASES = {
    "seed -5": (["generate", "--prompt", "Hi", "--arm", "observer", "--seed", "-5"], "seed: input should be greater"),
    "seed 2**63": (
        ["generate", "--prompt", "Hi", "--arm", "observer", "--seed", str(2**63)],
        "seed: input should be less",
    ),
    "seed 10**30": (["generate", "--prompt", "Hi", "--arm", "continuity:linkage=1", "--seed", str(10**30)], "seed"),
    "seed abc": (["generate", "--prompt", "Hi", "--arm", "observer", "--seed", "abc"], "invalid int value: 'abc'"),
    "max tokens 0": (
        ["generate", "--prompt", "Hi", "--arm", "observer", "--max-new-tokens", "0"],
        "--max-new-tokens must be at least 1",
    ),
    "max tokens -3": (
        ["generate", "--prompt", "Hi", "--arm", "observer", "--max-new-tokens", "-3"],
        "--max-new-tokens must be at least 1",
    ),
    "max tokens x": (
        ["generate", "--prompt", "Hi", "--arm", "observer", "--max-new-tokens", "x"],
        "invalid int value: 'x'",
    ),
    "empty prompt": (["generate", "--prompt", "", "--arm", "observer"], "--prompt is empty"),
    "blank prompt": (["generate", "--prompt", "  \n ", "--arm", "observer"], "--prompt is empty"),
    "invalid utf-8 prompt": (
        ["generate", "--prompt", "caf\udce9", "--arm", "observer"],
        "--prompt is not valid text: character 4 is a lone surrogate",
    ),
    "lone surrogate prompt": (["generate", "--prompt", "a\ud800b", "--arm", "observer"], "--prompt is not valid text"),
    "huge prompt": (
        ["generate", "--prompt", "x" * 20_001, "--arm", "observer"],
        "--prompt is 20,001 characters; the limit is 20,000",
    ),
    "invalid utf-8 system": (
        ["generate", "--prompt", "Hi", "--system", "\udcff", "--arm", "observer"],
        "--system is not valid text",
    ),
    "probe invalid prompt": (
        ["probe", "--prompt", "\udcff", "--arm", "continuity:linkage=1"],
        "--prompt is not valid text",
    ),
    "probe bad arm": (["probe", "--prompt", "Hi", "--arm", "continuity:linkage=7"], "linkage"),
    "missing prompt": (["generate", "--arm", "observer"], "the following arguments are required: --prompt"),
    "missing arm": (["generate", "--prompt", "Hi"], "the following arguments are required: --arm"),
    "unknown flag": (["generate", "--prompt", "Hi", "--arm", "observer", "--bogus"], "unrecognized arguments: --bogus"),
    "unknown command": (["fly"], "invalid choice: 'fly'"),
    "train missing config": (["train", "/no/such/config.yaml"], "config file /no/such/config.yaml does not exist"),
    "train config not yaml": (["train", "README.md"], "README.md: not valid YAML at line"),
    "distill missing document": (
        ["distill", "/no/such/doc.txt", "--out", "/tmp/x.safetensors"],
        "document /no/such/doc.txt does not exist",
    ),
    "distill bad arm": (
        ["distill", "README.md", "--out", "/tmp/x.safetensors", "--arm", "memory_bank:slots=0"],
        "slots",
    ),
    "no command": ([], "the following arguments are required: command"),
    "missing model": (
        ["generate", "--prompt", "Hi", "--arm", "observer", "--model", "/no/such/model"],
        "model not found",
    ),
    "odd model id": (["generate", "--prompt", "Hi", "--arm", "observer", "--model", "a/b/c"], "model not found"),
    "bad dtype": (["generate", "--prompt", "Hi", "--arm", "observer", "--dtype", "float8"], "unknown dtype 'float8'"),
    "persistent text too short": (
        [
            "generate",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--arm",
            'neural_memory:linkage=1,persistent=50,persistent_text="two words"',
        ],
        "persistent_text has 2 tokens, fewer than persistent=50",
    ),
    "missing weights file": (
        ["generate", "--prompt", "Hi", "--arm", 'neural_memory:weights="/no/such.safetensors"'],
        "weights file /no/such.safetensors does not exist",
    ),
}


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_engine_cli_mistakes(name, capsys):
    from engine.__main__ import main

    argv, message = ENGINE_CASES[name]
    rc, err = run_main(main, argv, capsys)
    assert_one_clear_line(rc, err, 2, message)


@pytest.fixture(scope="module")
def corrupt_model(tmp_path_factory):
    """The embedded model's config and tokenizer, with a model.safetensors that is not one."""
    from engine.model import ensure_embedded_cache

    src = ensure_embedded_cache(verbose=False)
    out = tmp_path_factory.mktemp("corrupt-model")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "lab_identity.json":
            shutil.copy(f, out / f.name)
    (out / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    return out


def test_corrupt_safetensors_is_one_line(corrupt_model, capsys):
    from engine.__main__ import main

    rc, err = run_main(main, ["generate", "--prompt", "Hi", "--arm", "observer", "--model", corrupt_model], capsys)
    assert_one_clear_line(rc, err, 2, f"could not load model '{corrupt_model}': SafetensorError")


def test_empty_model_folder_is_one_line(tmp_path, capsys):
    from engine.__main__ import main

    rc, err = run_main(main, ["generate", "--prompt", "Hi", "--arm", "observer", "--model", tmp_path], capsys)
    assert_one_clear_line(rc, err, 2, f"could not load model '{tmp_path}'")


def test_layer_that_does_not_exist_is_one_line(capsys):
    from engine.__main__ import main

    rc, err = run_main(main, ["generate", "--prompt", "Hi", "--arm", "continuity:layers=99", "--json"], capsys)
    assert_one_clear_line(rc, err, 2, "layer 99 does not exist")


# ------------------------------------------------------------------ python -m experiments


def experiment_cases(d, db):
    bad = d / "protocols"
    return {
        "no protocol": (["run", "--arm", "observer"], 2, "give a protocol"),
        "unknown protocol": (["run", "no_such_protocol", "--arm", "observer"], 2, "no_such_protocol"),
        "missing protocol file": (["run", bad / "missing.yaml", "--arm", "observer"], 2, "expected a protocol file at"),
        "protocol not a mapping": (["run", bad / "list.yaml", "--arm", "observer"], 2, "expected a mapping of keys"),
        "protocol yaml syntax": (["run", bad / "syntax.yaml", "--arm", "observer"], 2, "syntax.yaml"),
        "protocol invalid utf-8": (
            ["run", bad / "binary.yaml", "--arm", "observer"],
            2,
            "expected a readable UTF-8 text file",
        ),
        "no arms": (["run", "are_you_sure"], 2, "give at least one --arm"),
        "bad arm": (["run", "are_you_sure", "--arm", "bogus"], 2, "unknown mechanism 'bogus'"),
        "bad linkage": (["run", "are_you_sure", "--arm", "continuity:linkage=7"], 2, "linkage"),
        "arm seed -1": (["run", "are_you_sure", "--arm", "observer:seed=-1"], 2, "seed"),
        "seeds 0": (["run", "are_you_sure", "--arm", "observer", "--seeds", "0"], 2, "--seeds must be at least 1"),
        "items 0": (["run", "are_you_sure", "--arm", "observer", "--items", "0"], 2, "--items must be at least 1"),
        "max tokens 0": (
            ["run", "are_you_sure", "--arm", "observer", "--max-new-tokens", "0"],
            2,
            "--max-new-tokens must be at least 1",
        ),
        "seeds x": (["run", "are_you_sure", "--arm", "observer", "--seeds", "x"], 2, "invalid int value: 'x'"),
        "missing model": (
            ["run", "are_you_sure", "--arm", "observer", "--items", "1", "--db", db, "--model", "/no/such/model"],
            2,
            "model not found",
        ),
        "ray address refused": (
            ["run", "are_you_sure", "--arm", "observer", "--items", "1", "--db", db, "--ray", "127.0.0.1:1"],
            2,
            "--ray 127.0.0.1:1: no Ray cluster answers there",
        ),
        "ray port not a number": (
            ["run", "are_you_sure", "--arm", "observer", "--db", db, "--ray", "ray://head:x"],
            2,
            "the port 'x' is not a number",
        ),
        "resume unknown run": (["run", "--resume", "nope", "--db", db], 1, "unknown experiment id 'nope'"),
        "list missing db": (["list", "--db", d / "missing.db"], 1, "no database at"),
        "list bad url": (["list", "--db", "nosuchdialect://x"], 1, "cannot use the database URL"),
        "summary unknown run": (["summary", "nope", "--db", db], 1, "unknown experiment id 'nope'"),
        "summary no run id": (["summary", "--db", db], 2, "the following arguments are required: run_id"),
        "unknown command": (["rerun"], 2, "invalid choice: 'rerun'"),
        "no command": ([], 2, "the following arguments are required: command"),
    }


EXPERIMENT_CASE_NAMES = list(experiment_cases(Path("."), Path("x")))


@pytest.mark.parametrize("name", EXPERIMENT_CASE_NAMES)
def test_experiments_cli_mistakes(name, lab, capsys):
    from experiments.__main__ import main

    bad = lab["dir"] / "protocols"
    bad.mkdir(exist_ok=True)
    (bad / "list.yaml").write_text("- a\n- b\n")
    (bad / "syntax.yaml").write_text("name: [unclosed\n")
    (bad / "binary.yaml").write_bytes(b"name: \xff\xfe\n")
    argv, status, message = experiment_cases(lab["dir"], lab["db"])[name]
    rc, err = run_main(main, argv, capsys)
    assert_one_clear_line(rc, err, status, message)
    assert_db_intact(lab)


# ------------------------------------------------------------------ real processes: the wiring


def real(module, *args):
    env = {k: v for k, v in os.environ.items() if k != "LAB_DB"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, timeout=240)


def assert_real_one_line(r, status, message):
    err = r.stderr.decode("utf-8", "replace")
    assert_one_clear_line(r.returncode, err, status, message)


@pytest.mark.slow
def test_invalid_utf8_bytes_in_argv_of_a_real_process():
    r = real("engine", "generate", "--prompt", b"caf\xe9 au lait", "--arm", "observer")
    assert_real_one_line(r, 2, "--prompt is not valid text: character 4 is a lone surrogate")


@pytest.mark.slow
def test_negative_seed_in_a_real_process():
    assert_real_one_line(real("engine", "generate", "--prompt", "Hi", "--arm", "observer", "--seed", "-5"), 2, "seed")


@pytest.mark.slow
def test_corrupt_model_in_a_real_process(corrupt_model):
    r = real("engine", "generate", "--prompt", "Hi", "--arm", "observer", "--model", str(corrupt_model))
    assert_real_one_line(r, 2, "SafetensorError")


@pytest.mark.slow
def test_bad_bundle_in_a_real_process(lab, tmp_path):
    b = copy.deepcopy(lab["bundle"])
    b["session"]["id"] = "../../../../tmp/evil-session"
    (tmp_path / "evil.json").write_text(json.dumps(b))
    r = real("db", "import", "--db", str(lab["db"]), str(tmp_path / "evil.json"))
    assert_real_one_line(r, 2, "invalid session bundle: session.id: expected an id")
    assert_db_intact(lab)


@pytest.mark.slow
def test_bad_experiment_in_a_real_process():
    assert_real_one_line(
        real("experiments", "run", "are_you_sure", "--arm", "observer", "--seeds", "0"), 2, "--seeds must be at least 1"
    )


# ------------------------------------------------------------------ the lab's HTTP API
# One real lab server for the module (the embedded model, a fresh SQLite file), called over plain
# HTTP (Gradio's /gradio_api/call/<name> routes) so that anything a client can put in JSON reaches it:
# lone surrogates ("\ud800" escapes), NaN and Infinity, strings where numbers belong. Each case: one
# line naming the problem, no traceback in the server's output, the server answering the next request,
# and the database intact with nothing added or lost.


def _api_session(store, lm, blind=False):
    from engine import Dialogue, parse_arm
    from experiments.record import SessionRecorder

    d = Dialogue(lm, [parse_arm("observer"), parse_arm("continuity:linkage=1")])
    rec = SessionRecorder(store, lm, d, title="api battery", blind=blind, pane_order=[1, 0] if blind else None)
    rec.log("Hi", d.send("Hi", max_new_tokens=3))
    return rec.session_id


def _serve_lab_api(embedded, folder, db_url):
    from conftest import serve_lab
    from gradio_client import Client

    store = Store(db_url)
    sid, blind_sid = _api_session(store, embedded), _api_session(store, embedded, blind=True)
    url, demo = serve_lab(store, embedded, captures_dir=str(folder / "captures"))
    info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    return {"url": url, "db": db_url, "store": store, "sid": sid, "blind": blind_sid, "info": info}, demo


@pytest.fixture(scope="module")
def lab_api(embedded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lab-api")
    api, demo = _serve_lab_api(embedded, folder, f"sqlite:///{folder / 'lab.db'}")
    yield api
    demo.close()
    api["store"].close()


@pytest.fixture(scope="module")
def lab_api_pg(embedded, tmp_path_factory, pg_server):
    """The same lab on a PostgreSQL database: the battery's writes run on both backends."""
    api, demo = _serve_lab_api(embedded, tmp_path_factory.mktemp("lab-api-pg"), pg_server.create_database("lab_api"))
    yield api
    demo.close()
    api["store"].close()


LAB_APIS = ["lab_api", "lab_api_pg"]


def api_call(lab_api, name, values=(), session_hash=None, **named) -> tuple[str, list | None]:
    """POST the endpoint's inputs (its defaults, overridden by name or position) as raw JSON text;
    returns ('error', message) or ('complete', outputs)."""
    import httpx

    params = lab_api["info"][f"/{name}"]["parameters"]
    data = [p.get("parameter_default") for p in params]
    for i, v in enumerate(values):
        data[i] = v
    for k, v in named.items():
        data[[p["parameter_name"] for p in params].index(k)] = v
    body = json.dumps({"data": data, "session_hash": session_hash})  # NaN -> NaN, "\ud800" -> its escape
    base = f"{lab_api['url']}gradio_api/call/{name}"
    r = httpx.post(base, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    events = httpx.get(f"{base}/{r.json()['event_id']}", timeout=300).text.splitlines()
    kinds = [line.split(":", 1)[1].strip() for line in events if line.startswith("event:")]
    last = json.loads([line for line in events if line.startswith("data:")][-1][5:])
    if kinds[-1] == "error":
        return "error", last["error"] if isinstance(last, dict) else str(last)
    return "complete", last


def _snapshot(db) -> tuple:
    """Row counts, read past the lab's own Store (on SQLite after an integrity check of the file)."""
    tables = ("sessions", "arms", "turns", "annotations", "captures")
    if db.startswith("sqlite:///"):
        with sqlite3.connect(db.removeprefix("sqlite:///")) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            return tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)
    import sqlalchemy as sa

    engine = sa.create_engine(db)
    try:
        with engine.connect() as con:
            return tuple(con.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in tables)
    finally:
        engine.dispose()


def _message_of(name, kind, out) -> str:
    """The one line the client sees: the error, or the status/error output that names the problem."""
    if kind == "error":
        return out
    if name == "send":
        from lab.arena import _ALL_OUTPUT_NAMES

        named = dict(zip(_ALL_OUTPUT_NAMES, out))
        texts = [named["status"]] + [named[k] for k in named if k.endswith("_error")]
    else:
        texts = out if isinstance(out, list) else [out]
    import html

    shown = [t for t in texts if isinstance(t, str) and ("⚠" in t or t.startswith("**Cannot"))]
    return html.unescape(" | ".join(shown))  # as the browser shows it


S = "arm1_max_new_tokens"
LAB_API_CASES = {
    # the message
    "empty message": ("send", {"message": ""}, "The message is empty"),
    "whitespace message": ("send", {"message": " \n\t "}, "The message is empty"),
    "25,000-character message": ("send", {"message": "x" * 25_000}, "25,000 characters; the limit is 20,000"),
    "lone surrogate message": ("send", {"message": "caf\ud800"}, "a lone surrogate"),
    "NUL in message": ("send", {"message": "a\x00b"}, "NUL character"),
    "null message": ("send", {"message": None}, "The message is empty"),
    # the session's own fields
    "lone surrogate system prompt": (
        "send",
        {"message": "Hi", "system_prompt": "a\ud800"},
        "the system prompt is not valid text",
    ),
    "title too long": ("send", {"message": "Hi", "title": "t" * 600}, "title: at most 500 characters"),
    "annotator too long": ("send", {"message": "Hi", "annotator": "a" * 300}, "annotator: at most 200 characters"),
    # arm settings
    "linkage -0.1": (
        "send",
        {"message": "Hi", "arm2_continuity_linkage": -0.1},
        "linkage: input should be greater than or equal to 0",
    ),
    "linkage 1.5": (
        "send",
        {"message": "Hi", "arm2_continuity_linkage": 1.5},
        "linkage: input should be less than or equal to 1",
    ),
    "linkage NaN": (
        "send",
        {"message": "Hi", "arm2_continuity_linkage": float("nan")},
        "linkage must be a finite number",
    ),
    "linkage Infinity": (
        "send",
        {"message": "Hi", "arm2_continuity_linkage": float("inf")},
        "linkage must be a finite number",
    ),
    "linkage abc": ("send", {"message": "Hi", "arm2_continuity_linkage": "abc"}, "linkage must be a number"),
    "unknown mechanism": (
        "send",
        {"message": "Hi", "arm2_mechanism": "telepathy"},
        "Mechanism: 'telepathy' is not one of the choices",
    ),
    "5 arms": ("send", {"message": "Hi", "n_arms": "5"}, "Arms: '5' is not one of the choices"),
    "layer 99": ("send", {"message": "Hi", "arm2_continuity_layers": "99"}, "layer 99 does not exist"),
    "layer -1": ("send", {"message": "Hi", "arm2_continuity_layers": "-1"}, "layer -1 does not exist"),
    "layers abc": ("send", {"message": "Hi", "arm2_continuity_layers": "abc"}, "'abc' is not a whole number"),
    "layers repeat": ("send", {"message": "Hi", "arm2_continuity_layers": "15/15"}, "layers repeat"),
    "unknown source": ("send", {"message": "Hi", "arm2_continuity_source": "everything"}, "is not one of the choices"),
    "seed 1e20": ("send", {"message": "Hi", "arm1_seed": 1e20}, "seed is too large"),
    "seed -1": ("send", {"message": "Hi", "arm1_seed": -1}, "seed: input should be greater than or equal to 0"),
    "seed 2.5": ("send", {"message": "Hi", "arm1_seed": 2.5}, "seed: input should be a valid integer"),
    "max_new_tokens 10**9": (
        "send",
        {"message": "Hi", S: 10**9},
        "max_new_tokens: input should be less than or equal to",
    ),
    "max_new_tokens 1e30": ("send", {"message": "Hi", S: 1e30}, "max_new_tokens is too large"),
    "max_new_tokens 0": ("send", {"message": "Hi", S: 0}, "max_new_tokens"),
    "temperature -1": (
        "send",
        {"message": "Hi", "arm1_greedy": False, "arm1_temperature": -1},
        "temperature: input should be greater than 0",
    ),
    "top_p 1.5": (
        "send",
        {"message": "Hi", "arm1_greedy": False, "arm1_top_p": 1.5},
        "top_p: input should be less than or equal to 1",
    ),
    # sessions, exports
    "open unknown session": ("open_session", {"sid": "no-such-session"}, "unknown session id 'no-such-session'"),
    "open lone surrogate id": ("open_session", {"sid": "\ud800"}, "unknown session id"),
    "open 5,000-character id": ("open_session", {"sid": "a" * 5000}, "unknown session id"),
    "open path as id": ("open_session", {"sid": "../../../etc/passwd"}, "unknown session id '../../../etc/passwd'"),
    "continue unknown session": (
        "continue_session",
        {"session_id": "no-such-session"},
        "unknown session id 'no-such-session'",
    ),
    "continue lone surrogate id": ("continue_session", {"session_id": "x\ud800"}, "unknown session id"),
    "reveal unknown session": ("reveal_session", {"sid": "no-such-session"}, "unknown session id 'no-such-session'"),
    "reveal a session that is not blind": ("reveal_session", {"sid": "{sid}"}, "This session is not blind"),
    "export unknown session": ("export", {"sid": "no-such-session"}, "Export failed: unknown session id"),
    "export unknown format": ("export", {"sid": "{sid}", "fmt_label": "XLSX"}, "'XLSX' is not one of the choices"),
    "list unknown kind": ("list_sessions", {"k": "secret"}, "Kind: 'secret' is not one of the choices"),
    # inspect
    "inspect unknown session": ("inspect_show", {"sid": "no-such-session"}, "unknown session id 'no-such-session'"),
    "inspect arm 7": ("inspect_show", {"sid": "{sid}", "arm_i": 7}, "there is no arm 7"),
    "inspect turn -1": ("inspect_show", {"sid": "{sid}", "turn_i": -1}, "there is no turn -1"),
    "inspect turn 1e20": ("inspect_show", {"sid": "{sid}", "turn_i": 1e20}, "there is no turn"),
    "inspect arm NaN": ("inspect_show", {"sid": "{sid}", "arm_i": float("nan")}, "arm must be a whole number, got nan"),
    "inspect turn 2.5": ("inspect_show", {"sid": "{sid}", "turn_i": 2.5}, "turn must be a whole number, got 2.5"),
    "inspect unknown head": ("inspect_show", {"sid": "{sid}", "head_v": "99"}, "head: '99' is not one of the choices"),
    "inspect a blind session": ("inspect_show", {"sid": "{blind}", "arm_i": 0}, "blind session"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAB_API_CASES))
def test_lab_api_bad_input(name, lab_api, capfd):
    endpoint, named, message = LAB_API_CASES[name]
    named = {
        k: v.format(sid=lab_api["sid"], blind=lab_api["blind"]) if isinstance(v, str) and "{" in v else v
        for k, v in named.items()
    }
    before = _snapshot(lab_api["db"])
    capfd.readouterr()
    kind, out = api_call(lab_api, endpoint, **named)
    text = _message_of(endpoint, kind, out)
    assert message in text, (kind, text or str(out)[:500])
    assert "\n" not in text.strip() and "Traceback" not in text, text
    server = capfd.readouterr()
    assert "Traceback" not in server.err + server.out, server.err[-2000:]
    kind, table = api_call(lab_api, "list_sessions", k="all")  # still serving
    assert kind == "complete" and {lab_api["sid"], lab_api["blind"]} <= {r[0] for r in table[0]["data"]}
    assert _snapshot(lab_api["db"]) == before  # integrity ok, nothing written, nothing lost


@pytest.mark.slow
@pytest.mark.parametrize("api", LAB_APIS)
@pytest.mark.parametrize(
    "conf,message",
    [
        (7.5, "confidence"),
        (-1, "confidence"),
        (float("nan"), "confidence"),
        ("high", "confidence must be a number from 0 to 1, got 'high'"),
    ],
)
def test_lab_api_bad_annotation(conf, message, api, request, capfd):
    """A bad confidence on a real reply (a tab with a logged turn): refused, named, nothing saved."""
    lab_api = request.getfixturevalue(api)
    h = f"battery-{abs(hash(str(conf)))}"
    kind, out = api_call(lab_api, "send", session_hash=h, message="Hi", arm1_max_new_tokens=2, arm2_max_new_tokens=2)
    assert kind == "complete"
    before = _snapshot(lab_api["db"])
    capfd.readouterr()
    kind, out = api_call(lab_api, "annotate_arm_1", ["ana", None, "maintained", "", conf], session_hash=h)
    text = out if kind == "error" else " | ".join(o for o in out if isinstance(o, str))
    assert message in text and "Not saved" in text and "\n" not in text.strip(), text
    assert "Traceback" not in capfd.readouterr().err
    assert _snapshot(lab_api["db"]) == before
    kind, out = api_call(lab_api, "annotate_arm_1", ["ana", None, "maintained", "", 0.5], session_hash=h)
    assert kind == "complete" and "Saved" in out[0], out
    assert _snapshot(lab_api["db"])[3] == before[3] + 1


@pytest.mark.slow
@pytest.mark.parametrize("api", LAB_APIS)
def test_lab_api_still_generates_after_the_battery(api, request):
    lab_api = request.getfixturevalue(api)
    from lab.arena import _ALL_OUTPUT_NAMES

    before = _snapshot(lab_api["db"])
    kind, out = api_call(lab_api, "send", message="Still there?", arm1_max_new_tokens=2, arm2_max_new_tokens=2)
    assert kind == "complete" and "Turn 1 logged" in dict(zip(_ALL_OUTPUT_NAMES, out))["status"]
    after = _snapshot(lab_api["db"])
    assert after[0] == before[0] + 1 and after[2] == before[2] + 4  # 1 session, 2 arms x (user, assistant)
