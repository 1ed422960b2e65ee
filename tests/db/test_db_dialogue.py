"""Store.log_dialogue: a whole experiment dialogue in one transaction, exactly once per
(experiment, item, seed), on SQLite and PostgreSQL."""

import threading

import pytest

from db import Store, StoreError

ARMS = [
    {"index": 0, "label": "observer", "spec": "observer", "settings": {}, "seed": 0},
    {"index": 1, "label": "continuity", "spec": "continuity:linkage=1", "settings": {"g": 0.3}, "seed": 0},
]


def dialogue(text="reply"):
    turns, scores = [], []
    for k in range(2):
        for arm in (0, 1):
            turns.append({"arm_index": arm, "turn_index": k, "role": "user", "text": f"q{k}", "token_ids": [1, k]})
            turns.append(
                {
                    "arm_index": arm,
                    "turn_index": k,
                    "role": "assistant",
                    "text": f"{text} {arm}/{k}",
                    "token_ids": [7, arm, k],
                    "finish_reason": "eos",
                    "gen_settings": {"seed": 0},
                }
            )
            scores.append(
                {
                    "arm_index": arm,
                    "turn_index": k,
                    "scorer": "answer_flip",
                    "label": "no_flip",
                    "value": 0.0,
                    "data": {"k": k},
                }
            )
    return dict(
        title="are_you_sure · q0 · seed 0",
        model={"name": "tiny"},
        arms=ARMS,
        system_prompt="Be brief.",
        meta={"complete": True, "summaries": {"0": {}, "1": {}}},
        turns=turns,
        scores=scores,
    )


def test_a_dialogue_is_written_whole_and_once(new_db):
    st = Store(new_db("d"))
    eid = st.create_experiment("run", "are_you_sure")
    sid, written = st.log_dialogue(eid, "q0", 0, **dialogue())
    assert written
    s = st.get_session(sid)
    assert (s["kind"], s["experiment_id"], s["item_key"], s["seed"], s["meta"]["complete"]) == (
        "experiment",
        eid,
        "q0",
        0,
        True,
    )
    assert len(st.get_turns(sid)) == 8 and len(st.get_scores(session_id=sid)) == 4
    assert {x["role"] for x in st.get_scores(session_id=sid)} == {"assistant"}
    # a second delivery of the same dialogue (a Ray retry) writes nothing
    assert st.log_dialogue(eid, "q0", 0, **dialogue("other")) == (sid, False)
    assert [t["text"] for t in st.get_turns(sid) if t["role"] == "assistant"][0] == "reply 0/0"
    assert len(st.list_sessions(experiment_id=eid)) == 1


def test_an_incomplete_dialogue_is_replaced_in_place(new_db):
    st = Store(new_db("r"))
    eid = st.create_experiment("run", "are_you_sure")
    old = st.create_session(
        "experiment", "half", {}, ARMS, experiment_id=eid, item_key="q0", seed=0, meta={"complete": False}
    )
    t = st.log_turn(old, 0, 0, "assistant", "half a reply", [1])
    st.annotate(t, "ana", "maintained")
    sid, written = st.log_dialogue(eid, "q0", 0, **dialogue())
    assert (sid, written) == (old, True)
    assert len(st.get_turns(sid)) == 8 and st.get_annotations(sid) == []
    assert st.get_session(sid)["title"] == "are_you_sure · q0 · seed 0"


def test_a_bad_dialogue_writes_nothing(new_db):
    st = Store(new_db("b"))
    eid = st.create_experiment("run", "are_you_sure")
    bad = dialogue()
    bad["scores"][3]["turn_index"] = 9
    with pytest.raises(ValueError, match="scores\\[3\\]: the dialogue has no reply 9 of arm 1"):
        st.log_dialogue(eid, "q0", 0, **bad)
    bad = dialogue()
    bad["turns"][5]["text"] = "nul \x00 byte"
    with pytest.raises(ValueError, match="turns\\[5\\].text: contains a NUL"):
        st.log_dialogue(eid, "q0", 0, **bad)
    with pytest.raises(StoreError, match="unknown experiment id 'nope'"):
        st.log_dialogue("nope", "q0", 0, **dialogue())
    assert st.list_sessions() == []


def test_two_writers_of_one_dialogue_race_and_one_wins(new_db):
    url = new_db("race")
    st = Store(url)
    eid = st.create_experiment("run", "are_you_sure")
    stores = [Store(url) for _ in range(4)]
    results, errors = [], []
    go = threading.Barrier(len(stores))

    def write(store):
        go.wait()
        try:
            results.append(store.log_dialogue(eid, "q0", 0, **dialogue()))
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(w for _, w in results) == [False, False, False, True] and len({sid for sid, _ in results}) == 1
    assert len(st.list_sessions(experiment_id=eid)) == 1 and len(st.get_turns(results[0][0])) == 8
