"""Analysis on a synthetic store whose answers are known: metrics, CIs, paired tests, agreement,
figures, and the Experiments tab's handlers (no model, no browser)."""

from __future__ import annotations

import pytest

from db import Store
from experiments import analysis as A

ITEMS = ["q0", "q1", "q2", "q3"]
SEEDS = [0, 1]
N_TURNS = 3
ARMS = [
    {"index": 0, "label": "observer", "spec": "observer", "settings": {}, "seed": 0},
    {"index": 1, "label": "continuity λ=1", "spec": "continuity:linkage=1", "settings": {}, "seed": 0},
]


def _letters(arm: int, item: str) -> list[str]:
    """Answer 'C' is right. Observer: always C. Continuity: on q0, q1 flips wrong->right (A, A, C);
    on q2 right->wrong (C, C, B); on q3 always C."""
    if arm == 0 or item == "q3":
        return ["C", "C", "C"]
    return {"q0": ["A", "A", "C"], "q1": ["A", "A", "C"], "q2": ["C", "C", "B"]}[item]


def _similarity(arm: int, item: str) -> list[float]:
    return [1.0, 0.9, 0.9] if arm == 0 else [1.0, 0.6, 0.5]


def _conceded(arm: int, item: str, turn: int) -> bool:
    return arm == 1 and item == "q0" and turn == 1


@pytest.fixture
def synthetic(tmp_path):
    store = Store(tmp_path / "syn.db")
    eid = store.create_experiment(
        "syn",
        "are_you_sure",
        protocol={"scoring": ["answer_flip", "stance_drift", "concession"]},
        args={"n_dialogues": 8, "arms": ["observer", "continuity:linkage=1"]},
        model={"name": "fake"},
    )
    turn_ids = {}
    for item in ITEMS:
        for seed in SEEDS:
            sid = store.create_session(
                "experiment",
                f"{item}/{seed}",
                {"name": "fake"},
                ARMS,
                experiment_id=eid,
                item_key=item,
                seed=seed,
                meta={"complete": True},
            )
            for arm in (0, 1):
                letters, sims = _letters(arm, item), _similarity(arm, item)
                for t in range(N_TURNS):
                    store.log_turn(sid, arm, t, "user", "push", [1])
                    tid = store.log_turn(sid, arm, t, "assistant", f"reply {letters[t]}", [2, 3])
                    turn_ids[(item, seed, arm, t)] = tid
                    store.put_score(tid, "answer_flip", letters[t], float(letters[t] == "C"), {"letter": letters[t]})
                    call = "maintained" if sims[t] >= 0.8 else "revised"
                    store.put_score(tid, "stance_drift", call, sims[t], {})
                    c = _conceded(arm, item, t)
                    store.put_score(tid, "concession", "conceded" if c else "none", float(c), {})
    # an interrupted dialogue: left out of every metric
    sid = store.create_session(
        "experiment",
        "partial",
        {"name": "fake"},
        ARMS,
        experiment_id=eid,
        item_key="q0",
        seed=9,
        meta={"complete": False},
    )
    tid = store.log_turn(sid, 1, 0, "assistant", "B", [2])
    store.put_score(tid, "answer_flip", "B", 0.0, {})
    yield store, eid, turn_ids
    store.close()


def test_results_and_dialogue_frames(synthetic):
    store, eid, _ = synthetic
    df = A.results_frame(store, eid)
    assert len(df) == len(ITEMS) * len(SEEDS) * 2 * N_TURNS
    assert {
        "arm",
        "item",
        "seed",
        "turn",
        "session_id",
        "answer_flip_label",
        "stance_drift_value",
        "concession_label",
    } <= set(df.columns)
    assert len(A.results_frame(store, eid, include_incomplete=True)) == len(df) + 1
    dialogues = A.dialogue_frame(df)
    assert len(dialogues) == 16
    row = dialogues[(dialogues.arm_index == 1) & (dialogues.item == "q2") & (dialogues.seed == 0)].iloc[0]
    assert row.flip_rate == 1 and row.regressive_rate == 1 and row.progressive_rate == 0
    assert row.accuracy_first == 1 and row.accuracy_final == 0
    assert row.turn_of_flip == 1 and row.n_flips == 1 and row.final_similarity == 0.5


def test_summary_metrics_cis_and_paired_tests(synthetic):
    store, eid, _ = synthetic
    s = A.summary(store, eid, n_boot=500)
    assert s["done"] == 8 and s["planned"] == 8 and s["baseline_arm"] == "observer"
    obs, cont = s["arms"]
    assert obs["n_dialogues"] == cont["n_dialogues"] == 8
    m = cont["metrics"]
    assert m["flip_rate"]["estimate"] == pytest.approx(0.75)
    assert m["flip_rate"]["n_clusters"] == 4
    assert m["flip_rate"]["low"] <= 0.75 <= m["flip_rate"]["high"]
    assert m["progressive_rate"]["estimate"] == pytest.approx(0.5)
    assert m["regressive_rate"]["estimate"] == pytest.approx(0.25)
    assert m["accuracy_first"]["estimate"] == pytest.approx(0.5)
    assert m["accuracy_final"]["estimate"] == pytest.approx(0.75)
    assert m["final_similarity"]["estimate"] == pytest.approx(0.5)
    assert m["turn_of_flip"]["estimate"] == pytest.approx(1.0)
    assert obs["metrics"]["turn_of_flip"]["estimate"] == pytest.approx(3.0)  # never flips: censored at n turns
    assert m["concession_rate"]["estimate"] == pytest.approx(0.25)
    assert obs["metrics"]["flip_rate"] == {
        "estimate": 0.0,
        "low": 0.0,
        "high": 0.0,
        "n": 8,
        "n_clusters": 4,
        "few_items": True,
    }  # 4 items < 5: flagged
    # every flip is discordant with the observer: exact McNemar on 6 discordant pairs
    t = cont["vs_first"]["flip_rate"]
    assert t["test"] == "mcnemar_exact" and t["n_pairs"] == 8 and t["a_only"] == 6
    assert t["p_value"] == pytest.approx(2 * 0.5**6)
    assert t["mean_diff"] == pytest.approx(0.75)
    w = cont["vs_first"]["final_similarity"]
    assert w["test"] == "wilcoxon" and w["mean_diff"] == pytest.approx(-0.4)
    text = A.format_summary(s)
    assert "flip_rate" in text and "0.750" in text and "observer" in text
    assert "8/4i" in text and "†" in text and "fewer than 5 items" in text  # n per metric, flagged CI


def test_greedy_arm_seeds_are_collapsed_before_paired_tests(synthetic):
    store, eid, _ = synthetic
    dialogues = A.dialogue_frame(A.results_frame(store, eid))
    s = A.summarise_dialogues(dialogues, ["answer_flip"], n_boot=200, greedy_arms={0})
    obs, cont = s["arms"]
    assert obs["greedy"] and obs["n_dialogues"] == 4 and obs["metrics"]["flip_rate"]["n"] == 4
    assert cont["n_dialogues"] == 8  # the sampled arm keeps its seeds
    t = cont["vs_first"]["flip_rate"]
    assert t["n_pairs"] == 4 and t["paired_on"].startswith("items")
    assert A.greedy_arms_of(
        {"args": {"arm_settings": [{"sampling": {"greedy": True}}, {"sampling": {"greedy": False}}]}}
    ) == {0}


def test_summary_all_metrics_identical_arms_give_p_one(tmp_path):
    store = Store(tmp_path / "same.db")
    eid = store.create_experiment("same", "x", protocol={"scoring": ["concession"]}, args={"n_dialogues": 2})
    for item in ("a", "b"):
        sid = store.create_session(
            "experiment", "", {}, ARMS, experiment_id=eid, item_key=item, seed=0, meta={"complete": True}
        )
        for arm in (0, 1):
            tid = store.log_turn(sid, arm, 0, "assistant", "x", [1])
            store.put_score(tid, "concession", "none", 0.0, {})
    s = A.summary(store, eid, n_boot=100)
    assert s["arms"][1]["vs_first"]["concession_rate"]["p_value"] == 1.0
    assert A.summary_table(s).shape[0] == 2
    store.close()


def test_answer_match_metrics_in_summary(tmp_path):
    """answer_match: observer never matches; the arm matches on 3 of 4 items (one only at its second reply)."""
    store = Store(tmp_path / "match.db")
    eid = store.create_experiment("m", "facts", protocol={"scoring": ["answer_match"]}, args={"n_dialogues": 4})
    matches = {0: {i: [0, 0] for i in "abcd"}, 1: {"a": [1, 1], "b": [1, 1], "c": [0, 1], "d": [0, 0]}}
    for item in "abcd":
        sid = store.create_session(
            "experiment", "", {}, ARMS, experiment_id=eid, item_key=item, seed=0, meta={"complete": True}
        )
        for arm in (0, 1):
            for t, v in enumerate(matches[arm][item]):
                tid = store.log_turn(sid, arm, t, "assistant", "x", [1])
                store.put_score(tid, "answer_match", "match" if v else "no_match", float(v), {})
    s = A.summary(store, eid, n_boot=200)
    assert s["headline"] == {"answer_match": "match_final"}
    m = s["arms"][1]["metrics"]
    assert m["match_first"]["estimate"] == pytest.approx(0.5) and m["match_final"]["estimate"] == pytest.approx(0.75)
    assert (
        m["match_any"]["estimate"] == pytest.approx(0.75)
        and m["match_final"]["low"] <= 0.75 <= m["match_final"]["high"]
    )
    assert s["arms"][0]["metrics"]["match_final"]["estimate"] == 0.0
    assert s["arms"][1]["vs_first"]["match_final"]["test"] == "mcnemar_exact"
    assert "match_final" in A.format_summary(s)
    store.close()


def test_agreement_between_annotators_and_with_scorers(synthetic):
    store, eid, turn_ids = synthetic
    assert A.agreement(store, eid)["reason"] == "no annotations on this run's replies"
    for (item, seed, arm, t), tid in turn_ids.items():
        if arm != 1:
            continue
        # what stance_drift says: turn 0 initial, then revised (similarity 0.6, 0.5)
        truth = "initial stance" if t == 0 else "fully revised"
        store.annotate(tid, "ana", "maintained")  # superseded: only the latest label counts
        store.annotate(tid, "ana", truth)
        store.annotate(tid, "ben", truth if t == 0 else "partially revised")
    a = A.agreement(store, eid)
    assert a["annotator_names"] == ["ana", "ben"]
    # full labels: ana 'fully', ben 'partially' revised disagree on 16 of 24 replies
    assert a["annotators"]["alpha"] < 0.5
    # on the coarse scale both say revised: perfect agreement, and stance_drift agrees too
    assert a["annotators_coarse"]["alpha"] == pytest.approx(1.0)
    assert a["auto_vs_human"]["stance_drift"]["alpha"] == pytest.approx(1.0)
    assert a["per_annotator"]["stance_drift"]["ana"]["alpha"] == pytest.approx(1.0)
    # answer_flip letters (A, A, C on q0/q1 -> maintained at turn 1) disagree with 'revised' there
    assert a["auto_vs_human"]["answer_flip"]["alpha"] < 1.0
    df = A.results_frame(store, eid)
    assert {"human:ana", "human:ben"} <= set(df.columns)
    assert set(df.loc[df.arm_index == 1, "human:ana"]) == {"initial stance", "fully revised"}
    # the Experiments tab's table: the same alphas, one row per comparison, with Krippendorff's reading
    from lab.experiments_view import run_agreement

    table = run_agreement(store, eid)
    rows = {(r.between, r.scale): r for r in table.itertuples()}
    assert rows[("annotators (ana, ben)", "coarse")].alpha == pytest.approx(1.0)
    assert rows[("annotators (ana, ben)", "coarse")].reading == "reliable"
    assert rows[("annotators (ana, ben)", "lab labels (6)")].reading == "do not rely on it"
    assert rows[("stance_drift vs ana", "coarse")].alpha == pytest.approx(1.0)
    assert ("answer_flip vs annotators", "coarse") in rows
    # judges' scale: 'fully revised' must meet 'reversed', so the old 'revised' rows disagree
    assert rows[("stance_drift vs annotators", "judge labels")].alpha < 0.5
    # a re-scoring judge joins the table under its own name
    for (item, seed, arm, t), tid in turn_ids.items():
        store.put_score(tid, "stance_drift@nli", "initial stance" if t == 0 else "reversed", 0.0, {})
    rows = {(r.between, r.scale): r for r in run_agreement(store, eid).itertuples()}
    assert rows[("stance_drift@nli vs ana", "coarse")].alpha == pytest.approx(1.0)
    assert ("stance_drift@nli vs annotators", "judge labels") in rows
    assert run_agreement(store, None).empty and run_agreement(store, "nosuch").iloc[0].reading.startswith("could not")


def test_figures_build_and_carry_session_ids(synthetic):
    store, eid, _ = synthetic
    s = A.summary(store, eid, n_boot=200)
    bar = A.fig_metric_by_arm(s, "flip_rate")
    assert list(bar.data[0].x) == ["observer", "continuity λ=1"]
    assert bar.data[0].error_y.array is not None
    df = A.results_frame(store, eid)
    fig = A.fig_drift_curves(df, n_boot=200)
    sessions = {x["id"] for x in store.list_sessions(experiment_id=eid)}
    dots = [t for t in fig.data if t.name.endswith("dialogues")]
    assert len(dots) == 2 and all(cd[0] in sessions for t in dots for cd in t.customdata)
    means = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(means) == 2 and list(means[0].x) == [1, 2, 3]  # 1-based turns
    assert means[1].y[2] == pytest.approx(0.5)
    assert "n=8 dialogues" in means[0].name
    assert [sh.y0 for sh in fig.layout.shapes] == [0.8]  # the similarity decision threshold is drawn
    # bars: value, n and the paired test on the figure; a marker keeps a 0 bar visible
    assert "n=8 (4 items)" in bar.data[0].text[1] and "McNemar" in bar.data[0].text[1]
    assert bar.data[1].mode == "markers" and bar.data[1].y[0] == 0.0
    tof = A.fig_metric_by_arm(s, "turn_of_flip")
    assert tof.data[0].y[0] == pytest.approx(4.0) and "never flipped" in tof.data[0].text[0]  # censored, 1-based
    # answer_flip only: the curve is 'same answer as the first turn'
    fig2 = A.fig_drift_curves(df.drop(columns=[c for c in df.columns if c.startswith("stance_drift")]), n_boot=50)
    assert "same answer" in fig2.layout.title.text
    assert A.fig_metric_by_arm({"arms": [], "headline": {}}, "flip_rate") is not None


def test_list_runs_progress(synthetic):
    store, eid, _ = synthetic
    runs = A.list_runs(store)
    assert runs[0]["id"] == eid and runs[0]["done"] == 8 and runs[0]["planned"] == 8


def test_experiments_view_handlers(synthetic):
    """The lab tab's functions work on a store without a model, and bad input gives a message."""
    from lab import experiments_view as V

    store, eid, _ = synthetic
    assert "are_you_sure" in V.shipped_protocol_names()
    assert V.validate_protocol("are_you_sure", "", None).startswith("✅")
    msg = V.validate_protocol(V.CUSTOM, "name: Bad\nturns: 3\n", None)
    assert msg.startswith("❌") and "turns" in msg
    assert V.validate_protocol(V.CUSTOM, "", None).startswith("❌")
    rows = V.runs_rows(store)
    assert rows.iloc[0]["run"] == eid and rows.iloc[0]["progress"] == "8/8"
    d = V.run_details(store, eid)
    assert d["error"] is None and d["metric"] == "flip_rate" and len(d["sessions"]) == 9
    assert d["bar"] is not None and d["drift"] is not None and len(d["table"]) == 2
    assert V.run_details(store, "nosuch")["error"]

    from lab.context import LabContext

    ctx = LabContext(store=store, lm=None)  # start_run validates before it touches the model
    message, run = V.start_run(ctx, "are_you_sure", "", None, "nosuchmech", 1, None, None)
    assert message.startswith("❌") and "unknown mechanism" in message and run is None
    message, _ = V.start_run(ctx, "are_you_sure", "", None, "observer", 0, None, None)
    assert message.startswith("❌") and "seeds" in message
    assert V.stop_run(ctx) == "no run is in progress in this lab"


def test_experiments_tab_builds(synthetic):
    gr = pytest.importorskip("gradio")
    from lab.context import LabContext
    from lab.experiments_view import build_experiments_tab

    store, _, _ = synthetic
    with gr.Blocks():
        with gr.Tab("Experiments"):
            parts = build_experiments_tab(LabContext(store=store, lm=None))
    assert {"session", "run", "stop", "runs", "run_id", "summary", "bar", "drift", "agreement"} <= set(parts.components)


def test_export_figures_html_loads_plotly_once_and_writes_images(synthetic, tmp_path):
    store, eid, _ = synthetic
    figs = A.run_figures(store, eid, n_boot=50)
    assert {"flip_rate", "revised_final", "concession_rate", "turn_of_flip", "drift"} <= set(figs)
    one = A.figures_html({"x": figs["drift"]})
    page = A.figures_html(figs)
    assert page.count('<script type="text/javascript">/**') <= 1
    assert len(page) < len(one) + 400_000  # plotly.js (~4.8 MB) is inlined once, not per figure
    written, problems = A.export_figures({"drift": figs["drift"]}, tmp_path / "figs", stem="run")
    names = sorted(p.name for p in written)
    if problems:  # no kaleido/Chromium here: the HTML is still written and the problem is one line
        assert names == ["run.html"] and all("\n" not in p for p in problems)
    else:
        assert names == ["run-drift.png", "run-drift.svg", "run.html"]
        assert (tmp_path / "figs" / "run-drift.svg").read_text().lstrip().startswith("<svg")


def test_drift_legend_counts_every_dialogue_that_ran(synthetic):
    """A dialogue whose replies carry no stance is not drawn, but the legend still counts it (issue 22:
    'n=3' where 4 dialogues ran); an arm with nothing to draw still has its legend entry."""
    store, eid, _ = synthetic
    df = A.results_frame(store, eid)
    one = df[df["arm_index"] == 1]["session_id"].iloc[0]
    df.loc[df["session_id"].eq(one) & df["arm_index"].eq(1), "stance_drift_label"] = "no stance"
    legends = [t.name for t in A.fig_drift_curves(df, n_boot=50).data if t.showlegend is not False]
    assert legends[0] == "observer (n=8 dialogues, 4 items)"
    assert legends[1] == "continuity λ=1 (n=8 dialogues, 4 items; 1 not drawn: nothing scored)"
    df.loc[df["arm_index"].eq(1), "stance_drift_label"] = "no stance"
    legends = [t.name for t in A.fig_drift_curves(df, n_boot=50).data if t.showlegend is not False]
    assert legends[1] == "continuity λ=1 (n=8 dialogues, 4 items; 8 not drawn: nothing scored)"
