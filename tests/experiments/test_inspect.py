"""Inspect: attention capture, memory-read labels, divergence, caching, figures and the tab's errors."""

from __future__ import annotations

import numpy as np
import pytest

from db import Store, StoreError
from engine import Dialogue, parse_arm
from engine import figures as F
from engine.capture import capture_attention, capture_turn, downsample, memory_read_table
from engine.mechanisms.base import ROLE_CODE
from engine.probes import compare_on_transcript
from experiments import inspect as I
from experiments.record import SessionRecorder

SYSTEM = "You are terse."
MESSAGES = ["What is the capital of France?", "Are you sure?"]


@pytest.fixture(scope="module")
def logged(embedded, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("inspect") / "lab.db")
    d = Dialogue(embedded, [parse_arm("observer"), parse_arm("continuity:linkage=1")], system=SYSTEM)
    rec = SessionRecorder(store, embedded, d, title="inspect test")
    for m in MESSAGES:
        rec.log(m, d.send(m, max_new_tokens=12))
    yield store, rec.session_id, d
    store.close()


def _forced(d, arm):
    return [(m, r.token_ids) for m, r in zip(MESSAGES, d.arms[arm].replies)]


def test_attention_rows_sum_to_one(embedded, logged):
    _, _, d = logged
    attn, tr = capture_attention(embedded, d.arms[1].spec, _forced(d, 1), SYSTEM, max_size=None)
    L, H, T, T2 = attn.shape
    assert (L, H) == (embedded.config.num_hidden_layers, embedded.config.num_attention_heads) and T == T2
    # the transcript is the arm's own, plus the reply's last token
    assert tr.token_ids[: d.arms[1].length] == d.arms[1].token_ids and T == d.arms[1].length + 1
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-4)
    assert np.allclose(np.triu(attn, 1), 0.0)  # causal
    small, idx = downsample(attn, 16)  # display buckets keep rows as distributions
    assert small.shape[-1] == 16 and idx[0] == 0 and (idx[1:] > 0).all()
    np.testing.assert_allclose(small.sum(-1), 1.0, atol=1e-4)
    bucketed, _ = capture_attention(embedded, d.arms[1].spec, _forced(d, 1), SYSTEM, max_size=16)
    np.testing.assert_allclose(bucketed, small, atol=1e-4)


def test_divergence_with_itself_is_zero(embedded, logged):
    _, _, d = logged
    for spec in ("observer", "continuity:linkage=0"):
        divs, _ = compare_on_transcript(embedded, parse_arm(spec), _forced(d, 1), SYSTEM)
        for div in divs:
            assert max(div.kl) == 0.0 and max(div.max_abs_dlogit) == 0.0 and all(div.top1_agree)


def test_memory_read_points_at_earlier_answer_tokens(embedded):
    tok = embedded.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    first = tok("Zanzibar is the answer.", add_special_tokens=False)["input_ids"] + [end]
    second = tok("I am sure.", add_special_tokens=False)["input_ids"] + [end]
    specs = [parse_arm("observer"), parse_arm("continuity:linkage=1,source=assistant")]
    turns = [("Name an island.", [first, first]), ("Are you sure?", [second, second])]
    cap = capture_turn(embedded, specs, turns, SYSTEM, focus_arm=1, focus_turn=1, max_size=64)
    arm = cap.focus
    a0, b0 = arm.reply_spans[0]
    assert arm.token_ids[a0:b0] == first
    assert all(arm.roles[p] == ROLE_CODE["assistant"] and arm.msg_turns[p] == 0 for p in range(a0, b0))
    table = memory_read_table(cap.traces[1][1], arm, 1, tok)
    assert table["layers"], "the continuity arm made no reads"
    labels = [tok.decode([t]) for t in first]
    for entry in table["layers"]:
        w0 = entry["weights"][0]  # the read behind the reply's first token
        read = [s for s, w in zip(entry["slots"], w0) if w > 0]
        assert [s["key"] for s in read] == list(range(a0, b0))
        assert [s["text"] for s in read] == [l.replace("\n", "\\n") for l in labels]
        assert all(s["role"] == "assistant" and s["turn"] == 0 for s in read)
        assert "Zanzibar" in "".join(s["text"] for s in read)
        assert abs(float(np.nansum(w0)) - 1.0) < 1e-4
        rows = entry["weights"]
        np.testing.assert_allclose(np.nansum(rows, 1), 1.0, atol=1e-4)
    # the observer reads nothing; the summary sees the continuity arm reading its earlier answer
    assert cap.traces[0][1] == []
    from engine.capture import turn_summary

    rows = {(r["arm"], r["turn"]): r for r in turn_summary(cap)}
    assert rows[(0, 1)]["memory_size"] == 0 and rows[(1, 1)]["memory_size"] > len(first)
    assert rows[(1, 1)]["own_answer_read"] > 0
    # source curves exist for both arms and are shares
    for c in cap.source_curves:
        assert c.shape == (embedded.config.num_hidden_layers, len(second))
        assert (c >= 0).all() and (c <= 1 + 1e-5).all()


def test_inspect_turn_caches(embedded, logged):
    store, sid, _ = logged
    before = dict(I.STATS)
    res = I.inspect_turn(store, embedded, sid, 1, 1)
    assert not res.from_cache
    assert I.STATS["capture_runs"] == before.get("capture_runs", 0) + 1
    assert I.STATS["divergence_runs"] == before.get("divergence_runs", 0) + 2  # one per arm of the turn
    row = store.get_capture(store.get_turns(sid, 1)[-1]["id"], "inspect.attention")
    assert row["path"].startswith("captures/") and (store.dir / row["path"]).is_file()
    assert row["data"]["key"]["weights"] == embedded.identity.weights_hash
    again = I.inspect_turn(store, embedded, sid, 1, 1)
    assert again.from_cache and I.STATS["capture_runs"] == before.get("capture_runs", 0) + 1
    assert I.STATS["divergence_runs"] == before.get("divergence_runs", 0) + 2
    # the other arm of the turn was captured and compared by the same passes: no model needed
    other = I.inspect_turn(store, None, sid, 0, 1)
    assert (
        other.from_cache and other.divergence["kl_max"] == 0.0 and other.attention["transcript"]["label"] == "observer"
    )
    assert I.STATS["capture_runs"] == before.get("capture_runs", 0) + 1
    # reopening needs no model at all
    cold = I.inspect_turn(store, None, sid, 1, 1)
    assert cold.from_cache
    a = cold.attention_matrix(15, "mean")
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=2e-2)  # float16 storage
    assert cold.divergence["n_positions"] == len(store.get_turns(sid, 1)[-1]["token_ids"])
    assert [r["turn"] for r in cold.summary if r["arm"] == 1] == [0, 1]
    assert {a["label"] for a in cold.source["arms"]} == {"observer", "continuity λ=1"}
    # the observer arm's divergence from the observer is zero
    obs = I.inspect_turn(store, embedded, sid, 0, 0, kinds=("divergence",))
    assert obs.divergence["kl_max"] == 0.0 and obs.divergence["top1_agreement"] == 1.0
    # figures build from the cached result, and export to HTML
    from lab.inspect_view import divergence_figure, heatmap_figures, memory_figure, source_figure, summary_figure

    grid, heat = heatmap_figures(cold, 15, "3", "sink")
    figs = [
        grid,
        heat,
        memory_figure(cold, "mean over layers"),
        memory_figure(cold, "15"),
        divergence_figure(cold),
        source_figure(cold),
        summary_figure(cold),
    ]
    for i, fig in enumerate(figs):
        assert fig.data, i
        assert F.to_html(fig, store.dir / "exports" / f"f{i}.html").stat().st_size > 1000
    assert "first-token column excluded" in heat.layout.title.text


def test_errors_are_messages(embedded, logged):
    store, sid, _ = logged
    with pytest.raises(StoreError):
        I.inspect_turn(store, embedded, "no-such-session", 0, 0)
    with pytest.raises(I.InspectError, match="no turn 7"):
        I.inspect_turn(store, embedded, sid, 0, 7)
    with pytest.raises(I.InspectError, match="no arm 5"):
        I.inspect_turn(store, embedded, sid, 5, 0)
    with pytest.raises(I.InspectError, match="unknown kind"):
        I.inspect_turn(store, embedded, sid, 0, 0, kinds=("nope",))


def test_tab_handles_bad_input(embedded, logged):
    import gradio as gr

    from lab.context import LabContext
    from lab.inspect_view import build_inspect_tab

    store, sid, _ = logged
    ctx = LabContext(store=store, lm=embedded, db_url=store.name)
    with gr.Blocks():
        parts = build_inspect_tab(ctx)
    assert {"session", "arm", "turn", "show"} <= set(vars(parts))
    show = parts.show_fn
    for args in [("", 0, 0), ("nope", 0, 0), (sid, 0, 9), (sid, 9, 0)]:
        out = show(*args, False, 15, "mean", "entropy")
        assert out[0].startswith(("**Cannot inspect", "Enter a session")) and out[1] is None
    out = show(sid, 1, 1, False, 15, "mean", "entropy")
    assert out[1] is not None and "arm** 1" in out[0]


def test_png_export_is_clear(tmp_path):
    fig = F.empty_figure("x")
    ok, why = F.png_available()
    if ok:
        assert F.to_png(fig, tmp_path / "x.png").stat().st_size > 100
    else:
        with pytest.raises(F.PngExportError, match="PNG export needs"):
            F.to_png(fig, tmp_path / "x.png")


def test_captured_weights_are_the_layers_own_attention(embedded, logged):
    """The hook's recomputed weights equal eager attention's `output_attentions`, row for row."""
    import torch

    _, _, d = logged
    attn, tr = capture_attention(embedded, parse_arm("observer"), _forced(d, 0), SYSTEM, max_size=None)
    ids = torch.tensor([tr.token_ids])
    model = embedded.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(ids, output_attentions=True, logits_to_keep=1)
    finally:
        model.set_attn_implementation("sdpa")
    eager = torch.stack([a[0] for a in out.attentions]).numpy()  # [L, H, T, T]
    assert eager.shape == attn.shape
    np.testing.assert_allclose(attn, eager, atol=2e-5)


def test_capture_ignores_forwards_from_other_threads(embedded, logged):
    """The model is shared by the lab's tabs: a generation in another thread must not enter a capture."""
    import threading

    from engine import Dialogue

    _, _, d = logged
    alone, _ = capture_attention(embedded, d.arms[1].spec, _forced(d, 1), SYSTEM, max_size=None)
    stop, errors, turns = threading.Event(), [], []

    def chatter():
        other = Dialogue(embedded, [parse_arm("observer")])
        other.eos_ids = set()
        try:
            while not stop.is_set():
                turns.append(other.send("Keep talking.", max_new_tokens=4))
        except Exception as e:  # a capture hook reaching into this thread's forward would land here
            errors.append(e)

    t = threading.Thread(target=chatter)
    t.start()
    try:
        busy, _ = capture_attention(embedded, d.arms[1].spec, _forced(d, 1), SYSTEM, max_size=None)
    finally:
        stop.set()
        t.join()
    assert not errors and turns
    np.testing.assert_allclose(busy, alone, atol=1e-5)


def test_blind_sessions_are_not_inspected_before_the_reveal(embedded, tmp_path):
    from db import Store
    from engine import Dialogue
    from experiments.inspect import InspectError, inspect_turn
    from experiments.record import SessionRecorder

    store = Store(tmp_path / "blind.db")
    d = Dialogue(embedded, [parse_arm("observer"), parse_arm("continuity:linkage=1")])
    rec = SessionRecorder(store, embedded, d, blind=True, pane_order=[1, 0])
    rec.log("Hi", d.send("Hi", max_new_tokens=4))
    with pytest.raises(InspectError, match="blind session"):
        inspect_turn(store, embedded, rec.session_id, 1, 0, kinds=("divergence",))
    store.update_session(rec.session_id, meta={"revealed_at": "2026-11-22T00:00:00+00:00"})
    assert inspect_turn(store, embedded, rec.session_id, 1, 0, kinds=("divergence",)) is not None
    store.close()


# -- one capture covers every arm of a turn ----------------------------------------------------------
THREE = ["observer", "continuity:linkage=1", "continuity:linkage=0.5,source=all"]


@pytest.fixture(scope="module")
def three_arms(embedded, tmp_path_factory):
    """A logged 2-turn session of three arms whose replies differ in length (so their buckets differ)."""
    store = Store(tmp_path_factory.mktemp("inspect-all") / "lab.db")
    d = Dialogue(embedded, [parse_arm(s) for s in THREE], system=SYSTEM)
    rec = SessionRecorder(store, embedded, d, title="every arm")
    for m, n in zip(MESSAGES, (10, 7)):
        rec.log(m, d.send(m, max_new_tokens=n))
    yield store, rec.session_id
    store.close()


def test_one_capture_stores_every_arms_views(embedded, three_arms):
    """After one Inspect, every arm of the turn is served from the store (no model at all), and each arm's
    stored arrays and views equal those of a capture that recorded that arm alone."""
    import torch

    from experiments.record import session_specs, session_turns

    store, sid = three_arms
    size = 24  # smaller than the transcripts: the bucketed path
    before = dict(I.STATS)
    kinds = I.CAPTURE_KINDS  # the divergence's per-arm passes: test_inspect_turn_caches
    first = I.inspect_turn(store, embedded, sid, 1, 1, kinds, max_size=size)
    assert not first.from_cache
    assert I.STATS["capture_runs"] == before.get("capture_runs", 0) + 1
    session, turns = session_turns(store, sid)
    specs = session_specs(session)
    forced = [
        (turns[k][0]["user"]["text"], [turns[k][a]["assistant"]["token_ids"] for a in range(3)]) for k in range(2)
    ]
    assert len({len(r) for r in forced[1][1]}) > 1 or len({len(r) for r in forced[0][1]}) > 1
    key = first.attention["key"]
    for r in range(3):
        # lm=None: anything not in the store raises "no model is loaded"
        res = I.inspect_turn(store, None, sid, r, 1, kinds, max_size=size)
        assert res.from_cache and res.arm_index == r
        alone = capture_turn(
            embedded, specs, forced, SYSTEM, focus_arm=r, focus_turn=1, max_size=size, record=[r], dtype=torch.float16
        )
        assert alone.recorded == [r] and alone.attentions[(r + 1) % 3] is None
        want = I._capture_payloads(embedded, alone, key)
        arrays = want.pop("_arrays")
        got = res._arrays()
        assert sorted(got) == sorted(arrays)
        assert got["attention"].dtype == np.float16 and got["attention"].shape[2] <= size
        for name, a in arrays.items():
            np.testing.assert_allclose(
                got[name].astype(np.float32), a.astype(np.float32), atol=2e-3, rtol=0, err_msg=f"arm {r}: {name}"
            )
        assert res.attention["bucket_labels"] == want["attention"]["bucket_labels"]
        assert res.attention["transcript"] == want["attention"]["transcript"]
        assert res.memory["layers"] == want["memory"]["layers"]
        for i, (g, w) in enumerate(zip(res.source["arms"], want["source"]["arms"])):
            # every arm's reply is complete here; a capture recording one arm feeds only that arm's last token
            assert g["tokens"] == w["tokens"] if i == r else g["tokens"][: len(w["tokens"])] == w["tokens"]
            assert len(g["tokens"]) == len(g["curve"][0])
            np.testing.assert_allclose(np.asarray(g["curve"], float), np.asarray(w["curve"], float), atol=1e-4)
        assert res.summary == want["summary"]["rows"]
    assert I.STATS["capture_runs"] == before.get("capture_runs", 0) + 1  # one pass served all three arms
