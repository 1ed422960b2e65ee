"""The lab's Experiments tab: run a protocol against arms, watch runs, read their results.

The lab app calls `build_experiments_tab(ctx)` inside ``with gr.Tab("Experiments"):`` and gets a
dict of components back; ``result["session"]`` is the dropdown holding the session id of the
dialogue the researcher picked, for the app to wire "open in Sessions".

Runs go through `experiments.runner.run_protocol`, the same function as the CLI, on the lab's
model, one run at a time (RUN_QUEUE, `ctx.active_run`); its dialogues' turns go through the lab's step scheduler, so
they share forward passes with the Arena's tabs instead of blocking them. Stop sets the run's
threading.Event: the run stops at the next decoding step, is marked 'interrupted', and can be
resumed (here: pick it and press Resume; or `python -m experiments run --resume ID`). Runs
started from the CLI on the same database show up in the runs table (Refresh, or every 15 s)
with their progress, dialogues done / planned.

The handler functions (`validate_protocol`, `start_run`, `runs_rows`, `run_details`, ...) are
plain functions of (ctx, values) returning values, so they are testable without a browser.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import gradio as gr
import pandas as pd

from lab.context import RUN_QUEUE, LabContext
from lab.fields import FieldDropdown, FieldNumber

DEFAULT_ARMS = "observer\ncontinuity:linkage=1,gain=0.3"
CUSTOM = "(uploaded or pasted YAML)"
RUN_COLUMNS = ["run", "status", "progress", "protocol", "arms", "seeds", "items", "model", "started"]
DIALOGUE_COLUMNS = ["session", "item", "seed", "arms", "complete"]
RUN_LABEL, RUN_BUSY_LABEL = "Run", "Run (a run is in progress: one at a time)"


# ====================================================================== pure handlers


def shipped_protocol_names() -> list[str]:
    from experiments.protocol import PROTOCOL_DIR

    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def _read_upload(upload) -> Optional[tuple[str, str]]:
    if not upload:
        return None
    path = upload if isinstance(upload, str) else getattr(upload, "name", None) or str(upload)
    from pathlib import Path

    p = Path(path)
    return p.read_text(encoding="utf-8", errors="replace"), p.name


def resolve_protocol_input(choice: Optional[str], yaml_text: Optional[str], upload=None):
    """The protocol the form describes: pasted YAML first, then an uploaded file, else the shipped
    one chosen. Raises ProtocolError (message for the researcher)."""
    from experiments.protocol import ProtocolError, get_protocol, protocol_from_yaml_text

    if yaml_text and yaml_text.strip():
        return protocol_from_yaml_text(yaml_text, "<pasted protocol>")
    uploaded = _read_upload(upload)
    if uploaded is not None:
        return protocol_from_yaml_text(uploaded[0], uploaded[1])
    if not choice or choice == CUSTOM:
        raise ProtocolError("protocol", [("", "choose a shipped protocol, or paste / upload a YAML file")])
    try:
        return get_protocol(choice)
    except KeyError as exc:
        raise ProtocolError(choice, [("", str(exc.args[0]))]) from None


def describe_protocol(p) -> str:
    turns = "\n".join(f"{i}. {t}" for i, t in enumerate(p.turns))
    return (
        f"**{p.name}**: {len(p.items)} items, {p.n_turns} turns, scoring: {', '.join(p.scoring) or 'none'}"
        + (f", max_new_tokens {p.max_new_tokens}" if p.max_new_tokens else "")
        + (f"\n\n{p.description}" if p.description else "")
        + f"\n\n```\n{turns}\n```"
    )


def validate_protocol(choice, yaml_text, upload=None) -> str:
    from experiments.protocol import ProtocolError

    try:
        return "✅ " + describe_protocol(resolve_protocol_input(choice, yaml_text, upload))
    except ProtocolError as exc:
        return "❌ protocol problem:\n```\n" + str(exc) + "\n```"
    except Exception as exc:  # noqa: BLE001 - never crash on input
        return f"❌ could not read the protocol: {exc}"


def parse_arm_lines(text: str) -> list:
    from engine import SpecError, parse_arm

    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise SpecError("give at least one arm, one spec per line (e.g. observer)")
    specs = []
    for n, line in enumerate(lines, 1):
        try:
            specs.append(parse_arm(line))
        except SpecError as exc:
            raise SpecError(f"arm line {n} ({line!r}): {exc}") from None
    return specs


def _int(value, name: str, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    if value is None or value == "":
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if number != int(number) or number < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return int(number)


def runs_rows(store) -> pd.DataFrame:
    from experiments.analysis import list_runs

    rows = []
    for r in list_runs(store):
        planned = "?" if r["planned"] is None else r["planned"]
        rows.append(
            [
                r["id"],
                r["status"],
                f"{r['done']}/{planned}",
                r["protocol"],
                " | ".join(r["arms"]),
                r["seeds"],
                r["items"],
                r["model"],
                str(r["created_at"])[:19],
            ]
        )
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def run_choices(store) -> list[tuple[str, str]]:
    from experiments.analysis import list_runs

    return [
        (
            f"{r['id'][:8]} · {r['protocol']} · {r['status']} · {r['done']}/{r['planned'] or '?'} · "
            f"{str(r['created_at'])[:16]}",
            r["id"],
        )
        for r in list_runs(store)
    ]


def dialogue_rows(store, experiment_id: str) -> pd.DataFrame:
    rows = []
    for s in sorted(
        store.list_sessions(experiment_id=experiment_id), key=lambda s: (s["item_key"] or "", s["seed"] or 0)
    ):
        rows.append([s["id"], s["item_key"], s["seed"], s["n_arms"], (s.get("meta") or {}).get("complete", True)])
    return pd.DataFrame(rows, columns=DIALOGUE_COLUMNS)


DISAGREEMENT_COLUMNS = ["judge", "arm", "item", "seed", "turn", "annotator", "human", "judge_call", "reason", "text"]


def judge_human_disagreements(store, experiment_id: str) -> pd.DataFrame:
    """Every reply where a stance judge's call (each judge that scored the run) and a person's label
    differ; a judge call that failed shows as an empty judge_call."""
    from experiments.analysis import judge_disagreements, judges_in, results_frame

    df = results_frame(store, experiment_id)
    frames = []
    for judge in judges_in(df):
        d = judge_disagreements(results_frame(store, experiment_id, judge=judge))
        if len(d):
            frames.append(d.rename(columns={"judge": "judge_call"}).assign(judge=judge))
    if not frames:
        return pd.DataFrame(columns=DISAGREEMENT_COLUMNS)
    return pd.concat(frames, ignore_index=True)[DISAGREEMENT_COLUMNS]


AGREEMENT_HEADERS = ["between", "scale", "alpha", "units", "coders", "reading"]


def run_agreement(store, experiment_id: Optional[str]) -> pd.DataFrame:
    """Krippendorff's alpha of a run's human labels (between people, people vs each judge);
    empty for no run or a run nobody labelled; a failure is one row saying why."""
    from experiments.analysis import agreement_table

    if not experiment_id:
        return pd.DataFrame(columns=AGREEMENT_HEADERS)
    try:
        return agreement_table(store, experiment_id)
    except Exception as exc:  # noqa: BLE001 - never break the tab over the agreement table
        return pd.DataFrame([["-", "-", None, 0, 0, f"could not compute: {exc}"]], columns=AGREEMENT_HEADERS)


def say_when_flat(fig):
    """A bar chart whose every bar is 0 (or that has no bars) says so in words, not as an empty axis."""
    if fig is None:
        return fig
    ys = [
        y
        for tr in fig.data
        if getattr(tr, "type", "") == "bar" and tr.y is not None
        for y in tr.y
        if y is not None and y == y
    ]  # NaN: not scored
    if ys and any(abs(float(y)) > 0 for y in ys):
        return fig
    text = (
        "no value to show: nothing was scored" if not ys else "every arm is 0 here (nothing happened, not a blank plot)"
    )
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font=dict(size=14))
    return fig


def say_when_empty(fig, what: str = "nothing to plot: no scored turns in this run"):
    """A figure without a single point says so in words, not as a bare axis."""
    if fig is None:
        return fig

    def points(tr):
        ys = getattr(tr, "y", None)
        return ys is not None and any(y is not None and y == y for y in ys)

    if not any(points(tr) for tr in fig.data):
        fig.add_annotation(text=what, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font=dict(size=14))
    return fig


def compact_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The summary with one row per metric and one column per arm, each cell 'estimate · n k/ji · p':
    as many columns as arms (2-4), so it fits the page where one column per metric did not."""
    if table is None or table.empty or "arm" not in table.columns:
        return table
    cols = [c for c in table.columns if c != "arm"]
    metrics = [c for c in cols if not (c.endswith(" n") or c.endswith(" p"))]
    rows = []
    for m in metrics:
        row = {"metric": m}
        for _, r in table.iterrows():
            parts = [str(r[m]) if pd.notna(r[m]) and str(r[m]) != "" else "–"]
            if f"{m} n" in table.columns and pd.notna(r[f"{m} n"]) and str(r[f"{m} n"]) not in ("", "–"):
                parts.append(f"n {r[f'{m} n']}")
            if f"{m} p" in table.columns and pd.notna(r[f"{m} p"]) and str(r[f"{m} p"]) not in ("", "–"):
                parts.append(f"p {r[f'{m} p']}")
            row[str(r["arm"])] = " · ".join(parts)
        rows.append(row)
    return pd.DataFrame(rows, columns=["metric", *[str(a) for a in table["arm"]]])


def run_details(store, experiment_id: Optional[str], metric: Optional[str] = None) -> dict:
    """Everything the results pane shows for one run; `error` set instead of raising."""
    from experiments.analysis import (
        METRIC_TITLES,
        fig_drift_curves,
        fig_metric_by_arm,
        format_summary,
        results_frame,
        summary,
        summary_table,
    )

    out: dict[str, Any] = {
        "error": None,
        "summary": None,
        "table": pd.DataFrame(),
        "bar": None,
        "drift": None,
        "metrics": [],
        "metric": None,
        "dialogues": pd.DataFrame(columns=DIALOGUE_COLUMNS),
        "sessions": [],
        "text": "",
        "disagreements": pd.DataFrame(columns=DISAGREEMENT_COLUMNS),
    }
    if not experiment_id:
        out["error"] = "pick a run"
        return out
    try:
        s = summary(store, experiment_id)
        df = results_frame(store, experiment_id, annotations=False)
        out["summary"] = s
        out["metrics"] = [(METRIC_TITLES.get(m, m), m) for m in s.get("metrics", [])]
        metric = metric if metric in s.get("metrics", []) else next(iter(s.get("headline", {}).values()), None)
        out["metric"] = metric
        out["table"] = summary_table(s)
        out["text"] = format_summary(s)
        out["bar"] = fig_metric_by_arm(s, metric)
        out["drift"] = fig_drift_curves(df) if len(df) else None
        out["dialogues"] = dialogue_rows(store, experiment_id)
        out["disagreements"] = judge_human_disagreements(store, experiment_id)
        out["sessions"] = [
            (f"{r.item} · seed {r.seed}" + ("" if r.complete else " (incomplete)"), r.session)
            for r in out["dialogues"].itertuples()
        ]
    except Exception as exc:  # noqa: BLE001 - show it, never crash the tab
        out["error"] = f"could not summarise run {experiment_id}: {exc}"
    return out


def stop_run(ctx: LabContext, owner: Optional[str] = None) -> str:
    """Stop the lab's run in progress (`ctx.active_run`) if `owner` (the tab's token) started it."""
    active = ctx.active_run
    with active.lock:
        event, eid, started_by = active.event, active.experiment_id, active.owner
    if event is None:
        return "no run is in progress in this lab"
    if started_by != owner:
        return (
            f"run {eid or ''} was started in another tab (or window); only that tab can stop it — this one "
            "watches it in the runs table"
        )
    event.set()
    return f"stopping run {eid or ''} after the current step…"


def _run_settings(
    ctx: LabContext, choice, yaml_text, upload, arms_text, seeds, items, max_new_tokens, resume_id, window
):
    """(protocol, arm specs, seeds, items, max new tokens, window) from the form, or from the stored run
    being resumed; raises the one-line errors `start_run` reports."""
    from experiments.runner import load_run

    if resume_id:
        config = load_run(ctx.store, resume_id)
        return config.protocol, config.specs, config.seeds, config.items, config.max_new_tokens, config.window
    window_n = _int(window, "window", allow_none=True)
    protocol = resolve_protocol_input(choice, yaml_text, upload)
    specs = parse_arm_lines(arms_text)
    seeds_n = _int(seeds, "seeds")
    items_n = _int(items, "items", allow_none=True)
    mnt = _int(max_new_tokens, "max new tokens", allow_none=True)
    for spec in specs:
        spec.validate_for(ctx.lm.config.num_hidden_layers)
    return protocol, specs, seeds_n, items_n, mnt, window_n


def start_run(
    ctx: LabContext,
    choice,
    yaml_text,
    upload,
    arms_text,
    seeds,
    items,
    max_new_tokens,
    resume_id: Optional[str] = None,
    progress=None,
    window=None,
    owner: Optional[str] = None,
) -> tuple[str, Optional[str]]:
    """Validate the form and run (or resume) on the lab's model. Returns (message, experiment_id).
    `progress(done, total, info)` is the runner's callback; `window` an attention window in tokens
    (blank: the protocol's, else full attention); `owner` the token of the tab that may stop it."""
    from engine import DialogueError, SpecError
    from experiments.protocol import ProtocolError
    from experiments.runner import RunConfigError, run_protocol

    try:
        protocol, specs, seeds_n, items_n, mnt, window_n = _run_settings(
            ctx, choice, yaml_text, upload, arms_text, seeds, items, max_new_tokens, resume_id, window
        )
    except (ProtocolError, SpecError, RunConfigError, ValueError) as exc:
        return f"❌ {exc}", None
    except Exception as exc:  # noqa: BLE001
        return f"❌ {type(exc).__name__}: {exc}", None

    event, active = threading.Event(), ctx.active_run
    with active.lock:
        if active.event is not None:
            return "❌ a run is already in progress in this lab; stop it or wait", None
        active.event, active.experiment_id, active.owner = event, resume_id, owner
    state = {"id": resume_id}

    def on_progress(done, total, info):
        state["id"] = info.get("experiment_id", state["id"])
        with active.lock:
            active.experiment_id = state["id"]
        if progress is not None:
            progress(done, total, info)

    try:
        eid = run_protocol(
            ctx.store,
            ctx.lm,
            protocol,
            specs,
            seeds_n,
            items_n,
            mnt,
            experiment_id=resume_id,
            progress=on_progress,
            stop_event=event,
            window=window_n,
            stream=ctx.scheduler.stream,
        )
        status = ctx.store.get_experiment(eid)["status"]
        if status == "interrupted":
            return (
                f"⏸ run {eid} stopped; pick it and press Resume, or `python -m experiments run --resume {eid}`"
            ), eid
        return f"✅ run {eid} {status}", eid
    except (SpecError, RunConfigError, ProtocolError, DialogueError, ValueError) as exc:
        return f"❌ {exc}", state["id"]
    except Exception as exc:  # noqa: BLE001 - StoreError (locked DB) and the unexpected: say it
        hint = f"; rows already written are kept, resume run {state['id']}" if state["id"] else ""
        return f"❌ {type(exc).__name__}: {exc}{hint}", state["id"]
    finally:
        with active.lock:
            active.event, active.experiment_id, active.owner = None, None, None


# ====================================================================== what the results pane shows


def pick_run(store, experiment_id: Optional[str]) -> dict:
    """A picked run as the results pane shows it: compact summary, metric choices, plots that say when
    they have nothing to show, dialogues, status line and disagreements (an error: all empty, said once)."""
    d = run_details(store, experiment_id)
    if d["error"]:
        return dict(
            table=pd.DataFrame(),
            metrics=[],
            metric=None,
            bar=None,
            drift=None,
            sessions=[],
            session=None,
            dialogues=pd.DataFrame(columns=DIALOGUE_COLUMNS),
            status="" if not experiment_id else f"❌ {d['error']}",
            disagreements=pd.DataFrame(columns=DISAGREEMENT_COLUMNS),
        )
    return dict(
        table=compact_summary(d["table"]),
        metrics=d["metrics"],
        metric=d["metric"],
        bar=say_when_flat(d["bar"]),
        drift=say_when_empty(d["drift"]),
        sessions=d["sessions"],
        session=d["sessions"][0][1] if d["sessions"] else None,
        dialogues=d["dialogues"],
        status="",
        disagreements=d["disagreements"],
    )


def metric_figure(store, experiment_id: Optional[str], metric: Optional[str]):
    """The bar plot of another metric of the picked run (None when there is none to draw)."""
    from experiments.analysis import fig_metric_by_arm, summary

    if not experiment_id or not metric:
        return None
    try:
        return say_when_flat(fig_metric_by_arm(summary(store, experiment_id), metric))
    except Exception:  # noqa: BLE001
        return None


def run_button_ready(ctx: LabContext) -> bool:
    """Run is enabled unless a run is in progress in this lab (one model: one run at a time)."""
    return not ctx.active_run.busy


# ====================================================================== the tab (layout and wiring)


def _run_form(c: dict) -> None:
    """Protocol, arms and run settings, Run / Stop and the status line."""
    names = shipped_protocol_names()
    with gr.Row():
        with gr.Column(scale=2):
            c["protocol"] = FieldDropdown(
                names + [CUSTOM],
                value="are_you_sure" if "are_you_sure" in names else None,
                label="Protocol",
                info="a shipped protocol, or upload / paste YAML below",
            )
            with gr.Accordion("Upload or paste a protocol YAML", open=False):
                c["upload"] = gr.File(label="protocol .yaml", file_types=[".yaml", ".yml"], type="filepath")
                c["yaml"] = gr.Code(
                    language="yaml", label="pasted YAML (used when not empty)", lines=8, interactive=True
                )
                c["validate"] = gr.Button("Validate", size="sm")
            c["protocol_info"] = gr.Markdown()
        with gr.Column(scale=2):
            c["arms"] = gr.Textbox(
                DEFAULT_ARMS,
                lines=4,
                label="Arms, one spec per line",
                info="observer | NAME:key=value,… (greedy=false for seeds to matter)",
            )
            with gr.Row():
                c["seeds"] = FieldNumber(1, label="seeds", precision=0, minimum=1)
                # Textboxes: an untouched gr.Number shows 0, which would read as "zero items"
                c["items"] = gr.Textbox("", label="items (first K)", placeholder="all")
                c["max_new_tokens"] = gr.Textbox("", label="max new tokens", placeholder="protocol's")
                c["window"] = gr.Textbox(
                    "",
                    label="attention window (tokens)",
                    placeholder="protocol's / full",
                    info="every arm sees the first few tokens plus the last N",
                )
            with gr.Row():
                c["run"] = gr.Button(RUN_LABEL, variant="primary", elem_id="exp-run")
                c["stop"] = gr.Button("Stop", variant="stop", elem_id="exp-stop")
            c["status"] = gr.Markdown()


def _results_layout(ctx: LabContext, c: dict) -> None:
    """The runs table, the picked run's summary and plots, its dialogues, disagreements and agreement."""
    with gr.Row():
        c["refresh"] = gr.Button("Refresh runs", size="sm")
    c["runs"] = gr.Dataframe(
        value=_safe_runs(ctx), headers=RUN_COLUMNS, interactive=False, label="Runs", max_height=260
    )
    with gr.Row():
        c["run_id"] = FieldDropdown(choices=_safe_choices(ctx), value=None, label="Run", scale=3)
        c["resume"] = gr.Button("Resume this run", size="sm", scale=1)
    c["summary"] = gr.Dataframe(
        pd.DataFrame(columns=["metric"]),
        interactive=False,
        wrap=True,
        label="Summary: a row per metric, a column per arm (estimate [95% CI] · n · p vs the first arm)",
        elem_id="exp-summary",
    )
    gr.Markdown(
        "<sub>**n** reads *k/j*i: *k* scored values over *j* distinct protocol items (the "
        "confidence intervals resample items, so *j* is what counts); – : nothing scored.</sub>",
        elem_id="exp-summary-key",
    )
    c["metric"] = FieldDropdown(choices=[], label="Metric", interactive=True)
    with gr.Row():
        c["bar"] = gr.Plot(label="Metric by arm")
        c["drift"] = gr.Plot(label="Similarity to the first stance by turn", elem_id="exp-drift")
    with gr.Row():
        c["session"] = FieldDropdown(choices=[], value=None, label="Dialogue (session) behind the points", scale=3)
        c["open_session"] = gr.Button("Open in Sessions", scale=1, min_width=140)
    c["dialogues"] = gr.Dataframe(
        headers=DIALOGUE_COLUMNS, interactive=False, label="Dialogues of this run", max_height=260
    )
    c["disagreements"] = gr.Dataframe(
        headers=DISAGREEMENT_COLUMNS,
        interactive=False,
        max_height=260,
        wrap=True,
        label="Where a stance judge and the human labels disagree (label replies in "
        "Sessions or the Arena; re-judge with `python -m experiments rescore`)",
    )
    c["agreement"] = gr.Dataframe(
        headers=AGREEMENT_HEADERS,
        interactive=False,
        max_height=260,
        label="Agreement with the people who labelled this run (Krippendorff's alpha; "
        ">= 0.8 reliable, >= 0.667 tentative): read it before trusting the "
        "automatic stance column",
    )
    c["timer"] = gr.Timer(15)


def _wire_runs(ctx: LabContext, c: dict) -> None:
    """Validate, Run, Resume, Stop, Refresh; Run is disabled while a run is in progress in this lab."""

    def on_validate(choice, text, upload):
        return validate_protocol(choice, text, upload)

    for trigger in (c["validate"].click, c["protocol"].change):
        trigger(on_validate, [c["protocol"], c["yaml"], c["upload"]], c["protocol_info"], queue=False)

    def refreshed(selected=None):
        choices = _safe_choices(ctx)
        ids = [v for _, v in choices]
        return _safe_runs(ctx), gr.update(choices=choices, value=selected if selected in ids else None)

    c["owner"] = gr.State(lambda: uuid.uuid4().hex)  # this browser tab's token: its runs are its own to stop

    def on_run(owner, choice, text, upload, arms, seeds, items, mnt, window, progress=gr.Progress()):
        def cb(done, total, info):
            progress(
                (done, total),
                desc=f"run {info.get('experiment_id', '')[:8]}: {done}/{total} dialogues",
                unit="dialogues",
            )

        message, eid = start_run(
            ctx, choice, text, upload, arms, seeds, items, mnt, progress=cb, window=window, owner=owner
        )
        return (message, *refreshed(eid))

    def on_resume(owner, eid, progress=gr.Progress()):
        if not eid:
            return ("❌ pick a run to resume", *refreshed())

        def cb(done, total, info):
            progress((done, total), desc=f"run {eid[:8]}: {done}/{total} dialogues", unit="dialogues")

        message, eid2 = start_run(
            ctx, None, None, None, None, None, None, None, resume_id=eid, progress=cb, owner=owner
        )
        return (message, *refreshed(eid2 or eid))

    def run_button(ready=None):
        ready = run_button_ready(ctx) if ready is None else ready
        return gr.update(interactive=ready, value=RUN_LABEL if ready else RUN_BUSY_LABEL)

    form = [c["protocol"], c["yaml"], c["upload"], c["arms"], c["seeds"], c["items"], c["max_new_tokens"], c["window"]]
    for button, fn, inputs in (
        (c["run"], on_run, [c["owner"]] + form),
        (c["resume"], on_resume, [c["owner"], c["run_id"]]),
    ):
        button.click(lambda: run_button(False), None, c["run"], queue=False, api_name=False)
        button.click(
            fn, inputs, [c["status"], c["runs"], c["run_id"]], concurrency_id=RUN_QUEUE, concurrency_limit=1
        ).then(lambda: run_button(), None, c["run"], queue=False, api_name=False)
    c["stop"].click(lambda owner: stop_run(ctx, owner), [c["owner"]], c["status"], queue=False, api_name="stop_run")

    def on_refresh(selected):
        return refreshed(selected)

    c["refresh"].click(on_refresh, c["run_id"], [c["runs"], c["run_id"]], queue=False)
    c["timer"].tick(lambda: (_safe_runs(ctx), run_button()), None, [c["runs"], c["run"]], show_progress="hidden")


def _wire_results(ctx: LabContext, c: dict) -> None:
    """Picking a run fills the results pane; another metric redraws the bars; a dialogue row picks its session."""

    def on_pick(eid):
        v = pick_run(ctx.store, eid)
        return (
            v["table"],
            gr.update(choices=v["metrics"], value=v["metric"]),
            v["bar"],
            v["drift"],
            gr.update(choices=v["sessions"], value=v["session"]),
            v["dialogues"],
            v["status"],
            v["disagreements"],
        )

    pick_outputs = [
        c["summary"],
        c["metric"],
        c["bar"],
        c["drift"],
        c["session"],
        c["dialogues"],
        c["status"],
        c["disagreements"],
    ]
    c["run_id"].change(on_pick, c["run_id"], pick_outputs)
    c["run_id"].change(lambda eid: run_agreement(ctx.store, eid), c["run_id"], c["agreement"])

    def on_metric(eid, metric):
        return metric_figure(ctx.store, eid, metric)

    c["metric"].input(on_metric, [c["run_id"], c["metric"]], c["bar"])

    def on_dialogue_select(table, evt: gr.SelectData):
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            return gr.update(value=str(table.iloc[int(row)]["session"]))
        except Exception:  # noqa: BLE001
            return gr.update()

    c["dialogues"].select(on_dialogue_select, c["dialogues"], c["session"])


@dataclass
class ExperimentsTab:
    """The Experiments tab as the app wires it: the dialogue picked behind a point (`session`) and its
    'Open in Sessions' button; every component by name in `components` (for tests and layout)."""

    session: Any
    open_session: Any
    components: dict


def build_experiments_tab(ctx: LabContext) -> ExperimentsTab:
    """Build the tab's components in the current Blocks context."""
    c: dict[str, Any] = {}
    _run_form(c)
    _results_layout(ctx, c)
    _wire_runs(ctx, c)
    _wire_results(ctx, c)
    return ExperimentsTab(session=c["session"], open_session=c["open_session"], components=c)


def _safe_runs(ctx: LabContext) -> pd.DataFrame:
    try:
        return runs_rows(ctx.store)
    except Exception:  # noqa: BLE001 - a locked or broken DB must not break the page
        return pd.DataFrame(columns=RUN_COLUMNS)


def _safe_choices(ctx: LabContext) -> list:
    try:
        return run_choices(ctx.store)
    except Exception:  # noqa: BLE001
        return []
