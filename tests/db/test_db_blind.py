"""Exports of an unrevealed blind session name panes (Arm A, Arm B), never arms; the mapping stays
in the database, a bundle carries it sealed and imports losslessly, and Reveal shows the arms."""

import json

import pandas as pd
import pytest

from db import Store
from db.export import annotations_frame, export, export_bundle, import_bundle, scores_frame, turns_frame

ARMS = [
    {"label": "observer", "spec": "observer", "settings": {"mechanism": None}, "seed": 3},
    {"label": "continuity λ=1", "spec": "continuity:linkage=1", "settings": {"mechanism": "continuity"}, "seed": 4},
    {"label": "drift λ=0.5", "spec": "drift:linkage=0.5", "settings": {"mechanism": "drift"}, "seed": 5},
]
SECRETS = ("observer", "continuity", "drift", "linkage=", "λ")


def blind_db(path):
    st = Store(path)
    sid = st.create_session("lab", "blind study", {"name": "tiny"}, ARMS, blind=True, pane_order=[2, 0, 1])
    for arm in range(3):
        st.log_turn(sid, arm, 0, "user", "Is the sky green?", [1, 2])
        t = st.log_turn(
            sid,
            arm,
            0,
            "assistant",
            f"reply of arm {arm}",
            [3 + arm],
            finish_reason="eos",
            gen_settings={"seed": arm, "temperature": 0.7},
            meta={"memory_size": arm},
        )
        st.annotate(t, "ana", "maintained", f"note {arm}")
        st.put_score(t, "answer_flip", "no_flip", 0.0)
    st.add_probe(sid, 1, "reads", {"mean": 1.0})
    return st, sid


def assert_no_secret(text):
    for word in SECRETS:
        assert word not in text, word


def test_table_exports_show_panes_until_reveal(tmp_path, new_db):
    st, sid = blind_db(new_db("b"))
    turns = turns_frame(st)
    replies = turns[turns.role == "assistant"]
    # pane order [2, 0, 1]: Arm A shows arm 2, Arm B arm 0, Arm C arm 1
    assert replies.arm_label.tolist() == ["Arm A", "Arm B", "Arm C"] and replies.arm_index.tolist() == [0, 1, 2]
    assert replies.text.tolist() == ["reply of arm 2", "reply of arm 0", "reply of arm 1"]
    assert turns.arm_spec.isna().all() and turns.settings.isna().all() and turns.gen_settings.isna().all()
    assert turns.arm_seed.isna().all() and turns.turn_id.isna().all()
    assert replies.score_answer_flip_label.tolist() == ["no_flip"] * 3  # scores still joined
    ann = annotations_frame(st)
    assert ann.arm_label.tolist() == ["Arm A", "Arm B", "Arm C"] and ann.note.tolist() == ["note 2", "note 0", "note 1"]
    sc = scores_frame(st)
    assert sc.arm_label.tolist() == ["Arm A", "Arm B", "Arm C"] and sc.turn_id.isna().all() and sc.score_id.isna().all()
    for fmt in ("csv", "jsonl", "parquet"):
        paths = export(st, fmt, tmp_path / fmt)
        if fmt == "parquet":
            text = " ".join(pd.read_parquet(p).to_json() for p in paths)
        else:
            text = " ".join(p.read_text() for p in paths)
        assert_no_secret(text)
        assert "Arm A" in text
    # the mapping stays in the database
    assert [a["label"] for a in st.get_session(sid)["arms"]] == [a["label"] for a in ARMS]

    st.update_session(sid, meta={"revealed_at": "2026-12-01T00:00:00+00:00"})
    shown = turns_frame(st)
    assert shown[shown.role == "assistant"].arm_label.tolist() == ["observer", "continuity λ=1", "drift λ=0.5"]
    assert shown.turn_id.notna().all() and "sealed" not in export_bundle(st, sid)


def test_bundle_of_a_blind_session_is_sealed_and_lossless(tmp_path, new_db):
    st, sid = blind_db(new_db("a"))
    bundle = export_bundle(st, sid)
    readable = json.dumps({k: v for k, v in bundle.items() if k != "sealed"}, ensure_ascii=False)
    assert_no_secret(readable)
    assert [a["label"] for a in bundle["arms"]] == ["Arm A", "Arm B", "Arm C"]
    assert bundle["probes"] == [] and all(t["meta"] == {} for t in bundle["turns"])
    [path] = export(st, "bundle", tmp_path / "out")
    assert_no_secret(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "sealed"}))

    other = Store(new_db("b"))
    assert import_bundle(other, json.loads(path.read_text())) == sid
    assert [a["label"] for a in other.get_session(sid)["arms"]] == [a["label"] for a in ARMS]
    assert other.get_session(sid)["pane_order"] == [2, 0, 1] and len(other.get_probes(sid)) == 1
    assert export_bundle(other, sid) == bundle  # lossless, and still blind
    copy = import_bundle(other, bundle, new_id=True)
    assert copy != sid and [a["spec"] for a in other.get_session(copy)["arms"]] == [a["spec"] for a in ARMS]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.__setitem__("sealed", "not base64!"), "sealed: not a sealed bundle"),
        (lambda b: b.__setitem__("sealed", "aGVsbG8="), "sealed: not a sealed bundle"),
        (lambda b: b.__setitem__("sealed", 5), "sealed: "),
    ],
)
def test_a_broken_seal_is_refused(tmp_path, new_db, change, message):
    st, sid = blind_db(new_db("a"))
    bundle = export_bundle(st, sid)
    change(bundle)
    other = Store(new_db("b"))
    with pytest.raises(ValueError, match=message):
        import_bundle(other, bundle)
    assert other.list_sessions() == []


def test_a_seal_of_another_session_is_refused(tmp_path, new_db):
    st, sid = blind_db(new_db("a"))
    a2 = new_db("a2")
    _, sid2 = blind_db(a2)
    bundle = export_bundle(st, sid)
    bundle["sealed"] = export_bundle(Store(a2), sid2)["sealed"]
    with pytest.raises(ValueError, match="sealed.session.id: .* does not match"):
        import_bundle(Store(new_db("b")), bundle)
