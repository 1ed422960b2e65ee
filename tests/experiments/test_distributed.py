"""Sweeps on Ray: the same tokens as the plain runner, one transaction per dialogue written by the
driver only, and a killed actor loses and duplicates nothing. Two local actors on the embedded
model, one Ray instance shared by these tests (conftest.ray_cluster)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from db import Store
from experiments.distributed import run_protocol_ray
from experiments.runner import completed_keys, run_protocol
from tests.experiments.test_runner import ARMS, EXPECTED, ITEMS, SEEDS, TOKENS, counts, tokens_by_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
RUN = dict(seeds=SEEDS, items=ITEMS, max_new_tokens=TOKENS)


@pytest.fixture(scope="module")
def plain_run(embedded, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("plain") / "plain.db")
    eid = run_protocol(store, embedded, "are_you_sure", ARMS, **RUN)
    return store, eid


def rows_without_timing(store, eid) -> dict:
    """Everything of a run but ids and clocks: texts, tokens, settings, scores, summaries."""
    out = {}
    for s in store.list_sessions(experiment_id=eid):
        full = store.get_session(s["id"])
        arms = [{k: a[k] for k in ("index", "label", "spec", "settings", "seed")} for a in full["arms"]]
        meta = {k: v for k, v in s["meta"].items() if k != "finished_at"}
        turns = [
            {
                k: t[k]
                for k in (
                    "arm_index",
                    "turn_index",
                    "role",
                    "text",
                    "token_ids",
                    "n_tokens",
                    "finish_reason",
                    "gen_settings",
                    "error",
                )
            }
            for t in store.get_turns(s["id"])
        ]
        scores = [
            (x["arm_index"], x["turn_index"], x["scorer"], x["label"], x["value"], x["data"])
            for x in store.get_scores(session_id=s["id"])
        ]
        out[(s["item_key"], s["seed"])] = (s["title"], s["system_prompt"], s["model"], arms, meta, turns, scores)
    return out


def test_ray_run_matches_the_plain_run_and_resumes(plain_run, ray_cluster, tmp_path):
    plain_store, plain_eid = plain_run
    store = Store(tmp_path / "ray.db")
    stop = threading.Event()
    seen = []

    def stop_after_first(done, total, info):
        seen.append((done, total, info["event"], info.get("actor_pid")))
        if info["event"] == "done":
            stop.set()  # the lab's Stop button: in-flight dialogues are dropped, not half written

    eid = run_protocol_ray(store, "are_you_sure", ARMS, **RUN, progress=stop_after_first, stop_event=stop, actors=2)
    assert store.get_experiment(eid)["status"] == "interrupted"
    assert seen[0][:3] == (0, 4, "start") and seen[1][:3] == (1, 4, "done")
    assert len(completed_keys(store, eid)) == counts(store, eid)["sessions"] >= 1  # only whole dialogues

    progress = []
    run_protocol_ray(
        store,
        "are_you_sure",
        ARMS,
        **RUN,
        experiment_id=eid,
        actors=2,
        progress=lambda d, t, i: progress.append((d, t, i["event"], i.get("actor_pid"))),
    )
    assert store.get_experiment(eid)["status"] == "finished"
    assert progress[-1][:3] == (4, 4, "done")
    assert len({p[3] for p in progress[1:]}) == 2  # both actors played dialogues
    c = counts(store, eid)
    assert c["sessions"] == EXPECTED["sessions"]
    assert c["turns"] == c["unique_turns"] == EXPECTED["turns"]
    assert c["scores"] == c["unique_scores"] == EXPECTED["scores"]
    # same seeds, same model: token for token (and text, settings, scores) what the plain runner wrote
    assert tokens_by_key(store, eid) == tokens_by_key(plain_store, plain_eid)
    assert rows_without_timing(store, eid) == rows_without_timing(plain_store, plain_eid)


def test_killed_actor_loses_and_duplicates_nothing_on_postgresql(plain_run, ray_cluster, pg_server, embedded):
    """An actor is SIGKILLed right after delivering a dialogue, while it plays its next one; meanwhile
    the real lab server, on the same PostgreSQL database, serves three researchers' chats (gradio_client
    over HTTP, two turns each). Both writers' rows are all there, each exactly once."""
    from gradio_client import Client

    from tests.conftest import serve_lab
    from tests.lab.test_lab_api import outputs

    plain_store, plain_eid = plain_run
    url = pg_server.create_database("ray_kill")
    store = Store(url)
    killed = []

    def kill_first_deliverer(done, total, info):
        if info["event"] == "done" and not killed:
            killed.append(info["actor_pid"])
            os.kill(info["actor_pid"], signal.SIGKILL)

    lab_store = Store(url)
    lab_url, demo = serve_lab(lab_store, embedded)
    statuses, errors = [], []

    def researchers():
        try:
            for k in range(3):  # one client each: its own browser tab, so its own lab session
                c = Client(lab_url, verbose=False)
                for message in (f"Is {k} + {k} equal to {2 * k}?", "Are you sure?"):
                    out = c.predict(message, api_name="/send", arm1_max_new_tokens=4, arm2_max_new_tokens=4)
                    statuses.append(outputs(out)["status"])
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    lab = threading.Thread(target=researchers)
    lab.start()
    try:
        eid = run_protocol_ray(store, "are_you_sure", ARMS, **RUN, progress=kill_first_deliverer, actors=2)
        lab.join(300)
    finally:
        demo.close()
    assert killed and errors == [] and not lab.is_alive()
    assert len(statuses) == 6 and all("logged" in s for s in statuses), statuses
    assert store.get_experiment(eid)["status"] == "finished"
    c = counts(store, eid)
    assert c["sessions"] == EXPECTED["sessions"]
    assert c["turns"] == c["unique_turns"] == EXPECTED["turns"]
    assert c["scores"] == c["unique_scores"] == EXPECTED["scores"]
    assert tokens_by_key(store, eid) == tokens_by_key(plain_store, plain_eid)
    lab_sessions = store.list_sessions(kind="lab")
    assert len(lab_sessions) == 3
    for s in lab_sessions:  # 2 turns x 2 arms x (user, assistant), each once
        turns = store.get_turns(s["id"])
        assert len(turns) == len({(t["arm_index"], t["turn_index"], t["role"]) for t in turns}) == 8
        assert all(t["text"] for t in turns if t["role"] == "assistant")
    store.close()
    lab_store.close()
    pg_server.drop_database("ray_kill")


def test_cli_run_with_ray(ray_cluster, tmp_path, capsys):
    from experiments.__main__ import main

    db = tmp_path / "cli.db"
    argv = [
        "run",
        "are_you_sure",
        "--arm",
        "observer",
        "--items",
        "2",
        "--max-new-tokens",
        "4",
        "--db",
        str(db),
        "--ray",
        "--actors",
        "2",
        "--json",
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    store = Store(db)
    [exp] = store.list_experiments()
    assert exp["status"] == "finished" and exp["n_sessions"] == 2 and exp["id"] in out.out
    assert main(argv) == 0  # the same command again: finished, shown, not run twice
    assert "already finished" in capsys.readouterr().err and store.list_experiments()[0]["n_sessions"] == 2
    assert main(["run", "are_you_sure", "--arm", "observer", "--actors", "2", "--db", str(db)]) == 2
    assert "--actors needs --ray" in capsys.readouterr().err
