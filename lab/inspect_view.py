"""The Inspect tab: why did a linked arm answer differently?

For one logged (session, arm, turn): the reply coloured by divergence from the observer, what the
arm's mechanism read for each generated token, how much attention the reply still puts on the
system prompt + first user message (every arm), memory size and reads on its own earlier answers
across the dialogue, and a token x token attention heatmap for one layer/head picked from a
layer x head overview. Computed on demand by one capture pass (eager attention) and cached in the
database, so reopening a turn is instant. Only the "Show" event runs the model (INSPECT_QUEUE, one
at a time), holding it between two steps of the scheduler; changing layer, head or metric redraws
from the cached arrays.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np

from engine import figures as F
from engine.capture import GRID_METRICS
from experiments.inspect import InspectError, InspectResult, inspect_turn

from .context import INSPECT_QUEUE, LabContext
from .fields import FieldDropdown, FieldNumber

HEADS_MEAN = "mean"
MEM_MEAN = "mean over layers"


# ------------------------------------------------------------------------------------------------
# Figure assembly from an InspectResult (no model; importable from notebooks and tests)
# ------------------------------------------------------------------------------------------------
def heatmap_figures(res: InspectResult, layer: int, head, metric: str):
    if res is None or res.attention is None:
        msg = "attention not captured" if res is not None else "pick a session, arm and turn, then press Show"
        return F.empty_figure(msg), F.empty_figure(msg)
    att = res.attention
    L = att["n_layers"]
    layer = int(min(max(int(layer or 0), 0), L - 1))
    head = HEADS_MEAN if head in (None, "", HEADS_MEAN) else int(head)
    metric = metric if metric in GRID_METRICS else "entropy"
    grid = F.overview_grid(
        res.grid(metric), metric, GRID_METRICS[metric] + " (rows that generated this reply)", selected=(layer, head)
    )
    a = res.attention_matrix(layer, head)
    label = res.arm_labels[res.arm_index]
    title = (
        f"arm {res.arm_index + 1} ({label}) · turn {res.turn_index + 1} · layer {layer} · head {head} · "
        f"{att['T']} tokens" + (f" in {att['S']} buckets" if att["S"] < att["T"] else "")
    )
    heat = F.attention_heatmap(a, att["bucket_labels"], title=title)
    return grid, heat


def memory_figure(res: InspectResult, mem_layer):
    if res is None or not res.memory:
        return F.empty_figure("no memory reads")
    layers = res.memory_layers()
    if not layers:
        return F.empty_figure("this arm has no memory mechanism, or it read nothing in this turn")
    tokens = res.memory["tokens"]
    chosen = [e for e in layers if str(e["layer"]) == str(mem_layer)]
    if chosen:
        e = chosen[0]
        slots, W, what = e["slots"], e["weights"], f"layer {e['layer']}"
    else:  # mean over read layers, slots aligned by key
        keys: list = []
        for e in layers:
            for s in e["slots"]:
                if s["key"] not in keys:
                    keys.append(s["key"])
        if all(isinstance(k, int) for k in keys):
            keys.sort()
        slot_of = {s["key"]: s for e in layers for s in e["slots"]}
        col = {k: i for i, k in enumerate(keys)}
        acc = np.zeros((len(tokens), len(keys)), np.float64)
        cnt = np.zeros((len(tokens), 1), np.float64)
        for e in layers:
            W = np.asarray(e["weights"], np.float64)
            ok = np.isfinite(W).all(1) & (W.shape[1] > 0)
            idx = [col[s["key"]] for s in e["slots"]]
            acc[np.ix_(ok, idx)] += W[ok]
            cnt[ok] += 1
        W = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
        slots, what = [slot_of[k] for k in keys], "mean over read layers " + ", ".join(str(e["layer"]) for e in layers)
    title = (
        f"memory read · arm {res.arm_index + 1} ({res.arm_labels[res.arm_index]}) · turn {res.turn_index + 1} · {what}"
    )
    return F.memory_read_figure(tokens, slots, W, title=title, current_turn=res.turn_index)


def curves_figure(res: InspectResult):
    """The mechanism's read scalars (surprise, write strength, ...) over the focus arm's transcript."""
    if res is None or not res.memory:
        return F.empty_figure("no memory reads")
    m = res.memory
    tr = m.get("transcript") or {}
    span = tr.get("reply_span")
    title = f"read scalars · arm {res.arm_index + 1} ({res.arm_labels[res.arm_index]}) · turns 1-{res.turn_index + 1}"
    return F.scalar_curves_figure(
        m.get("curves"), tr.get("tokens") or [], reply_span=tuple(span) if span else None, title=title
    )


def divergence_figure(res: InspectResult):
    if res is None or not res.divergence:
        return F.empty_figure("no divergence")
    d = res.divergence
    return F.divergence_strip(
        d["tokens"],
        d["kl_per_pos"],
        max_abs_dlogit=d["max_abs_dlogit_per_pos"],
        top1_agree=d["top1_agree_per_pos"],
        observer_top=d["observer_top_text"],
        summary=d,
        title=f"KL(P_arm ‖ P_observer) per token · arm {res.arm_index + 1} "
        f"({res.arm_labels[res.arm_index]}) · turn {res.turn_index + 1}",
    )


def source_figure(res: InspectResult):
    if res is None or not res.source:
        return F.empty_figure("no source-attention curves")
    return F.source_attention_curves(
        res.source["arms"],
        res.source["n_layers"],
        title=f"turn {res.turn_index + 1}: attention on system prompt + first user message "
        "(per layer third; row behind each generated token)",
    )


def summary_figure(res: InspectResult):
    if res is None or not res.summary:
        return F.empty_figure("no summary")
    return F.turn_summary_figure(
        res.summary, title=f"turns 1..{res.turn_index + 1}: memory size and reads on own earlier answers"
    )


def status_text(res: InspectResult) -> str:
    cached = all(res.cached.values()) if res.cached else False
    src = "from the cache" if cached else "computed now and cached"
    d = res.divergence or {}
    parts = [
        f"**session** `{res.session_id}` · **arm** {res.arm_index + 1} ({res.arm_labels[res.arm_index]}) · "
        f"**turn** {res.turn_index + 1} of {res.n_turns} · {src} in {res.seconds:.2f} s"
    ]
    if d:
        parts.append(
            f"KL mean {d.get('kl_mean', 0):.4f}, max {d.get('kl_max', 0):.4f} · max |Δlogit| "
            f"{d.get('max_abs_dlogit', 0):.3f} · mean |Δlogit| {d.get('mean_abs_dlogit', 0):.4f} · "
            f"top-1 agreement {d.get('top1_agreement', 1):.0%} over {d.get('n_positions', 0)} tokens"
        )
    for n in res.notes:
        parts.append(f"*note:* {_counted_from_one(n)}")
    return "\n\n".join(parts)


def _whole(what: str, value) -> int:
    """An arm or turn number from the form or the API (None -> 0), or an InspectError naming it."""
    if value is None or value == "":
        return 0
    try:
        number = float(value)
        if number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise InspectError(f"{what} must be a whole number, got {value!r:.40}") from None


def _arm_index(value) -> int:
    """The form's arm (counted from 1, as every view counts) -> the stored 0-based index (blank: the first)."""
    if value is None or value == "":
        return 0
    return _whole("arm", value) - 1


def _turn_index(value) -> int:
    """The form's turn (counted from 1, as every view counts) -> the stored 0-based index (blank: the first)."""
    if value is None or value == "":
        return 0
    return _whole("turn", value) - 1


def _turns_from_one(message: str) -> str:
    """The engine's 0-based turn wording ('turns 0..2; there is no turn 3') as the lab counts (1..3; 4)."""
    message = re.sub(r"turns 0\.\.(-?\d+)", lambda m: f"turns 1..{int(m.group(1)) + 1}", message)
    return re.sub(r"there is no turn (-?\d+)", lambda m: f"there is no turn {int(m.group(1)) + 1}", message)


def _counted_from_one(message: str) -> str:
    """The engine's 0-based turn and arm wording ('arms 0..1; there is no arm 5', a capture note 'arm 1: ...')
    as the lab counts them, from 1."""
    message = re.sub(r"arms 0\.\.(-?\d+)", lambda m: f"arms 1..{int(m.group(1)) + 1}", _turns_from_one(message))
    message = re.sub(r"there is no arm (-?\d+)", lambda m: f"there is no arm {int(m.group(1)) + 1}", message)
    return re.sub(r"^arm (\d+):", lambda m: f"arm {int(m.group(1)) + 1}:", message)


def _progress_words(text: str) -> str:
    """experiments.inspect's progress line as the lab words it: turns from 1, and the divergence pass said
    exactly (an older wording counted the observer among the arms 'compared with the observer')."""
    text = re.sub(r"\bturn (\d+)", lambda m: f"turn {int(m.group(1)) + 1}", text)
    return re.sub(
        r"comparing (\d+) arms? with the observer",
        lambda m: f"divergence from the observer for {m.group(1)} arm{'s' if m.group(1) != '1' else ''} of the turn",
        text,
    )


def _mem_choices(res):
    if res is None or not res.memory:
        return [MEM_MEAN]
    return [MEM_MEAN] + [str(e["layer"]) for e in res.memory.get("layers", [])]


# ------------------------------------------------------------------------------------------------
# The tab's controller: plain functions of (ctx, values) -> values, no Gradio
# ------------------------------------------------------------------------------------------------
FIGURE_KEYS = ("divergence", "memory", "grid", "heatmap", "source", "summary", "curves")
PROMPT = "pick a session, arm and turn, then press Show"


@dataclass
class Shown:
    """What Show puts on the page: the status line, the result (None: nothing shown) and its figures."""

    status: str
    result: InspectResult | None
    figures: dict
    mem_choices: list


def _nothing(status: str) -> Shown:
    blank = F.empty_figure(PROMPT)
    return Shown(status, None, {k: blank for k in FIGURE_KEYS}, [MEM_MEAN])


def show_turn(
    ctx: LabContext,
    sid,
    arm_no,
    turn_no,
    again,
    layer_v,
    head_v,
    metric_v,
    progress: Callable[[str], None] | None = None,
) -> Shown:
    """Inspect one logged turn (arm and turn counted from 1); a problem is the status line, never a raise."""
    sid = (sid or "").strip()
    if not sid:
        return _nothing("Enter a session id (or use Inspect in Arena / Sessions).")
    say = None if progress is None else (lambda text: progress(_progress_words(text)))
    try:
        # only a turn not yet captured runs the model (one pass for every arm): say so while it runs
        res = inspect_turn(
            ctx.store,
            ctx.lm,
            sid,
            _arm_index(arm_no),
            _turn_index(turn_no),
            lock=ctx.model_lock,
            recompute=bool(again),
            captures_dir=ctx.captures_dir or None,
            progress=say,
        )
    except InspectError as e:
        return _nothing(f"**Cannot inspect:** {_counted_from_one(str(e))}")
    except Exception as e:  # unknown session (StoreError) and anything unexpected: a message, not a crash
        return _nothing(f"**Cannot inspect:** {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    grid, heat = heatmap_figures(res, layer_v, head_v, metric_v)
    figures = dict(
        divergence=divergence_figure(res),
        memory=memory_figure(res, MEM_MEAN),
        grid=grid,
        heatmap=heat,
        source=source_figure(res),
        summary=summary_figure(res),
        curves=curves_figure(res),
    )
    return Shown(status_text(res), res, figures, _mem_choices(res))


def redraw_attention(res, layer_v, head_v, metric_v):
    """The overview and heatmap for another layer / head / metric, from the cached result."""
    try:
        return heatmap_figures(res, layer_v, head_v, metric_v)
    except Exception as e:
        msg = f"cannot draw: {e}"
        return F.empty_figure(msg), F.empty_figure(msg)


def redraw_memory(res, mem_v):
    try:
        return memory_figure(res, mem_v)
    except Exception as e:
        return F.empty_figure(f"cannot draw: {e}")


def export_figures(res, layer_v, head_v, metric_v, mem_v) -> tuple[list[str] | None, str]:
    """Every figure of the shown turn as HTML (and PNG where kaleido and a Chromium are there)."""
    if res is None:
        return None, "Show a turn first."
    out = Path(tempfile.mkdtemp(prefix="lab-inspect-"))
    stem = f"{res.session_id[:12]}-a{res.arm_index + 1}-t{res.turn_index + 1}"  # arm and turn counted from 1
    grid, heat = heatmap_figures(res, layer_v, head_v, metric_v)
    figs = {
        "divergence": divergence_figure(res),
        "memory": memory_figure(res, mem_v),
        "read-scalars": curves_figure(res),
        "grid": grid,
        f"attention-L{int(layer_v)}-h{head_v}": heat,
        "source": source_figure(res),
        "summary": summary_figure(res),
    }
    paths, msg = [], []
    for name, fig in figs.items():
        paths.append(str(F.to_html(fig, out / f"{stem}-{name}.html")))
    ok, why = F.png_available()
    if ok:
        try:
            for name, fig in figs.items():
                paths.append(str(F.to_png(fig, out / f"{stem}-{name}.png")))
        except F.PngExportError as e:
            msg.append(str(e))
    else:
        msg.append(why)
    return paths, ("Wrote " + f"{len(paths)} files. " + " ".join(msg)).strip()


# ------------------------------------------------------------------------------------------------
# Layout and wiring
# ------------------------------------------------------------------------------------------------
def _inspect_layout(n_layers: int, n_heads: int) -> dict:
    """The tab's components, by name."""
    gr.Markdown(
        "Pick a logged turn (or use **Inspect** in Arena / Sessions, then press **Show**). The first "
        "look at a turn runs one capture pass for all its arms (a few seconds on a CPU); after that every "
        "arm of the turn opens from the cache.",
        elem_classes=["lab-intro"],
    )
    c: dict = {"state": gr.State(None), "arm_index": gr.State(0)}  # arm_index: set by other tabs, 0-based
    with gr.Row():
        c["session"] = gr.Textbox(label="session id", scale=3, elem_id="inspect-session")
        c["arm_box"] = FieldNumber(
            label="arm",
            value=2,
            precision=0,
            minimum=1,
            scale=1,
            elem_id="inspect-arm",
            info="counted from 1, as in the Arena",
        )
        c["turn"] = FieldNumber(
            label="turn",
            value=1,
            precision=0,
            minimum=1,
            scale=1,
            elem_id="inspect-turn",
            info="counted from 1, as in the Arena",
        )
        c["recompute"] = gr.Checkbox(label="recompute", value=False, scale=1)
        c["show"] = gr.Button("Show", variant="primary", scale=1, elem_id="inspect-show")
    c["status"] = gr.Markdown("", elem_id="inspect-status")
    with gr.Accordion("Divergence from the observer (teacher-forced on this arm's reply)", open=True):
        c["divergence"] = gr.Plot(label="divergence strip", elem_id="inspect-divergence")
    with gr.Accordion("Memory read: what the mechanism read for each generated token", open=True):
        c["mem_layer"] = FieldDropdown([MEM_MEAN], value=MEM_MEAN, label="read layer", allow_custom_value=False)
        c["memory"] = gr.Plot(label="memory read", elem_id="inspect-memory")
        c["curves"] = gr.Plot(label="read scalars over the transcript", elem_id="inspect-curves")
    with gr.Accordion("Attention", open=True):
        with gr.Row():
            c["metric"] = FieldDropdown(list(GRID_METRICS), value="source", label="overview colour")
            c["layer"] = gr.Slider(0, n_layers - 1, value=n_layers // 2, step=1, label="layer")
            c["head"] = FieldDropdown([HEADS_MEAN] + [str(h) for h in range(n_heads)], value=HEADS_MEAN, label="head")
        with gr.Row():
            c["grid"] = gr.Plot(label="layer × head overview", elem_id="inspect-grid", scale=2)
            c["heatmap"] = gr.Plot(label="token × token", elem_id="inspect-heatmap", scale=3)
    with gr.Accordion("Across arms and turns", open=True):
        c["source"] = gr.Plot(label="source attention over generation", elem_id="inspect-source")
        c["summary"] = gr.Plot(label="turn summary", elem_id="inspect-summary")
    with gr.Accordion("Export", open=False):
        with gr.Row():
            c["export"] = gr.Button("Export figures (HTML, and PNG where available)", size="sm")
        c["files"] = gr.File(label="figures", file_count="multiple", interactive=False)
        c["export_msg"] = gr.Markdown("")
    return c


def _wire_show(ctx: LabContext, c: dict):
    """Show (typed arm, counted from 1) and the chained Show after another tab filled the 0-based arm index."""
    outputs = [
        c["status"],
        c["state"],
        c["divergence"],
        c["memory"],
        c["grid"],
        c["heatmap"],
        c["source"],
        c["summary"],
        c["mem_layer"],
        c["curves"],
    ]
    rest = [c["turn"], c["recompute"], c["layer"], c["head"], c["metric"]]

    def on_show(sid, arm_i, turn_i, again, layer_v, head_v, metric_v, progress=gr.Progress()):
        shown = show_turn(
            ctx, sid, arm_i, turn_i, again, layer_v, head_v, metric_v, progress=lambda text: progress(0, desc=text)
        )
        f = shown.figures
        return (
            shown.status,
            shown.result,
            f["divergence"],
            f["memory"],
            f["grid"],
            f["heatmap"],
            f["source"],
            f["summary"],
            gr.update(choices=shown.mem_choices, value=MEM_MEAN),
            f["curves"],
        )

    def on_show_index(sid, arm_index, turn_i, again, layer_v, head_v, metric_v, progress=gr.Progress()):
        number = _whole("arm", arm_index) + 1  # another tab's stored index, shown counted from 1
        return (*on_show(sid, number, turn_i, again, layer_v, head_v, metric_v, progress=progress), number)

    c["show"].click(
        on_show,
        inputs=[c["session"], c["arm_box"], *rest],
        outputs=outputs,
        concurrency_id=INSPECT_QUEUE,
        concurrency_limit=1,
        api_name="inspect_show",
    )

    def then_show(event):
        """Chain a Show after another tab's 'Inspect' button filled session / arm index / turn."""
        return event.success(
            on_show_index,
            inputs=[c["session"], c["arm_index"], *rest],
            outputs=[*outputs, c["arm_box"]],
            concurrency_id=INSPECT_QUEUE,
            concurrency_limit=1,
            api_name=False,
        )

    return on_show, then_show


def _wire_redraws(c: dict) -> None:
    """Layer / head / metric / read layer redraw from the cached result; Export writes the figures."""
    for comp in (c["layer"], c["head"], c["metric"]):
        comp.change(
            redraw_attention,
            inputs=[c["state"], c["layer"], c["head"], c["metric"]],
            outputs=[c["grid"], c["heatmap"]],
            api_name=False,
            trigger_mode="always_last",
        )
    c["mem_layer"].change(redraw_memory, inputs=[c["state"], c["mem_layer"]], outputs=[c["memory"]], api_name=False)
    c["export"].click(
        export_figures,
        inputs=[c["state"], c["layer"], c["head"], c["metric"], c["mem_layer"]],
        outputs=[c["files"], c["export_msg"]],
        api_name=False,
    )


@dataclass
class InspectTab:
    """The Inspect tab as other tabs see it. They fill `session`, `arm` (the 0-based arm index, a State)
    and `turn` (counted from 1), then chain `then_show(event)`; `arm_box` is the arm a person types,
    counted from 1. `show_fn` is the Show handler, callable without Gradio."""

    session: Any
    arm: Any
    arm_box: Any
    turn: Any
    show: Any
    status: Any
    state: Any
    layer: Any
    head: Any
    metric: Any
    mem_layer: Any
    plots: dict
    export: Any
    files: Any
    show_fn: Callable
    then_show: Callable


def build_inspect_tab(ctx: LabContext) -> InspectTab:
    """Build the tab in the current Blocks and return its typed parts."""
    c = _inspect_layout(ctx.lm.model.config.num_hidden_layers, ctx.lm.model.config.num_attention_heads)
    show_fn, then_show = _wire_show(ctx, c)
    _wire_redraws(c)
    return InspectTab(
        session=c["session"],
        arm=c["arm_index"],
        arm_box=c["arm_box"],
        turn=c["turn"],
        show=c["show"],
        status=c["status"],
        state=c["state"],
        layer=c["layer"],
        head=c["head"],
        metric=c["metric"],
        mem_layer=c["mem_layer"],
        plots={k: c[k] for k in FIGURE_KEYS},
        export=c["export"],
        files=c["files"],
        show_fn=show_fn,
        then_show=then_show,
    )
