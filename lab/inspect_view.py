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
from pathlib import Path

import gradio as gr
import numpy as np

from engine import figures as F
from engine.capture import GRID_METRICS
from experiments.inspect import InspectError, InspectResult, inspect_turn

from .fields import FieldDropdown, FieldNumber, FieldRadio
from .context import INSPECT_QUEUE, LabContext

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
    grid = F.overview_grid(res.grid(metric), metric, GRID_METRICS[metric] + " (rows that generated this reply)",
                           selected=(layer, head))
    a = res.attention_matrix(layer, head)
    label = res.arm_labels[res.arm_index]
    title = (f"arm {res.arm_index} ({label}) · turn {res.turn_index + 1} · layer {layer} · head {head} · "
             f"{att['T']} tokens" + (f" in {att['S']} buckets" if att["S"] < att["T"] else ""))
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
    title = f"memory read · arm {res.arm_index} ({res.arm_labels[res.arm_index]}) · turn {res.turn_index + 1} · {what}"
    return F.memory_read_figure(tokens, slots, W, title=title, current_turn=res.turn_index)


def curves_figure(res: InspectResult):
    """The mechanism's read scalars (surprise, write strength, ...) over the focus arm's transcript."""
    if res is None or not res.memory:
        return F.empty_figure("no memory reads")
    m = res.memory
    tr = m.get("transcript") or {}
    span = tr.get("reply_span")
    title = f"read scalars · arm {res.arm_index} ({res.arm_labels[res.arm_index]}) · turns 1-{res.turn_index + 1}"
    return F.scalar_curves_figure(m.get("curves"), tr.get("tokens") or [], reply_span=tuple(span) if span else None,
                                  title=title)


def divergence_figure(res: InspectResult):
    if res is None or not res.divergence:
        return F.empty_figure("no divergence")
    d = res.divergence
    return F.divergence_strip(d["tokens"], d["kl_per_pos"], max_abs_dlogit=d["max_abs_dlogit_per_pos"],
                              top1_agree=d["top1_agree_per_pos"], observer_top=d["observer_top_text"],
                              summary=d, title=f"KL(P_arm ‖ P_observer) per token · arm {res.arm_index} "
                                               f"({res.arm_labels[res.arm_index]}) · turn {res.turn_index + 1}")


def source_figure(res: InspectResult):
    if res is None or not res.source:
        return F.empty_figure("no source-attention curves")
    return F.source_attention_curves(res.source["arms"], res.source["n_layers"],
                                     title=f"turn {res.turn_index + 1}: attention on system prompt + first user message "
                                           "(per layer third; row behind each generated token)")


def summary_figure(res: InspectResult):
    if res is None or not res.summary:
        return F.empty_figure("no summary")
    return F.turn_summary_figure(res.summary, title=f"turns 1..{res.turn_index + 1}: memory size and reads on own "
                                                    "earlier answers")


def status_text(res: InspectResult) -> str:
    cached = all(res.cached.values()) if res.cached else False
    src = "from the cache" if cached else "computed now and cached"
    d = res.divergence or {}
    parts = [f"**session** `{res.session_id}` · **arm** {res.arm_index} ({res.arm_labels[res.arm_index]}) · "
             f"**turn** {res.turn_index + 1} of {res.n_turns} · {src} in {res.seconds:.2f} s"]
    if d:
        parts.append(f"KL mean {d.get('kl_mean', 0):.4f}, max {d.get('kl_max', 0):.4f} · max |Δlogit| "
                     f"{d.get('max_abs_dlogit', 0):.3f} · mean |Δlogit| {d.get('mean_abs_dlogit', 0):.4f} · "
                     f"top-1 agreement {d.get('top1_agreement', 1):.0%} over {d.get('n_positions', 0)} tokens")
    for n in res.notes:
        parts.append(f"*note:* {n}")
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


def _turn_index(value) -> int:
    """The form's turn (counted from 1, as every view counts) -> the stored 0-based index (blank: the first)."""
    if value is None or value == "":
        return 0
    return _whole("turn", value) - 1


def _turns_from_one(message: str) -> str:
    """The engine's 0-based turn wording ('turns 0..2; there is no turn 3') as the lab counts (1..3; 4)."""
    message = re.sub(r"turns 0\.\.(-?\d+)", lambda m: f"turns 1..{int(m.group(1)) + 1}", message)
    return re.sub(r"there is no turn (-?\d+)", lambda m: f"there is no turn {int(m.group(1)) + 1}", message)


def _progress_words(text: str) -> str:
    """experiments.inspect's progress line as the lab words it: turns from 1, and the divergence pass said
    exactly (its arm count includes the observer, whose divergence from itself is zero)."""
    text = re.sub(r"\bturn (\d+)", lambda m: f"turn {int(m.group(1)) + 1}", text)
    return re.sub(r"comparing (\d+) arms? with the observer",
                  lambda m: f"divergence from the observer for {m.group(1)} arm{'s' if m.group(1) != '1' else ''} "
                            "of the turn", text)


def _mem_choices(res):
    if res is None or not res.memory:
        return [MEM_MEAN]
    return [MEM_MEAN] + [str(e["layer"]) for e in res.memory.get("layers", [])]


# ------------------------------------------------------------------------------------------------
def build_inspect_tab(ctx: LabContext) -> dict:
    L = ctx.lm.model.config.num_hidden_layers
    H = ctx.lm.model.config.num_attention_heads
    gr.Markdown("Pick a logged turn (or use **Inspect** in Arena / Sessions, then press **Show**). The first "
                "look at a turn runs one capture pass for all its arms (a few seconds on a CPU); after that every "
                "arm of the turn opens from the cache.",
                elem_classes=["lab-intro"])
    res_state = gr.State(None)
    with gr.Row():
        session = gr.Textbox(label="session id", scale=3, elem_id="inspect-session")
        arm = FieldNumber(label="arm", value=1, precision=0, minimum=0, scale=1, elem_id="inspect-arm")
        turn = FieldNumber(label="turn", value=1, precision=0, minimum=1, scale=1, elem_id="inspect-turn",
                           info="counted from 1, as in the Arena")
        recompute = gr.Checkbox(label="recompute", value=False, scale=1)
        show = gr.Button("Show", variant="primary", scale=1, elem_id="inspect-show")
    status = gr.Markdown("", elem_id="inspect-status")
    with gr.Accordion("Divergence from the observer (teacher-forced on this arm's reply)", open=True):
        div_plot = gr.Plot(label="divergence strip", elem_id="inspect-divergence")
    with gr.Accordion("Memory read: what the mechanism read for each generated token", open=True):
        mem_layer = FieldDropdown([MEM_MEAN], value=MEM_MEAN, label="read layer", allow_custom_value=False)
        mem_plot = gr.Plot(label="memory read", elem_id="inspect-memory")
        curve_plot = gr.Plot(label="read scalars over the transcript", elem_id="inspect-curves")
    with gr.Accordion("Attention", open=True):
        with gr.Row():
            metric = FieldDropdown(list(GRID_METRICS), value="source", label="overview colour")
            layer = gr.Slider(0, L - 1, value=L // 2, step=1, label="layer")
            head = FieldDropdown([HEADS_MEAN] + [str(h) for h in range(H)], value=HEADS_MEAN, label="head")
        with gr.Row():
            grid_plot = gr.Plot(label="layer × head overview", elem_id="inspect-grid", scale=2)
            heat_plot = gr.Plot(label="token × token", elem_id="inspect-heatmap", scale=3)
    with gr.Accordion("Across arms and turns", open=True):
        src_plot = gr.Plot(label="source attention over generation", elem_id="inspect-source")
        sum_plot = gr.Plot(label="turn summary", elem_id="inspect-summary")
    with gr.Accordion("Export", open=False):
        with gr.Row():
            export_btn = gr.Button("Export figures (HTML, and PNG where available)", size="sm")
        files = gr.File(label="figures", file_count="multiple", interactive=False)
        export_msg = gr.Markdown("")

    blank = F.empty_figure("pick a session, arm and turn, then press Show")

    def on_show(sid, arm_i, turn_i, again, layer_v, head_v, metric_v, progress=gr.Progress()):
        sid = (sid or "").strip()
        nothing = (None, blank, blank, blank, blank, blank, blank, gr.update(choices=[MEM_MEAN], value=MEM_MEAN), blank)
        if not sid:
            return ("Enter a session id (or use Inspect in Arena / Sessions).",) + nothing
        try:
            # only a turn not yet captured runs the model (one pass for every arm): say so while it runs
            res = inspect_turn(ctx.store, ctx.lm, sid, _whole("arm", arm_i), _turn_index(turn_i), lock=ctx.model_lock,
                               recompute=bool(again), captures_dir=ctx.captures_dir or None,
                               progress=lambda text: progress(0, desc=_progress_words(text)))
        except InspectError as e:
            return (f"**Cannot inspect:** {_turns_from_one(str(e))}",) + nothing
        except Exception as e:  # unknown session (StoreError) and anything unexpected: a message, not a crash
            return (f"**Cannot inspect:** {str(e).splitlines()[0] if str(e) else type(e).__name__}",) + nothing
        grid, heat = heatmap_figures(res, layer_v, head_v, metric_v)
        choices = _mem_choices(res)
        return (status_text(res), res, divergence_figure(res), memory_figure(res, MEM_MEAN), grid, heat,
                source_figure(res), summary_figure(res), gr.update(choices=choices, value=MEM_MEAN), curves_figure(res))

    show_inputs = [session, arm, turn, recompute, layer, head, metric]
    show_outputs = [status, res_state, div_plot, mem_plot, grid_plot, heat_plot, src_plot, sum_plot, mem_layer,
                    curve_plot]
    show.click(on_show, inputs=show_inputs, outputs=show_outputs,
               concurrency_id=INSPECT_QUEUE, concurrency_limit=1, api_name="inspect_show")

    def then_show(event):
        """Chain a Show after another tab's 'Inspect' button filled session/arm/turn."""
        return event.success(on_show, inputs=show_inputs, outputs=show_outputs,
                             concurrency_id=INSPECT_QUEUE, concurrency_limit=1, api_name=False)

    def on_pick(res, layer_v, head_v, metric_v):
        try:
            return heatmap_figures(res, layer_v, head_v, metric_v)
        except Exception as e:
            msg = f"cannot draw: {e}"
            return F.empty_figure(msg), F.empty_figure(msg)

    for comp in (layer, head, metric):
        comp.change(on_pick, inputs=[res_state, layer, head, metric], outputs=[grid_plot, heat_plot],
                    api_name=False, trigger_mode="always_last")

    def on_mem(res, mem_v):
        try:
            return memory_figure(res, mem_v)
        except Exception as e:
            return F.empty_figure(f"cannot draw: {e}")

    mem_layer.change(on_mem, inputs=[res_state, mem_layer], outputs=[mem_plot], api_name=False)

    def on_export(res, layer_v, head_v, metric_v, mem_v):
        if res is None:
            return None, "Show a turn first."
        out = Path(tempfile.mkdtemp(prefix="lab-inspect-"))
        stem = f"{res.session_id[:12]}-a{res.arm_index}-t{res.turn_index + 1}"  # turn counted from 1
        grid, heat = heatmap_figures(res, layer_v, head_v, metric_v)
        figs = {"divergence": divergence_figure(res), "memory": memory_figure(res, mem_v),
                "read-scalars": curves_figure(res), "grid": grid,
                f"attention-L{int(layer_v)}-h{head_v}": heat, "source": source_figure(res),
                "summary": summary_figure(res)}
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

    export_btn.click(on_export, inputs=[res_state, layer, head, metric, mem_layer], outputs=[files, export_msg],
                     api_name=False)

    return dict(session=session, arm=arm, turn=turn, show=show, status=status, state=res_state,
                layer=layer, head=head, metric=metric, mem_layer=mem_layer, plots=dict(
                    divergence=div_plot, memory=mem_plot, curves=curve_plot, grid=grid_plot, heatmap=heat_plot, source=src_plot,
                    summary=sum_plot), export=export_btn, files=files, show_fn=on_show,
                then_show=then_show)
