"""The Arena tab: 2-4 arms of one model side by side, streamed from one batched Dialogue.

Per browser tab, an `ArenaTab` (in gr.State) holds the Dialogue, its SessionRecorder and the turns
so far. Gradio does not copy a State value between events (only its empty initial value once), so
the stop buttons, which run outside the model queue, reach the very Dialogue that is streaming.

Pane p shows arm `order[p]`: the identity, or in blind mode a random permutation drawn when the
session starts (stored in the session as `pane_order`: pane position -> arm index).
"""
from __future__ import annotations

import html
import inspect
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone

import gradio as gr

from db import STANCE_LABELS, StoreError
from engine import ArmReply, Dialogue, DialogueError, SpecError, parse_arm
from experiments.record import SessionRecorder

from .context import MODEL_QUEUE, LabContext
from .settings import (FIELDS, MECHANISM_CHOICES, SCOPES, SOURCES, pane_defaults, spec_from_controls, spec_string,
                       summary)

N_PANES = 4
LETTERS = "ABCD"
LOCK_OPEN = ("Settings take effect when a session starts (your first message). "
             "After that they are fixed until you press **New session**.")
LOCK_CLOSED = ("**Settings are fixed for this session**; press **New session** to change them "
               "(the number of arms, blind mode and the system prompt too).")


@dataclass
class LabTurn:
    user: str
    replies: list[ArmReply]  # by arm index
    turn_ids: list  # assistant turn id by arm index; None where it was not logged
    log_error: str | None = None


@dataclass
class ArenaTab:
    """One browser tab's arena conversation."""

    dialogue: Dialogue | None = None
    recorder: SessionRecorder | None = None
    order: list[int] = field(default_factory=list)  # pane -> arm index
    blind: bool = False
    revealed: bool = False
    turns: list[LabTurn] = field(default_factory=list)
    store_error: str | None = None  # why the session could not be created in the DB
    busy: bool = False
    can_rollback: bool = False
    failed_message: str | None = None  # the message of a turn whose generation failed

    @property
    def started(self) -> bool:
        return self.dialogue is not None

    @property
    def n(self) -> int:
        return len(self.order)

    @property
    def session_id(self) -> str | None:
        return self.recorder.session_id if self.recorder else None

    def arm_of(self, pane: int) -> int | None:
        return self.order[pane] if pane < len(self.order) else None

    def reset(self) -> None:
        if self.dialogue is not None:
            self.dialogue.stop_all()
        self.__init__()


def new_arena_tab() -> ArenaTab:
    """The State's initial value: called once per browser tab (a plain function, not the dataclass)."""
    return ArenaTab()


# ------------------------------------------------------------------------------------------ text
def reply_footer(r: ArmReply) -> str:
    n = len(r.token_ids)
    rate = f" · {n / r.duration_s:.1f} tok/s" if r.duration_s > 0 and n else ""
    reason = {"eos": "finished", "length": "hit the token limit", "stopped": "stopped"}.get(r.finish_reason,
                                                                                            r.finish_reason)
    return f"<sub>{n} token{'' if n == 1 else 's'} · {r.duration_s:.1f} s{rate} · {reason}</sub>"


def chat_history(tab: ArenaTab, arm: int) -> list[dict]:
    msgs = []
    for t in tab.turns:
        r = t.replies[arm]
        msgs.append({"role": "user", "content": t.user})
        msgs.append({"role": "assistant", "content": (r.text or "*(empty reply)*") + "\n\n" + reply_footer(r)})
    return msgs


def pane_header(tab: ArenaTab, pane: int, blind: bool, vals=None) -> str:
    """'Arm 1 · continuity λ=1' (settings visible) or 'Arm A' (blind)."""
    if tab.started:
        arm = tab.arm_of(pane)
        if arm is None:
            return f"### Arm {pane + 1}"
        spec = tab.dialogue.arms[arm].spec
        if tab.blind and not tab.revealed:
            return f"### Arm {LETTERS[pane]}"
        if tab.blind:
            return f"### Arm {LETTERS[pane]} = {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>"
        return f"### Arm {pane + 1} · {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>"
    if blind:
        return f"### Arm {LETTERS[pane]}"
    if vals is None:
        return f"### Arm {pane + 1}"
    try:
        spec = parse_arm(spec_string(*vals))
    except (SpecError, ValueError):
        return f"### Arm {pane + 1} · ⚠ invalid settings"
    return f"### Arm {pane + 1} · {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>"


def pane_name(tab: ArenaTab, pane: int, blind: bool) -> str:
    hidden = tab.blind if tab.started else blind
    return LETTERS[pane] if hidden else str(pane + 1)


def ann_title_text(tab: ArenaTab, pane: int, blind: bool, vals=None) -> str:
    """The title over a pane's labelling box: the header's first line, in bold."""
    first = pane_header(tab, pane, blind, vals).splitlines()[0].removeprefix("### ")
    return f"**{first}**"


def pane_info(tab: ArenaTab, pane: int) -> str:
    arm = tab.arm_of(pane)
    if arm is None or not tab.turns:
        return ""
    parts = [f"{len(tab.turns)} turn{'s' if len(tab.turns) != 1 else ''}"]
    mech = tab.dialogue.arms[arm].mechanism
    if mech is not None and not (tab.blind and not tab.revealed):
        parts.append(f"memory: {mech.memory_size()} entries")
    last = tab.turns[-1]
    if last.turn_ids[arm] is None:
        parts.append("⚠ last turn not logged")
    return "<sub>" + " · ".join(parts) + "</sub>"


def turn_choices(tab: ArenaTab) -> list[tuple[str, int]]:
    out = []
    for i, t in enumerate(tab.turns):
        u = t.user.strip().replace("\n", " ")
        out.append((f"Turn {i + 1}: {u[:40]}{'…' if len(u) > 40 else ''}", i))
    return out


def annotations_text(ctx: LabContext, turn_id) -> str:
    if turn_id is None:
        return ""
    try:
        sid = ctx.store.get_turn(turn_id)["session_id"]
        rows = [a for a in ctx.store.latest_annotations(sid) if a.get("turn_id") == turn_id]
    except StoreError as e:
        return f"⚠ {e}"
    if not rows:
        return "<sub>No annotation for this turn yet.</sub>"
    lines = []
    for a in rows:
        conf = "" if a.get("confidence") is None else f" ({a['confidence']:.2f})"
        note = f" — {html.escape(a['note'])}" if a.get("note") else ""
        lines.append(f"✓ **{html.escape(a['annotator'])}**: *{a['stance_label']}*{conf}{note}")
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------------------ UI
def named(fn, names: list[str]):
    """`fn(tab, *values)` with a signature naming each value, so the API shows real parameter names."""
    if inspect.isgeneratorfunction(fn):
        def wrapper(*args):
            yield from fn(*args)
    else:
        def wrapper(*args):
            return fn(*args)
    params = [inspect.Parameter("tab", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__name__ = fn.__name__
    return wrapper


_ALL_OUTPUT_NAMES = (["lock_note", "n_arms", "blind", "system", "title", "reveal", "status", "msg"]
                     + [f"arm{p + 1}_{k}" for p in range(N_PANES)
                        for k in ("header", "settings", "locked", "chat", "info", "turn", "saved", "stance", "note",
                                  "error", "label_title", "stop", "save")])
OUTPUT_NAMES = [n for n in _ALL_OUTPUT_NAMES if n != "reveal" and not n.endswith(("_settings", "_stop", "_save"))]
"""What an API client gets from /send, /regenerate, /new_session and /reveal, in order (buttons and
accordions among the outputs are not part of the API)."""


def build_arena_tab(ctx: LabContext) -> dict:
    """Build the Arena inside the current Tab; returns its components (and `wire_inspect`)."""
    n_layers = ctx.lm.model.config.num_hidden_layers
    tab_state = gr.State(new_arena_tab)

    gr.Markdown("Chat with **2–4 arms of the same model side by side**: the *observer* is the plain model, the others "
                "carry a memory mechanism at some linkage λ. One message goes to every arm; all stream at once. "
                "Label each reply below its pane (did the arm keep or revise its stance?). "
                "Every finished turn is logged to the database.", elem_classes=["lab-intro"])
    with gr.Row(equal_height=True):
        n_arms = gr.Radio([2, 3, 4], value=2, label="Arms", scale=1, min_width=140)
        blind = gr.Checkbox(label="Blind mode", value=False, scale=1, min_width=160,
                            info="hide which arm is which and shuffle the panes")
        annotator = gr.Textbox(value="", label="Annotator", placeholder="your name (for labels)", scale=2, min_width=160)
        title = gr.Textbox(value="", label="Session title", placeholder="optional", scale=2, min_width=160)
    with gr.Accordion("System prompt (optional, same for every arm)", open=False):
        system = gr.Textbox(value="", show_label=False, lines=2, placeholder="e.g. You are a helpful assistant.")
    lock_note = gr.Markdown(LOCK_OPEN, elem_classes=["lock-note"])

    panes = []
    with gr.Row(equal_height=False, elem_classes=["panes"]):
        for p in range(N_PANES):
            d = pane_defaults(p)
            with gr.Column(visible=p < 2, min_width=260, elem_classes=["pane"]) as col:
                header = gr.Markdown(pane_header(ArenaTab(), p, False, [d[f] for f in FIELDS]),
                                     elem_classes=["pane-header"], elem_id=f"arm{p + 1}-header")
                with gr.Accordion("Arm settings (click to change)", open=False,
                                  elem_classes=["pane-settings"]) as acc:
                    mech = gr.Dropdown(MECHANISM_CHOICES, value=d["mechanism"], label="Mechanism",
                                       info="observer = the plain model, no memory")
                    with gr.Group(visible=d["mechanism"] != "observer") as mech_box:
                        linkage = gr.Slider(0, 1, value=d["linkage"], step=0.05, label="Linkage λ",
                                            info="0 = like the observer, 1 = full")
                        with gr.Row():
                            gain = gr.Number(value=d["gain"], label="Gain", minimum=0, maximum=10, step=0.05,
                                             min_width=80)
                            layers = gr.Textbox(value=d["layers"], label="Layers", placeholder="default 15/22/28",
                                                min_width=100)
                        with gr.Row():
                            source = gr.Dropdown(SOURCES, value=d["source"], label="Source", min_width=80,
                                                 info="tokens written")
                            scope = gr.Dropdown(SCOPES, value=d["scope"], label="Scope", min_width=80,
                                                info="memory kept for")
                    with gr.Row():
                        greedy = gr.Checkbox(value=d["greedy"], label="Greedy", min_width=80)
                        seed = gr.Number(value=d["seed"], label="Seed", precision=0, minimum=0, min_width=80)
                        max_new = gr.Number(value=d["max_new_tokens"], label="Max new tokens", precision=0,
                                            minimum=1, maximum=8192, min_width=100)
                    with gr.Row(visible=not d["greedy"]) as samp_row:
                        temperature = gr.Slider(0.05, 2.0, value=d["temperature"], step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="Top-p")
                err = gr.Markdown("", elem_classes=["pane-error"])
                locked = gr.Markdown("", visible=False, elem_classes=["pane-locked"])
                chat = gr.Chatbot(value=[], show_label=False, height=360, elem_classes=["pane-chat"],
                                  placeholder="Replies appear here.", buttons=["copy"], elem_id=f"arm{p + 1}-chat")
                with gr.Row(equal_height=True):
                    info = gr.Markdown("", elem_classes=["pane-info"])
                    stop = gr.Button(f"Stop arm {p + 1}", size="sm", variant="stop", scale=0, min_width=110,
                                     elem_classes=["pane-stop"])
            controls = [mech, linkage, gain, layers, source, scope, seed, greedy, temperature, top_p, max_new]
            assert len(controls) == len(FIELDS)
            panes.append(dict(col=col, header=header, acc=acc, mech_box=mech_box, samp_row=samp_row, err=err,
                              locked=locked, chat=chat, info=info, stop=stop, controls=controls))

    with gr.Row(equal_height=True):
        msg = gr.Textbox(show_label=False, placeholder="Message to every arm — Enter sends, Shift+Enter for a new line",
                         lines=1, max_lines=8, scale=8, autofocus=True, elem_id="lab-message")
        send_btn = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="lab-send")
    with gr.Row():
        stop_all_btn = gr.Button("Stop all", variant="stop", size="sm")
        regen_btn = gr.Button("Regenerate last turn", size="sm")
        new_btn = gr.Button("New session", size="sm")
        reveal_btn = gr.Button("Reveal arms", size="sm", visible=False)
    status = gr.Markdown("", elem_id="lab-status")

    gr.Markdown("#### Label the replies\n<sub>Pick a turn, a stance label, optionally a note and your confidence, "
                "then **Save label**. You can label while the next turn is streaming. Enter your name under "
                "**Annotator** at the top.</sub>", elem_classes=["ann-intro"])
    with gr.Row(equal_height=False, elem_classes=["annotate-row"]):
        for p in range(N_PANES):
            with gr.Column(visible=p < 2, min_width=260, elem_classes=["pane-annotate"],
                           elem_id=f"arm{p + 1}-label") as ann_col:
                ann_title = gr.Markdown(ann_title_text(ArenaTab(), p, False, panes[p]["controls"] and
                                                        [c.value for c in panes[p]["controls"]]),
                                        elem_classes=["ann-title"])
                turn_sel = gr.Dropdown(choices=[], value=None, label="Turn", interactive=True,
                                       info="the latest is selected after each reply")
                stance = gr.Radio(STANCE_LABELS, value=None, label="Stance", elem_classes=["stance"])
                with gr.Row(equal_height=True):
                    note = gr.Textbox(value="", label="Note", placeholder="optional", lines=1, scale=3, min_width=120)
                    confidence = gr.Slider(0, 1, value=0.8, step=0.05, label="Confidence", scale=2, min_width=120)
                with gr.Row():
                    save = gr.Button(f"Save label for arm {p + 1}", size="sm", variant="primary")
                    inspect_btn = gr.Button("Inspect", size="sm", visible=False)
                saved = gr.Markdown("", elem_classes=["saved"], elem_id=f"arm{p + 1}-saved")
            panes[p].update(ann_col=ann_col, ann_title=ann_title, turn_sel=turn_sel, stance=stance, note=note,
                            confidence=confidence, save=save, inspect=inspect_btn, saved=saved)

    all_controls = [c for pn in panes for c in pn["controls"]]

    # ---------------------------------------------------------------- rendering
    def settings_of(vals, p):
        k = len(FIELDS)
        return vals[p * k:(p + 1) * k]

    def full_render(tab: ArenaTab, blind_value: bool, vals, status_text=None, clear_msg=False) -> dict:
        out = {lock_note: LOCK_CLOSED if tab.started else LOCK_OPEN,
               n_arms: gr.update(interactive=not tab.started),
               blind: gr.update(interactive=not tab.started),
               system: gr.update(interactive=not tab.started),
               title: gr.update(interactive=not tab.started),
               reveal_btn: gr.update(visible=tab.started and tab.blind and not tab.revealed)}
        if status_text is not None:
            out[status] = status_text
        if clear_msg:
            out[msg] = ""
        choices = turn_choices(tab)
        for p, pn in enumerate(panes):
            arm = tab.arm_of(p)
            hidden = tab.blind and not tab.revealed if tab.started else blind_value
            out[pn["header"]] = pane_header(tab, p, blind_value, settings_of(vals, p) if vals else None)
            out[pn["acc"]] = gr.update(visible=not tab.started and not blind_value)
            name = pane_name(tab, p, blind_value)
            out[pn["stop"]] = gr.update(value=f"Stop arm {name}")
            out[pn["save"]] = gr.update(value=f"Save label for arm {name}")
            out[pn["ann_title"]] = ann_title_text(tab, p, blind_value, settings_of(vals, p) if vals else None)
            if tab.started and arm is not None and not hidden:
                out[pn["locked"]] = gr.update(visible=True, value=f"<sub>fixed: `{tab.dialogue.arms[arm].spec.to_string()}`</sub>")
            else:
                out[pn["locked"]] = gr.update(visible=False, value="")
            out[pn["chat"]] = chat_history(tab, arm) if arm is not None else []
            out[pn["info"]] = pane_info(tab, p)
            out[pn["turn_sel"]] = gr.update(choices=choices, value=choices[-1][1] if choices else None)
            out[pn["saved"]] = ""
            out[pn["stance"]] = None
            out[pn["note"]] = ""
            if tab.started:
                out[pn["err"]] = ""
        return out

    full_outputs = ([lock_note, n_arms, blind, system, title, reveal_btn, status, msg]
                    + [pn[k] for pn in panes for k in ("header", "acc", "locked", "chat", "info", "turn_sel", "saved",
                                                         "stance", "note", "err", "ann_title", "stop", "save")])
    assert [n for n, c in zip(_ALL_OUTPUT_NAMES, full_outputs) if not c.skip_api] == OUTPUT_NAMES

    # ---------------------------------------------------------------- the turn
    def start_session(tab: ArenaTab, message, n, blind_value, system_text, title_text, annotator_name, vals):
        """Create the Dialogue and the DB session from the settings; return {pane: error} if refused."""
        n = int(n or 2)
        if not 2 <= n <= N_PANES:
            return {0: f"the number of arms must be 2 to {N_PANES}, not {n}"}
        specs, errors = [], {}
        for p in range(n):
            try:
                specs.append(spec_from_controls(settings_of(vals, p), n_layers))
            except (SpecError, ValueError) as e:
                errors[p] = str(e).splitlines()[0] if str(e) else type(e).__name__
        if errors:
            return errors
        try:
            dialogue = Dialogue(ctx.lm, specs, system=(system_text or "").strip() or None)
        except (SpecError, DialogueError) as e:
            return {0: str(e)}
        order = list(range(n))
        if blind_value:
            random.shuffle(order)
        tab.dialogue, tab.order, tab.blind = dialogue, order, bool(blind_value)
        try:
            tab.recorder = SessionRecorder(
                ctx.store, ctx.lm, dialogue, kind="lab",
                title=(title_text or "").strip() or message.strip().replace("\n", " ")[:80],
                user=(annotator_name or "").strip() or None, blind=bool(blind_value), pane_order=order,
                meta={"pane_order": "pane position -> arm index", "source": "lab arena"})
        except (StoreError, ValueError) as e:
            tab.recorder, tab.store_error = None, str(e)
        return {}

    def run_turn(tab: ArenaTab, message: str, blind_value, vals, clear_msg: bool):
        """Stream one turn to every pane, log it, and render. A generator of update dicts."""
        d = tab.dialogue
        base = [chat_history(tab, tab.arm_of(p)) if p < tab.n else [] for p in range(N_PANES)]
        user_msg = {"role": "user", "content": message}
        yield {**{panes[p]["chat"]: base[p] + [user_msg, {"role": "assistant", "content": "…"}]
                  for p in range(tab.n)},
               status: "Generating… (Stop buttons work while it runs)", **({msg: ""} if clear_msg else {})}
        it = d.stream(message)
        ev = None
        tab.busy = True
        try:
            while True:
                with ctx.model_lock:
                    try:
                        ev = next(it)
                    except StopIteration:
                        break
                if ev.replies is not None:
                    break
                upd = {status: f"Generating… step {ev.step} (Stop buttons work while it runs)"}
                for p in range(tab.n):
                    a = tab.arm_of(p)
                    text = ev.texts[a] + ("" if ev.done[a] else " ▌")
                    upd[panes[p]["chat"]] = base[p] + [user_msg, {"role": "assistant", "content": text}]
                yield upd
        except DialogueError as e:  # refused before anything changed
            tab.busy = False
            gr.Warning(str(e))
            upd = {status: f"⚠ Not sent: {e}"}
            for p in range(tab.n):
                upd[panes[p]["chat"]] = base[p]
            if clear_msg:
                upd[msg] = message  # give the text back to edit
            yield upd
            return
        except GeneratorExit:  # the browser went away mid-turn: keep the turn the dialogue kept
            with ctx.model_lock:
                it.close()
            tab.busy = False
            if d.turn == len(tab.turns) + 1:
                record_turn(tab, message, [a.replies[-1] for a in d.arms])
            raise
        except Exception as e:  # the dialogue rolled itself back to before the turn
            tab.busy = False
            tab.can_rollback = False
            tab.failed_message = message
            first = (str(e).splitlines() or [type(e).__name__])[0]
            upd = {status: f"✗ Generation failed: {type(e).__name__}: {first}. Earlier turns are intact; "
                           "press **Regenerate** to try this message again."}
            for p in range(tab.n):
                upd[panes[p]["chat"]] = base[p]
                upd[panes[p]["info"]] = f"✗ generation failed: {html.escape(first)}"
            yield upd
            return
        tab.busy = False
        if ev is None or ev.replies is None:
            return
        note = record_turn(tab, message, ev.replies)
        yield full_render(tab, blind_value, vals, status_text=note, clear_msg=clear_msg)

    def record_turn(tab: ArenaTab, message: str, replies: list[ArmReply]) -> str:
        turn = LabTurn(message, list(replies), [None] * len(replies))
        k = len(tab.turns) + 1
        if tab.recorder is not None:
            try:
                turn.turn_ids = list(tab.recorder.log(message, replies))
            except (StoreError, ValueError) as e:
                turn.log_error = str(e)
        else:
            turn.log_error = tab.store_error or "no database session"
        tab.turns.append(turn)
        tab.can_rollback, tab.failed_message = True, None
        if turn.log_error:
            return (f"⚠ Turn {k} was **not logged**: {turn.log_error}. The chat continues; this turn stays in "
                    "memory only (it cannot be annotated).")
        stopped = [LETTERS[p] if tab.blind else str(p + 1) for p in range(tab.n)
                   if replies[tab.arm_of(p)].finish_reason == "stopped"]
        extra = f" Stopped: arm {', '.join(stopped)}." if stopped else ""
        return f"✓ Turn {k} logged to session `{tab.session_id}`.{extra}"

    def send(tab: ArenaTab, message, n, blind_value, system_text, title_text, annotator_name, *vals):
        message = message if isinstance(message, str) else ""
        if not message.strip():
            gr.Warning("The message is empty — nothing was sent.")
            yield {status: "⚠ The message is empty — nothing was sent."}
            return
        if not tab.started:
            errors = start_session(tab, message, n, blind_value, system_text, title_text, annotator_name, vals)
            if errors:
                upd = {status: "⚠ Not sent: fix the arm settings marked in red.", msg: message}
                for p, pn in enumerate(panes):
                    upd[pn["err"]] = f"⚠ {html.escape(errors[p])}" if p in errors else ""
                yield upd
                return
            yield full_render(tab, blind_value, vals, status_text="Starting…")
        yield from run_turn(tab, message, blind_value, vals, clear_msg=True)

    def regenerate(tab: ArenaTab, blind_value, *vals):
        if not tab.started or (not tab.turns and not tab.failed_message):
            yield {status: "⚠ Nothing to regenerate yet: send a message first."}
            return
        if tab.failed_message is not None and not tab.can_rollback:
            message = tab.failed_message
        else:
            if not tab.can_rollback:
                yield {status: "⚠ Only the last turn can be regenerated, once."}
                return
            last = tab.turns[-1]
            if tab.recorder is not None and any(i is not None for i in last.turn_ids):
                try:
                    tab.recorder.undo_last()
                except StoreError as e:
                    yield {status: f"⚠ Could not remove the last turn from the database: {e}. Nothing changed."}
                    return
            try:
                tab.dialogue.rollback()
            except DialogueError as e:
                yield {status: f"⚠ {e}"}
                return
            tab.turns.pop()
            tab.can_rollback = False
            message = last.user
        yield from run_turn(tab, message, blind_value, vals, clear_msg=False)

    def stop_pane(p):
        def fn(tab: ArenaTab):
            arm = tab.arm_of(p)
            if tab.dialogue is not None and arm is not None and tab.busy:
                tab.dialogue.stop_arm(arm)
                return f"■ Stopping arm {LETTERS[p] if tab.blind else p + 1}…"
            return gr.skip()
        return fn

    def stop_all(tab: ArenaTab):
        if tab.dialogue is not None and tab.busy:
            tab.dialogue.stop_all()
            return "■ Stopping every arm…"
        return gr.skip()

    def new_session(tab: ArenaTab, blind_value, *vals):
        tab.reset()
        out = full_render(tab, blind_value, vals, status_text="New session: adjust the settings if you like, then "
                                                              "send a message.", clear_msg=False)
        return out

    def reveal(tab: ArenaTab, blind_value, *vals):
        if not tab.started or not tab.blind:
            return {status: "Nothing to reveal."}
        tab.revealed = True
        if tab.recorder is not None:
            try:
                s = ctx.store.get_session(tab.session_id)
                ctx.store.update_session(tab.session_id, meta={**(s.get("meta") or {}),
                                                               "revealed_at": datetime.now(timezone.utc).isoformat()})
            except StoreError:
                pass
        mapping = ", ".join(f"Arm {LETTERS[p]} = {tab.dialogue.arms[tab.arm_of(p)].spec.display_label}"
                            for p in range(tab.n))
        out = full_render(tab, blind_value, vals, status_text=f"Revealed: {mapping}.")
        # keep what the annotator is doing in the annotation boxes
        for pn in panes:
            for k in ("turn_sel", "saved", "stance", "note"):
                out.pop(pn[k], None)
        return out

    def annotate_pane(p):
        def fn(tab: ArenaTab, name, turn_index, label, note_text, conf):
            arm = tab.arm_of(p)
            if arm is None or not tab.turns:
                return "⚠ No reply to label yet."
            if not (name or "").strip():
                gr.Warning("Enter your name in Annotator (top of the page) first.")
                return "⚠ Enter your name in **Annotator** (top of the page) first."
            if not label:
                return "⚠ Pick a stance label first."
            try:
                k = int(turn_index) if turn_index is not None else len(tab.turns) - 1
                turn = tab.turns[k]
            except (ValueError, TypeError, IndexError):
                return "⚠ Pick a turn first."
            tid = turn.turn_ids[arm]
            if tid is None:
                return f"⚠ Turn {k + 1} was not logged ({turn.log_error}); it cannot be annotated."
            try:
                ctx.store.annotate(tid, name.strip(), label, note_text or "",
                                   confidence=None if conf is None else float(conf))
            except (StoreError, ValueError) as e:
                return f"⚠ Not saved: {e}"
            return f"Saved for turn {k + 1}.\n\n" + annotations_text(ctx, tid)
        return fn

    def show_annotations(p):
        def fn(tab: ArenaTab, turn_index):
            arm = tab.arm_of(p)
            try:
                tid = tab.turns[int(turn_index)].turn_ids[arm]
            except (ValueError, TypeError, IndexError):
                return ""
            return annotations_text(ctx, tid)
        return fn

    # ---------------------------------------------------------------- events
    ctrl_names = [f"arm{p + 1}_{f}" for p in range(N_PANES) for f in FIELDS]
    send = named(send, ["message", "n_arms", "blind", "system_prompt", "title", "annotator"] + ctrl_names)
    regenerate = named(regenerate, ["blind"] + ctrl_names)
    new_session = named(new_session, ["blind"] + ctrl_names)
    reveal = named(reveal, ["blind"] + ctrl_names)
    common = [tab_state]
    top = [n_arms, blind, system, title, annotator]
    model_bound = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    send_ev = gr.on([msg.submit, send_btn.click], send, inputs=common + [msg] + top + all_controls,
                    outputs=full_outputs, api_name="send", show_progress="hidden", **model_bound)
    regen_ev = regen_btn.click(regenerate, inputs=common + [blind] + all_controls, outputs=full_outputs,
                               api_name="regenerate", show_progress="hidden", **model_bound)
    stop_all_btn.click(stop_all, inputs=common, outputs=[status], api_name="stop_all", queue=False)
    for p, pn in enumerate(panes):
        pn["stop"].click(stop_pane(p), inputs=common, outputs=[status], api_name=f"stop_arm_{p + 1}", queue=False)
    # New session: stop what is running now (outside the queue), then reset once the turn has finished.
    new_btn.click(stop_all, inputs=common, outputs=[status], queue=False, api_name=False).then(
        new_session, inputs=common + [blind] + all_controls, outputs=full_outputs, api_name="new_session",
        **model_bound)
    reveal_btn.click(reveal, inputs=common + [blind] + all_controls, outputs=full_outputs, api_name="reveal")

    for p, pn in enumerate(panes):
        pn["save"].click(annotate_pane(p),
                         inputs=common + [annotator, pn["turn_sel"], pn["stance"], pn["note"], pn["confidence"]],
                         outputs=[pn["saved"]], api_name=f"annotate_arm_{p + 1}")
        pn["turn_sel"].input(show_annotations(p), inputs=common + [pn["turn_sel"]], outputs=[pn["saved"]],
                             api_name=False, show_progress="hidden")

    # settings (before a session): live header, mechanism/sampling boxes, pane count, blind
    def header_fn(p):
        def fn(tab: ArenaTab, blind_value, *v):
            if tab.started:
                return gr.skip(), gr.skip()
            return pane_header(tab, p, blind_value, list(v)), ann_title_text(tab, p, blind_value, list(v))
        return fn

    for p, pn in enumerate(panes):
        c = pn["controls"]
        c[0].change(lambda m: gr.update(visible=m != "observer"), inputs=[c[0]], outputs=[pn["mech_box"]],
                    queue=False, api_name=False, show_progress="hidden")
        c[7].change(lambda g: gr.update(visible=not g), inputs=[c[7]], outputs=[pn["samp_row"]], queue=False,
                    api_name=False, show_progress="hidden")
        triggers = [c[0].change, c[1].release, c[8].release, c[9].release] + [c[i].change for i in (2, 3, 4, 5, 6, 7, 10)]
        gr.on(triggers, header_fn(p), inputs=common + [blind] + c, outputs=[pn["header"], pn["ann_title"]],
              queue=False, api_name=False, show_progress="hidden")

    n_arms.change(lambda n: [gr.update(visible=p < int(n or 2)) for p in range(N_PANES)], inputs=[n_arms],
                  outputs=[pn["col"] for pn in panes], queue=False, api_name=False, show_progress="hidden")
    n_arms.change(lambda n: [gr.update(visible=p < int(n or 2)) for p in range(N_PANES)], inputs=[n_arms],
                  outputs=[pn["ann_col"] for pn in panes], queue=False, api_name=False, show_progress="hidden")

    def blind_changed(tab: ArenaTab, blind_value, *vals):
        out = {}
        for p, pn in enumerate(panes):
            out[pn["header"]] = pane_header(tab, p, blind_value, settings_of(vals, p))
            out[pn["ann_title"]] = ann_title_text(tab, p, blind_value, settings_of(vals, p))
            out[pn["acc"]] = gr.update(visible=not tab.started and not blind_value)
            name = pane_name(tab, p, blind_value)
            out[pn["stop"]] = gr.update(value=f"Stop arm {name}")
            out[pn["save"]] = gr.update(value=f"Save label for arm {name}")
        return out

    blind.change(blind_changed, inputs=common + [blind] + all_controls,
                 outputs=[pn[k] for pn in panes for k in ("header", "acc", "ann_title", "stop", "save")], queue=False, api_name=False,
                 show_progress="hidden")

    def wire_inspect(inspect_parts: dict, tabs: gr.Tabs, tab_id: str = "inspect"):
        """Each pane's Inspect button fills the Inspect tab with its selected turn and switches to it."""
        def go(p):
            def fn(tab: ArenaTab, turn_index):
                arm = tab.arm_of(p)
                try:
                    k = int(turn_index)
                    tid = tab.turns[k].turn_ids[arm]
                except (TypeError, ValueError, IndexError):
                    raise gr.Error("Pick a logged turn first.", print_exception=False) from None
                if tid is None:
                    raise gr.Error("This turn was not logged, so it cannot be inspected.", print_exception=False)
                return tab.session_id, arm, k, gr.Tabs(selected=tab_id)
            return fn

        for p, pn in enumerate(panes):
            pn["inspect"].visible = True
            event = pn["inspect"].click(go(p), inputs=[tab_state, pn["turn_sel"]],
                                        outputs=[inspect_parts["session"], inspect_parts["arm"], inspect_parts["turn"],
                                                 tabs], api_name=False)
            if "then_show" in inspect_parts:
                inspect_parts["then_show"](event)

    return dict(state=tab_state, n_arms=n_arms, blind=blind, annotator=annotator, title=title, system=system,
                msg=msg, send=send_btn, stop_all=stop_all_btn, regenerate=regen_btn, new_session=new_btn,
                reveal=reveal_btn, status=status, panes=panes, send_event=send_ev, regen_event=regen_ev,
                wire_inspect=wire_inspect)
