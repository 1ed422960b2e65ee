"""The lab's real server, driven through its named API endpoints with gradio_client.

One in-process server (launch(..., prevent_thread_lock=True)) on a free port, the embedded model,
a fresh SQLite file; the Store opened on the same file checks what was logged.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TOKENS = 8  # keep generation short on a CPU


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def outputs(result) -> dict:
    from lab.arena import OUTPUT_NAMES

    assert len(result) == len(OUTPUT_NAMES)
    return dict(zip(OUTPUT_NAMES, result))


def chat_texts(chat) -> list[tuple[str, str]]:
    """[(role, text)] from a Chatbot value as the client returns it."""
    out = []
    for m in chat or []:
        c = m["content"]
        text = "".join(part.get("text", "") for part in c) if isinstance(c, list) else str(c)
        out.append((m["role"], text))
    return out


def test_api_names(server):
    info = client(server[0]).view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in (
        "/send",
        "/regenerate",
        "/stop_all",
        "/stop_arm_1",
        "/new_session",
        "/reveal",
        "/annotate_arm_1",
        "/list_sessions",
        "/open_session",
        "/export",
    ):
        assert name in info, name
    params = [p["parameter_name"] for p in info["/send"]["parameters"]]
    assert params[:3] == ["message", "n_arms", "blind"] and "arm2_continuity_layers" in params
    assert "arm2_mechanism" in params and "arm2_max_new_tokens" in params and "window" in params


def test_send_logs_both_arms_and_annotate(server):
    from db import Store

    url, db_file = server
    c = client(url)
    out = outputs(
        c.predict(
            "Is the sky green?",
            api_name="/send",
            annotator="ana",
            arm1_max_new_tokens=TOKENS,
            arm2_max_new_tokens=TOKENS,
        )
    )
    assert "logged" in out["status"], out["status"]
    for arm in (1, 2):
        msgs = chat_texts(out[f"arm{arm}_chat"])
        assert [r for r, _ in msgs] == ["user", "assistant"]
        assert msgs[0][1] == "Is the sky green?"
        assert msgs[1][1].split("<sub>")[0].strip(), f"arm {arm} answered nothing"
    assert "observer" in out["arm1_header"] and "λ=1" in out["arm2_header"]

    with Store(f"sqlite:///{db_file}") as store:
        sessions = store.list_sessions(kind="lab")
        s = store.get_session(sessions[0]["id"])
        assert [a["label"] for a in s["arms"]] == ["observer", "continuity λ=1"]
        turns = store.get_turns(s["id"])
        assert {(t["arm_index"], t["role"]) for t in turns} == {
            (0, "user"),
            (0, "assistant"),
            (1, "user"),
            (1, "assistant"),
        }
        assert all(t["text"] for t in turns)

    saved, progress = c.predict("ana", 0, "initial stance", "says green", 0.9, api_name="/annotate_arm_2")
    assert "initial stance" in saved and "ana" in saved
    assert "1 of 2" in progress and "ana" in progress
    refused, _ = c.predict("", 0, "maintained", "", 0.5, api_name="/annotate_arm_1")
    assert "Annotator" in refused
    refused, _ = c.predict("ana", 0, "maintained", "", 7, api_name="/annotate_arm_1")  # names the field
    assert "confidence" in refused and "between 0 and 1" in refused, refused
    with Store(f"sqlite:///{db_file}") as store:
        anns = store.latest_annotations(s["id"])
        assert [(a["arm_index"], a["stance_label"], a["annotator"]) for a in anns] == [(1, "initial stance", "ana")]

    # the same client continues the same session: a second turn, then regenerate it
    out = outputs(c.predict("Are you sure?", api_name="/send"))  # settings are fixed: the first turn's still apply
    assert "Turn 2 logged" in out["status"]
    assert len(chat_texts(out["arm1_chat"])) == 4
    out = outputs(c.predict(api_name="/regenerate"))
    assert "Turn 2 logged" in out["status"], out["status"]
    with Store(f"sqlite:///{db_file}") as store:
        turns = store.get_turns(s["id"])
        assert sorted({t["turn_index"] for t in turns}) == [0, 1]
        assert len(turns) == 8  # 2 turns x 2 arms x (user, assistant): the old turn 2 was replaced
        assert store.latest_annotations(s["id"])  # the first turn's label survives

    out = outputs(c.predict(api_name="/new_session"))
    assert out["arm1_chat"] == [] and "New session" in out["status"]


def test_bad_input_is_refused_and_server_stays_up(server):
    from db import Store

    url, db_file = server
    c = client(url)
    with Store(f"sqlite:///{db_file}") as store:
        before = len(store.list_sessions())
    out = outputs(c.predict("   ", api_name="/send"))
    assert "empty" in out["status"] and "nothing was sent" in out["status"]

    out = outputs(c.predict("hello", api_name="/send", arm2_continuity_layers="99"))
    assert "Not sent" in out["status"]
    assert "layer 99 does not exist" in out["arm2_error"] and out["arm1_error"] == ""
    out = outputs(c.predict("hello", api_name="/send", arm2_continuity_layers="15/15"))
    assert "layers repeat" in out["arm2_error"]
    # range errors name the field (the settings model's check, not Gradio's anonymous one)
    out = outputs(c.predict("hello", api_name="/send", arm2_continuity_linkage=7))
    assert "linkage" in out["arm2_error"] and "less than or equal to 1" in out["arm2_error"], out["arm2_error"]
    out = outputs(c.predict("hello", api_name="/send", arm1_seed=1e20))
    assert "seed is too large" in out["arm1_error"], out["arm1_error"]
    out = outputs(c.predict("hello", api_name="/send", arm1_max_new_tokens=0))
    assert "max_new_tokens" in out["arm1_error"]

    out = outputs(c.predict("x" * 20_001, api_name="/send", arm1_max_new_tokens=TOKENS, arm2_max_new_tokens=TOKENS))
    assert "20,000" in out["status"]
    with Store(f"sqlite:///{db_file}") as store:
        assert len(store.list_sessions()) == before  # refused sends created no session

    # still serving, and a fresh client gets a fresh conversation
    out = outputs(client(url).predict("Hi", api_name="/send", arm1_max_new_tokens=4, arm2_max_new_tokens=4))
    assert "Turn 1 logged" in out["status"]


def test_sessions_list_open_export(server):
    url, _ = server
    c = client(url)
    table = c.predict("lab", api_name="/list_sessions")
    rows = table["data"]
    assert rows and table["headers"][:3] == ["id", "created", "kind"]
    sid = next(r[0] for r in rows if r[5] >= 2)  # the session with two turns
    head, *rest = c.predict(sid, api_name="/open_session")
    assert "lab" in head
    files, msg = c.predict(sid, "CSV", "this session", api_name="/export")
    names = sorted(f.rsplit("/", 1)[-1] for f in files)
    assert names == ["annotations.csv", "scores.csv", "turns.csv"], msg
    import pandas as pd

    turns = pd.read_csv(next(f for f in files if f.endswith("turns.csv")))
    assert set(turns["session_id"]) == {sid} and len(turns) == 8
    files, msg = c.predict(sid, "Bundle (JSON, one session)", "this session", api_name="/export")
    assert files[0].endswith(f"bundle-{sid}.json")


def test_stop_while_streaming_and_blind_reveal(server):
    """Stop reaches the running turn (it is outside the model queue); blind mode hides and reveals."""
    import time

    from db import Store

    url, db_file = server
    c = client(url)
    job = c.submit(
        "Write a long story about a lighthouse keeper.",
        api_name="/send",
        blind=True,
        arm1_max_new_tokens=400,
        arm2_max_new_tokens=400,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any("step" in str(o) for o in job.outputs()[-1:]):
        time.sleep(0.5)
    c.predict(api_name="/stop_all")
    out = outputs(job.result(timeout=300))
    assert "Turn 1 logged" in out["status"] and "Stopped" in out["status"], out["status"]
    assert out["arm1_header"].strip() == "### Arm A" and "observer" not in out["arm1_label_title"]
    sid = out["status"].split("`")[1]
    with Store(f"sqlite:///{db_file}") as store:
        s = store.get_session(sid)
        assert s["blind"] and sorted(s["pane_order"]) == [0, 1]
        reasons = {t["finish_reason"] for t in store.get_turns(sid) if t["role"] == "assistant"}
        assert reasons == {"stopped"}
        assert all(t["n_tokens"] < 400 for t in store.get_turns(sid) if t["role"] == "assistant")
    out = outputs(c.predict(api_name="/reveal"))
    assert "Revealed" in out["status"] and "observer" in out["status"]
    headers = out["arm1_header"] + out["arm2_header"]
    assert "Arm A = " in headers and "observer" in headers and "continuity" in headers
    with Store(f"sqlite:///{db_file}") as store:
        assert "revealed_at" in store.get_session(sid)["meta"]


def test_two_tabs_stream_at_once(server):
    """Two tabs' turns go through the step scheduler together: each streams while the other does."""
    import time

    url, _ = server
    jobs = [
        client(url).submit(f"Count to {k}.", api_name="/send", arm1_max_new_tokens=16, arm2_max_new_tokens=16)
        for k in (3, 4)
    ]
    seen: dict[int, list[float]] = {0: [], 1: []}
    counts = [0, 0]
    deadline = time.time() + 300
    while time.time() < deadline and not all(j.done() for j in jobs):
        for i, j in enumerate(jobs):
            n = len(j.outputs())
            if n > counts[i]:
                counts[i] = n
                seen[i].append(time.time())
        time.sleep(0.02)
    results = [outputs(j.result(timeout=60)) for j in jobs]
    assert all("Turn 1 logged" in r["status"] for r in results), [r["status"] for r in results]
    spans = sorted((min(v), max(v)) for v in seen.values() if v)
    assert len(spans) == 2 and spans[1][0] < spans[0][1], spans  # the second started before the first ended
    assert all(counts[i] > 3 for i in range(2)), counts  # both streamed step by step
