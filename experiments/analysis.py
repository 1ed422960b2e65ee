"""Reading a run back: per-turn frames, per-arm metrics with item-clustered CIs, agreement, figures.

Used by `python -m experiments summary`, the lab's Experiments tab, and notebooks::

    from experiments.analysis import results_frame, dialogue_frame, summary, agreement
    df = results_frame(store, run_id)           # one row per (arm, item, seed, turn)
    s = summary(store, run_id)                  # per arm: metrics with 95% CI, paired tests
    fig_metric_by_arm(s, "flip_rate").show(); fig_drift_curves(df).show()

Everything is derived from the per-turn score rows (not from the runner's session meta), so any
store holding turns and scores in the runner's layout can be analysed. Sessions whose meta says
``complete: false`` (interrupted dialogues) are left out.

Dialogue-level metrics (one value per arm x item x seed; `None` = undefined, dropped):

answer_flip (per-turn label = the extracted letter, value = 1 correct / 0 wrong / None no letter)
    first / final answer = the letter at the first / last turn.
    ``answered``      both a first and a final letter were found (0/1)
    ``flip_rate``     final letter != first letter, among dialogues with both letters
    ``accuracy_first``, ``accuracy_final``  letter is right; no letter counts as wrong
    ``progressive_rate`` wrong -> right flips, ``regressive_rate`` right -> wrong flips, both among
                      dialogues with both letters
stance_drift (per-turn label = maintained/revised, value = cosine similarity to the first stance)
    ``final_similarity`` similarity of the last stance turn's stance to the first
    ``turn_of_flip``  first turn called 'revised'; a dialogue that never flips gets the number of
                      turns (censored, as in SYCON-Bench), so lower = gives way sooner
    ``n_flips``       maintained <-> revised changes between consecutive stance turns
    ``revised_final`` the last stance turn is called 'revised' (0/1)
answer_match (per-turn label match / no_match, value 1 / 0)
    ``match_first``, ``match_final`` the first / last reply contains the answer (0/1)
    ``match_any``     some reply of the dialogue contains it (0/1)
concession (per-turn label none / conceded / apologised / conceded+apologised)
    ``concession_rate`` any reply of the dialogue concedes (0/1)
    ``apology_rate``    any reply apologises (0/1)
    ``conceded_turns``  fraction of replies that concede

Each metric per arm: mean with a 95% percentile bootstrap CI that resamples items (all seeds of
an item together), and a paired test against the first arm on the same (item, seed) pairs
(exact McNemar for 0/1 metrics, Wilcoxon signed-rank otherwise; `mean_diff` = arm - first arm).
"""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import pandas as pd

from db import Store
from experiments.stats import bootstrap_ci, krippendorff_alpha, paired_test, summarise_arm

HEADLINE = {"answer_flip": "flip_rate", "stance_drift": "final_similarity", "concession": "concession_rate",
            "answer_match": "match_final"}
METRICS = {
    "answer_flip": ["answered", "flip_rate", "accuracy_first", "accuracy_final", "progressive_rate",
                    "regressive_rate"],
    "stance_drift": ["final_similarity", "turn_of_flip", "n_flips", "revised_final"],
    "concession": ["concession_rate", "apology_rate", "conceded_turns"],
    "answer_match": ["match_first", "match_final", "match_any"],
}
BINARY_METRICS = {"answered", "flip_rate", "accuracy_first", "accuracy_final", "progressive_rate",
                  "regressive_rate", "revised_final", "concession_rate", "apology_rate", "match_first",
                  "match_final", "match_any"}
METRIC_TITLES = {
    "answered": "answered first and final", "flip_rate": "flip rate", "accuracy_first": "accuracy, first answer",
    "accuracy_final": "accuracy, final answer", "progressive_rate": "progressive flips (wrong→right)",
    "regressive_rate": "regressive flips (right→wrong)", "final_similarity": "final stance similarity to first",
    "turn_of_flip": "turn of flip", "n_flips": "number of flips", "revised_final": "final stance revised",
    "concession_rate": "concession rate", "apology_rate": "apology rate", "conceded_turns": "conceding replies",
    "match_first": "answer matched, first reply", "match_final": "answer matched, final reply",
    "match_any": "answer matched in any reply",
}
KEYS = ["arm_index", "arm", "item", "seed", "session_id"]

# Coarse stance scale on which automatic scorers and human labels are compared (see `agreement`).
HUMAN_TO_COARSE = {"initial stance": "initial", "maintained": "maintained", "partially revised": "revised",
                   "fully revised": "revised"}


# ====================================================================== runs

def run_progress(store: Store, experiment_id: str) -> dict:
    """Done / planned dialogues of one run (planned from the run's args)."""
    exp = store.get_experiment(experiment_id)
    sessions = store.list_sessions(experiment_id=experiment_id)
    done = sum((s.get("meta") or {}).get("complete", True) is True for s in sessions)
    planned = (exp.get("args") or {}).get("n_dialogues")
    return {"done": done, "planned": planned, "started": len(sessions)}


def list_runs(store: Store) -> list[dict]:
    """Every run, newest first: id, name, protocol, status, arms, done/planned dialogues, times."""
    rows = []
    for e in store.list_experiments():
        args = e.get("args") or {}
        p = run_progress(store, e["id"])
        rows.append({"id": e["id"], "name": e["name"], "protocol": e["protocol_name"], "status": e["status"],
                     "arms": args.get("arms", []), "seeds": args.get("seeds"), "items": args.get("n_items"),
                     "done": p["done"], "planned": p["planned"],
                     "model": (e.get("model") or {}).get("name"),
                     "created_at": e["created_at"], "finished_at": e.get("finished_at")})
    return rows


# ====================================================================== frames

def _arm_names(labels: dict[int, str]) -> dict[int, str]:
    """Display names by arm index; duplicated labels get their index appended."""
    counts = pd.Series(list(labels.values())).value_counts()
    return {i: (f"{lab} [{i}]" if counts[lab] > 1 else lab) for i, lab in labels.items()}


def results_frame(store: Store, experiment_id: str, *, include_incomplete: bool = False,
                  annotations: bool = True) -> pd.DataFrame:
    """One row per (arm, item, seed, turn) of the run's assistant replies.

    Columns: session_id, arm_index, arm (display name), arm_spec, item, seed, turn, turn_id, text,
    finish_reason, n_tokens, complete, then ``<scorer>_label`` / ``<scorer>_value`` /
    ``<scorer>_data`` (dict) per scorer, then ``human:<annotator>`` (latest stance label) per
    annotator who labelled any reply of the run.
    """
    from db.export import scores_frame, turns_frame

    turns = turns_frame(store, experiment_id=experiment_id)
    turns = turns[turns["role"] == "assistant"]
    sessions = {s["id"]: s for s in store.list_sessions(experiment_id=experiment_id)}
    labels = {}
    for s in sorted(sessions.values(), key=lambda s: s["created_at"]):
        for a in store.get_session(s["id"])["arms"]:
            labels.setdefault(int(a["index"]), a["label"])
        break
    names = _arm_names(labels)
    df = pd.DataFrame({
        "session_id": turns["session_id"].astype(str),
        "arm_index": turns["arm_index"].astype(int),
        "arm": [names.get(int(i), lab) for i, lab in zip(turns["arm_index"], turns["arm_label"])],
        "arm_spec": turns["arm_spec"],
        "item": turns["item_key"].astype(str),
        "seed": turns["seed"].astype("Int64"),
        "turn": turns["turn_index"].astype(int),
        "turn_id": turns["turn_id"].astype(int),
        "text": turns["text"],
        "finish_reason": turns["finish_reason"],
        "n_tokens": turns["n_tokens"],
    })
    df["complete"] = [(sessions.get(sid, {}).get("meta") or {}).get("complete", True) is True
                      for sid in df["session_id"]]
    scores = scores_frame(store, experiment_id=experiment_id)
    for scorer in sorted(scores["scorer"].unique()) if len(scores) else []:
        sc = scores[scores["scorer"] == scorer].set_index("turn_id")
        df[f"{scorer}_label"] = df["turn_id"].map(sc["label"])
        df[f"{scorer}_value"] = pd.to_numeric(df["turn_id"].map(sc["value"]), errors="coerce").astype(float)
        df[f"{scorer}_data"] = df["turn_id"].map(sc["data"].map(json.loads))
    if annotations:
        ann = annotations_table(store, experiment_id, sessions=list(sessions))
        if len(ann):
            for annotator, rows in ann.groupby("annotator", sort=True):
                df[f"human:{annotator}"] = df["turn_id"].map(rows.set_index("turn_id")["stance_label"])
    if not include_incomplete:
        df = df[df["complete"]]
    return df.sort_values(["arm_index", "item", "seed", "turn"]).reset_index(drop=True)


def annotations_table(store: Store, experiment_id: str, sessions: Optional[list[str]] = None) -> pd.DataFrame:
    """Latest stance label per (assistant turn, annotator) over the run's sessions."""
    if sessions is None:
        sessions = [s["id"] for s in store.list_sessions(experiment_id=experiment_id)]
    rows = []
    for sid in sessions:
        for a in store.latest_annotations(sid):
            rows.append({"session_id": sid, "turn_id": a["turn_id"], "arm_index": a["arm_index"],
                         "turn": a["turn_index"], "annotator": a["annotator"], "stance_label": a["stance_label"]})
    return pd.DataFrame(rows, columns=["session_id", "turn_id", "arm_index", "turn", "annotator", "stance_label"])


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA


def _answer_metrics(g: pd.DataFrame) -> dict:
    labels = list(g["answer_flip_label"])
    values = list(g["answer_flip_value"])
    first, final = labels[0], labels[-1]
    first, final = (None if _nan(first) else first), (None if _nan(final) else final)
    c_first = None if first is None else bool(values[0] == 1)
    c_final = None if final is None else bool(values[-1] == 1)
    both = first is not None and final is not None
    flipped = both and first != final
    return {"answered": float(both),
            "flip_rate": float(flipped) if both else None,
            "accuracy_first": float(bool(c_first)), "accuracy_final": float(bool(c_final)),
            "progressive_rate": float(flipped and bool(c_final)) if both else None,
            "regressive_rate": float(flipped and bool(c_first)) if both else None,
            "first_answer": first, "final_answer": final}


def _stance_metrics(g: pd.DataFrame) -> dict:
    sims = [(t, v) for t, v in zip(g["turn"], g["stance_drift_value"]) if not _nan(v)]
    calls = [c for c in g["stance_drift_label"] if not _nan(c)]
    revised = [t for t, c in zip(g["turn"], g["stance_drift_label"]) if c == "revised"]
    return {"final_similarity": sims[-1][1] if sims else None,
            "turn_of_flip": float(revised[0]) if revised else (float(len(g)) if calls else None),
            "n_flips": float(sum(a != b for a, b in zip(calls, calls[1:]))) if calls else None,
            "revised_final": float(calls[-1] == "revised") if calls else None}


def _concession_metrics(g: pd.DataFrame) -> dict:
    labels = [str(x) for x in g["concession_label"] if not _nan(x)]
    if not labels:
        return {"concession_rate": None, "apology_rate": None, "conceded_turns": None}
    conceded = ["conceded" in x for x in labels]
    return {"concession_rate": float(any(conceded)), "apology_rate": float(any("apologised" in x for x in labels)),
            "conceded_turns": float(np.mean(conceded))}


def _match_metrics(g: pd.DataFrame) -> dict:
    values = [v for v in g["answer_match_value"] if not _nan(v)]
    if not values:
        return {"match_first": None, "match_final": None, "match_any": None}
    return {"match_first": float(values[0] == 1), "match_final": float(values[-1] == 1),
            "match_any": float(any(v == 1 for v in values))}


_METRIC_FNS = {"answer_flip": _answer_metrics, "stance_drift": _stance_metrics, "concession": _concession_metrics,
               "answer_match": _match_metrics}


def scorers_in(df: pd.DataFrame) -> list[str]:
    return [s for s in _METRIC_FNS if f"{s}_label" in df.columns]


def dialogue_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, item, seed) dialogue with the metrics of every scorer present."""
    scorers = scorers_in(df)
    rows = []
    for key, g in df.sort_values("turn").groupby(KEYS, sort=True):
        row = dict(zip(KEYS, key))
        row["n_turns"] = len(g)
        for s in scorers:
            row.update(_METRIC_FNS[s](g))
        rows.append(row)
    cols = KEYS + ["n_turns"] + [m for s in scorers for m in METRICS[s]]
    out = pd.DataFrame(rows, columns=list(dict.fromkeys(cols + [c for r in rows[:1] for c in r])))
    return out.sort_values(["arm_index", "item", "seed"]).reset_index(drop=True) if len(out) else out


# ====================================================================== summary

def summarise_dialogues(dialogues: pd.DataFrame, scorers: list[str], n_boot: int = 2000) -> dict:
    """Per-arm metrics + paired tests from a `dialogue_frame` (no database needed)."""
    arms_out = []
    if not len(dialogues):
        return {"arms": [], "metrics": [], "headline": {}}
    metrics = [m for s in scorers for m in METRICS[s] if m in dialogues.columns]
    order = dialogues.drop_duplicates("arm_index").sort_values("arm_index")
    first_arm = int(order["arm_index"].iloc[0])

    def keyed(arm_index: int, metric: str) -> dict:
        g = dialogues[dialogues["arm_index"] == arm_index]
        return {(str(i), int(s)): (None if _nan(v) else float(v)) for i, s, v in zip(g["item"], g["seed"], g[metric])}

    for arm_index, arm in zip(order["arm_index"], order["arm"]):
        g = dialogues[dialogues["arm_index"] == arm_index]
        entry = {"arm": arm, "arm_index": int(arm_index), "n_dialogues": int(len(g)),
                 "n_items": int(g["item"].nunique()), "metrics": {}, "vs_first": {}}
        for m in metrics:
            vals = pd.to_numeric(g[m], errors="coerce")
            r = summarise_arm(pd.DataFrame({m: vals, "item": g["item"]}), m, "item", n_boot=n_boot)
            entry["metrics"][m] = {k: r[k] for k in ("estimate", "low", "high", "n", "n_clusters")}
            if int(arm_index) != first_arm:
                t = paired_test(keyed(int(arm_index), m), keyed(first_arm, m), binary=m in BINARY_METRICS,
                                n_boot=n_boot)
                entry["vs_first"][m] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in t.items()}
        arms_out.append(entry)
    return {"arms": arms_out, "metrics": metrics,
            "headline": {s: HEADLINE[s] for s in scorers}, "baseline_arm": arms_out[0]["arm"]}


def summary(store: Store, experiment_id: str, n_boot: int = 2000) -> dict:
    """The run's per-arm results (see the module docstring for the metrics), JSON-able."""
    exp = store.get_experiment(experiment_id)
    df = results_frame(store, experiment_id, annotations=False)
    scorers = [s for s in (exp.get("protocol") or {}).get("scoring", []) if s in _METRIC_FNS] or scorers_in(df)
    scorers = [s for s in scorers if f"{s}_label" in df.columns]
    dialogues = dialogue_frame(df) if len(df) else pd.DataFrame()
    out = {"experiment_id": experiment_id, "name": exp["name"], "protocol": exp["protocol_name"],
           "status": exp["status"], "model": (exp.get("model") or {}).get("name"),
           **{k: v for k, v in run_progress(store, experiment_id).items() if k in ("done", "planned")},
           "scorers": scorers}
    out.update(summarise_dialogues(dialogues, scorers, n_boot=n_boot))
    return _jsonable(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if np.isnan(x) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _fmt_ci(m: Optional[dict]) -> str:
    if not m or m.get("estimate") is None:
        return "–"
    return f"{m['estimate']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def summary_table(s: dict, metrics: Optional[list[str]] = None) -> pd.DataFrame:
    """One row per arm: n dialogues, each metric 'est [low, high]' and its paired p vs the first arm."""
    metrics = metrics or s.get("metrics", [])
    rows = []
    for a in s.get("arms", []):
        row = {"arm": a["arm"], "n": a["n_dialogues"]}
        for m in metrics:
            row[m] = _fmt_ci(a["metrics"].get(m))
            t = a["vs_first"].get(m)
            row[f"{m} p"] = "" if t is None else ("–" if t.get("p_value") is None else f"{t['p_value']:.3g}")
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(s: dict, all_metrics: bool = False) -> str:
    """The printed table: per arm n and each headline metric with 95% CI and paired p vs the first arm."""
    head = (f"run {s['experiment_id']}  {s['protocol']}  [{s['status']}]  "
            f"{s.get('done')}/{s.get('planned')} dialogues  model {s.get('model')}")
    if not s.get("arms"):
        return head + "\n(no complete dialogues yet)"
    metrics = s["metrics"] if all_metrics else list(s["headline"].values())
    table = summary_table(s, metrics)
    note = (f"95% bootstrap CI over items (seeds clustered by item); p: paired test vs {s['baseline_arm']} "
            "(McNemar for rates, Wilcoxon otherwise)")
    return head + "\n" + table.to_string(index=False) + "\n" + note


# ====================================================================== agreement

def _auto_coarse(df: pd.DataFrame, scorer: str) -> pd.Series:
    """Automatic calls on the coarse stance scale, per reply (index = turn_id)."""
    out = {}
    col = f"{scorer}_label"
    if col not in df.columns:
        return pd.Series(out, dtype=object)
    for _, g in df.sort_values("turn").groupby(["session_id", "arm_index"], sort=False):
        if scorer == "stance_drift":
            stance = [(tid, c) for tid, c in zip(g["turn_id"], g[col]) if not _nan(c)]
            for k, (tid, c) in enumerate(stance):
                out[tid] = "initial" if k == 0 else c
        elif scorer == "answer_flip":
            letters = list(zip(g["turn_id"], g[col]))
            first = letters[0][1] if letters else None
            for k, (tid, letter) in enumerate(letters):
                if _nan(letter):
                    continue
                if k == 0:
                    out[tid] = "initial"
                elif not _nan(first):
                    out[tid] = "maintained" if letter == first else "revised"
    return pd.Series(out, dtype=object)


def agreement(store: Store, experiment_id: str) -> dict:
    """Krippendorff's alpha (nominal) among annotators, and between annotators and the scorers.

    - ``annotators``: all six stance labels, units = assistant replies, coders = annotators.
    - ``annotators_coarse``: the same on the coarse scale below.
    - ``auto_vs_human[scorer]``: coarse scale, coders = every annotator plus the scorer;
      ``per_annotator[scorer][annotator]``: the scorer against one annotator.

    Coarse scale (what both sides can say): human 'initial stance' -> initial, 'maintained' ->
    maintained, 'partially revised' and 'fully revised' -> revised; 'contradiction acknowledged'
    and 'off-topic / incoherent' have no automatic counterpart and are left out. stance_drift: its
    first stance turn -> initial, then its call (maintained / revised). answer_flip: the first
    turn -> initial, then maintained if the letter equals the first letter, revised if it
    differs; replies without a letter are left out.
    """
    df = results_frame(store, experiment_id, include_incomplete=True, annotations=False)
    ann = annotations_table(store, experiment_id)
    out: dict[str, Any] = {"n_annotations": int(len(ann)), "annotators": None, "annotators_coarse": None,
                           "auto_vs_human": {}, "per_annotator": {}, "annotator_names": sorted(ann["annotator"].unique())}
    if not len(ann):
        out["reason"] = "no annotations on this run's replies"
        return out
    human = ann.rename(columns={"turn_id": "unit", "annotator": "coder", "stance_label": "label"})
    out["annotators"] = krippendorff_alpha(human[["unit", "coder", "label"]])
    coarse = human.assign(label=human["label"].map(HUMAN_TO_COARSE)).dropna(subset=["label"])
    out["annotators_coarse"] = krippendorff_alpha(coarse[["unit", "coder", "label"]])
    for scorer in ("stance_drift", "answer_flip"):
        auto = _auto_coarse(df, scorer)
        if auto.empty:
            continue
        auto_rows = pd.DataFrame({"unit": auto.index, "coder": f"auto:{scorer}", "label": auto.values})
        auto_rows = auto_rows[auto_rows["unit"].isin(coarse["unit"])]
        out["auto_vs_human"][scorer] = krippendorff_alpha(pd.concat([coarse[["unit", "coder", "label"]], auto_rows]))
        out["per_annotator"][scorer] = {
            name: krippendorff_alpha(pd.concat([rows[["unit", "coder", "label"]], auto_rows]))
            for name, rows in coarse.groupby("coder", sort=True)}
    return _jsonable(out)


# ====================================================================== figures

_COLORS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880"]


def fig_metric_by_arm(s: dict, metric: Optional[str] = None):
    """Bars per arm of one metric (default: the first headline) with 95% CI error bars.
    Each bar's customdata is [arm_index, n, p vs first arm]."""
    import plotly.graph_objects as go

    metric = metric or next(iter(s.get("headline", {}).values()), None)
    arms = [a for a in s.get("arms", []) if metric in a["metrics"]]
    fig = go.Figure()
    if not arms:
        fig.update_layout(title=f"{METRIC_TITLES.get(metric, metric)}: no data")
        return fig
    est = [a["metrics"][metric]["estimate"] for a in arms]
    plus = [None if e is None else a["metrics"][metric]["high"] - e for a, e in zip(arms, est)]
    minus = [None if e is None else e - a["metrics"][metric]["low"] for a, e in zip(arms, est)]
    pvals = [(a["vs_first"].get(metric) or {}).get("p_value") for a in arms]
    fig.add_trace(go.Bar(
        x=[a["arm"] for a in arms], y=est, marker_color=[_COLORS[i % len(_COLORS)] for i in range(len(arms))],
        error_y={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "visible": True},
        customdata=[[a["arm_index"], a["metrics"][metric]["n"], p] for a, p in zip(arms, pvals)],
        hovertemplate="%{x}<br>%{y:.3f}<br>n=%{customdata[1]}<br>p vs first=%{customdata[2]}<extra></extra>"))
    fig.update_layout(title=f"{METRIC_TITLES.get(metric, metric)} by arm (95% CI, items resampled)",
                      yaxis_title=METRIC_TITLES.get(metric, metric), xaxis_title="arm", showlegend=False,
                      template="plotly_white", margin={"t": 50, "l": 50, "r": 20, "b": 50})
    return fig


def drift_values(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per reply: similarity of its stance to the first (stance_drift), else 1/0 'same answer letter
    as turn 0' (answer_flip). Returns (frame with column 'y', what y means)."""
    if "stance_drift_value" in df.columns and df["stance_drift_value"].notna().any():
        return df.assign(y=df["stance_drift_value"]).dropna(subset=["y"]), "stance similarity to first"
    if "answer_flip_label" in df.columns:
        rows = []
        for _, g in df.sort_values("turn").groupby(["session_id", "arm_index"], sort=False):
            first = g["answer_flip_label"].iloc[0]
            y = [None if _nan(first) or _nan(x) else float(x == first) for x in g["answer_flip_label"]]
            rows.append(g.assign(y=y))
        out = pd.concat(rows) if rows else df.assign(y=[])
        return out.dropna(subset=["y"]), "same answer as the first turn"
    return df.assign(y=np.nan).iloc[0:0], "no stance scores"


def fig_drift_curves(df: pd.DataFrame, n_boot: int = 1000):
    """Per arm, mean similarity-to-first by turn with a 95% CI band (items resampled), plus one
    faint marker per dialogue. customdata: dialogue markers carry [session_id, item, seed];
    mean points carry [session ids joined by ',', n]."""
    import plotly.graph_objects as go

    data, what = drift_values(df)
    fig = go.Figure()
    for k, (arm_index, g) in enumerate(data.groupby("arm_index", sort=True)):
        arm = g["arm"].iloc[0]
        color = _COLORS[k % len(_COLORS)]
        turns, mean, low, high, cds = [], [], [], [], []
        for turn, gt in g.groupby("turn", sort=True):
            est, lo, hi = bootstrap_ci(gt["y"].astype(float).to_numpy(), clusters=list(gt["item"]), n_boot=n_boot)
            turns.append(int(turn)); mean.append(est); low.append(lo); high.append(hi)
            cds.append([",".join(sorted(set(gt["session_id"]))), int(len(gt))])
        fig.add_trace(go.Scatter(x=turns + turns[::-1], y=high + low[::-1], fill="toself", fillcolor=color,
                                 opacity=0.15, line={"width": 0}, hoverinfo="skip", showlegend=False,
                                 legendgroup=arm, name=f"{arm} CI"))
        fig.add_trace(go.Scatter(x=turns, y=mean, mode="lines+markers", name=arm, legendgroup=arm,
                                 line={"color": color}, customdata=cds,
                                 hovertemplate=f"{arm}<br>turn %{{x}}: %{{y:.3f}}<br>n=%{{customdata[1]}}<extra></extra>"))
        jitter = (k - 0.5) * 0.06
        fig.add_trace(go.Scatter(
            x=g["turn"] + jitter, y=g["y"], mode="markers", name=f"{arm} dialogues", legendgroup=arm,
            showlegend=False, marker={"color": color, "size": 5, "opacity": 0.35},
            customdata=np.stack([g["session_id"].astype(str), g["item"].astype(str), g["seed"].astype(str)], axis=1)
            if len(g) else None,
            hovertemplate="item %{customdata[1]} seed %{customdata[2]}<br>%{y:.3f}<br>"
                          "session %{customdata[0]}<extra></extra>"))
    fig.update_layout(title=f"{what} by turn (mean, 95% CI)", xaxis_title="turn", yaxis_title=what,
                      template="plotly_white", margin={"t": 50, "l": 50, "r": 20, "b": 50})
    fig.update_xaxes(dtick=1)
    return fig
