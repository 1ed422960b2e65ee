"""The Arena tab: 2-4 arms of one model side by side, streamed from one batched Dialogue.

Layout and wiring only: the session logic (start, stream, log, regenerate, reveal, resume, labels)
is `lab.arena_controller.ArenaSession`, one per browser tab in a gr.State. Gradio does not copy a
State value between events, so the stop buttons, which run outside the model queue, reach the very
Dialogue that is streaming.

Each pane's settings controls are generated from the registered mechanisms' settings models
(`lab.settings.PaneLayout`): one group of controls per mechanism, shown when it is selected.
"""
from __future__ import annotations

import html
import inspect

import gradio as gr

from db import STANCE_LABELS, StoreError
from engine import SpecError

from .arena_controller import (LETTERS, ArenaError, ArenaSession, TurnOutcome, check_message,
                               check_session_fields, labelled_line, parse_window, settings_refusal,
                               stop_reason_text)
from .context import ARENA_QUEUE, LabContext
from .fields import FieldDropdown, FieldNumber, FieldRadio, FieldSlider
from .settings import Control, PaneLayout, mechanism_choices, mechanism_help, summary, untrained_note

N_PANES = 4
LOCK_OPEN = ("Settings take effect when a session starts (your first message). "
             "After that they are fixed until you press **New session**.")
LOCK_CLOSED = ("**Settings are fixed for this session**; press **New session** to change them "
               "(the number of arms, blind mode, the attention window and the system prompt too).")
SHORTCUTS = ("<sub>Keys (outside text boxes): **1–6** pick a stance in the active label box (click a box to "
             "make it active), **s** saves it, **n** jumps to the next unlabelled reply.</sub>")
ArenaTab = ArenaSession  # the old name


# ------------------------------------------------------------------------------------------ controls
def make_control(c: Control, value=None):
    """The Gradio component for one settings field."""
    value = c.default if value is None else value
    if c.kind == "checkbox":
        return gr.Checkbox(value=bool(value), label=c.label, info=c.info or None, min_width=80)
    if c.kind == "dropdown":
        choices = ([""] if c.optional else []) + list(c.choices)
        return FieldDropdown(choices, value=value if value is not None else "", label=c.label, info=c.info or None,
                           min_width=80)
    if c.kind == "number" and c.optional:  # blank = unset (a number box could not be left empty over the API)
        return gr.Textbox(value="" if value is None else str(value), label=c.label, info=c.info or None,
                          placeholder="blank = unset", min_width=80)
    if c.kind == "number":
        # a plain number box, bounds in its help text: a slider (or the box's own min/max) would snap a typed
        # 7 back to 1 on blur while the settings model refused the 7, so the page would show what does not run
        return FieldNumber(value=value, label=c.label, info=c.info or None,
                           precision=0 if c.integer else None, step=1 if c.integer else 0.05, min_width=80)
    placeholder = "path on the server, or Upload" if c.kind == "file" else ("blank = default" if c.optional else None)
    return gr.Textbox(value="" if value is None else str(value), label=c.label, info=c.info or None,
                      placeholder=placeholder, min_width=100, elem_classes=["file-path"] if c.kind == "file" else None)


# ------------------------------------------------------------------------------------------ text
def reply_footer(r) -> str:
    n = len(r.token_ids)
    rate = f" · {n / r.duration_s:.1f} tok/s" if r.duration_s > 0 and n else ""
    reason = stop_reason_text(r.finish_reason)
    return f"<sub>{n} token{'' if n == 1 else 's'} · {r.duration_s:.1f} s{rate} · {reason}</sub>"


def chat_history(tab: ArenaSession, arm: int) -> list[dict]:
    msgs = []
    for t in tab.turns:
        r = t.replies[arm]
        msgs.append({"role": "user", "content": t.user})
        msgs.append({"role": "assistant", "content": (r.text or "*(empty reply)*") + "\n\n" + reply_footer(r)})
    return msgs


def note_line(spec) -> str:
    """A pane's warning line for an arm whose replies are not what they seem (random or untrained)."""
    note = untrained_note(spec)
    return f"\n\n<span class='pane-note'>⚠ {html.escape(note)}</span>" if note else ""


def pane_header(tab: ArenaSession, pane: int, blind: bool, spec_or_error=None) -> str:
    """'Arm 1 · continuity λ=1' (settings visible) or 'Arm A' (blind); an untrained arm's note below."""
    if tab.started:
        spec = tab.spec_of(pane)
        if spec is None:
            return f"### Arm {pane + 1}"
        if tab.hidden:
            return f"### Arm {LETTERS[pane]}"
        if tab.blind:
            return (f"### Arm {LETTERS[pane]} = {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>"
                    + note_line(spec))
        return f"### Arm {pane + 1} · {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>" + note_line(spec)
    if blind:
        return f"### Arm {LETTERS[pane]}"
    if spec_or_error is None:
        return f"### Arm {pane + 1}"
    if isinstance(spec_or_error, str):
        return f"### Arm {pane + 1} · ⚠ invalid settings\n<sub>{html.escape(spec_or_error)}</sub>"
    spec = spec_or_error
    return f"### Arm {pane + 1} · {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>" + note_line(spec)


def pane_name(tab: ArenaSession, pane: int, blind: bool) -> str:
    hidden = tab.blind if tab.started else blind
    return LETTERS[pane] if hidden else str(pane + 1)


def ann_title_text(tab: ArenaSession, pane: int, blind: bool, spec_or_error=None) -> str:
    """The title over a pane's labelling box: the header's first line, in bold."""
    first = pane_header(tab, pane, blind, spec_or_error).splitlines()[0].removeprefix("### ")
    return f"**{first}**"


def pane_info(tab: ArenaSession, pane: int) -> str:
    arm = tab.arm_of(pane)
    if arm is None or not tab.turns:
        return ""
    parts = [f"{len(tab.turns)} turn{'s' if len(tab.turns) != 1 else ''}"]
    mech = tab.dialogue.arms[arm].mechanism
    if mech is not None and not tab.hidden:
        parts.append(f"memory: {mech.memory_size()} entries")
    if tab.turns[-1].turn_ids[arm] is None:
        parts.append("⚠ last turn not logged")
    return "<sub>" + " · ".join(parts) + "</sub>"


def turn_choices(tab: ArenaSession) -> list[tuple[str, int]]:
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


def progress_text(tab: ArenaSession, annotator: str) -> str:
    if not tab.turns:
        return ""
    done, total = tab.label_progress(annotator)
    return labelled_line(done, total, annotator) + " in this session"


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


# a pane's outputs: (name in the API, key in the pane's components)
PANE_OUTPUTS = (("header", "header"), ("settings", "acc"), ("locked", "locked"), ("chat", "chat"), ("info", "info"),
                ("turn", "turn_sel"), ("saved", "saved"), ("stance", "stance"), ("note", "note"), ("error", "err"),
                ("label_title", "label_title"), ("stop", "stop"), ("save", "save"))
_ALL_OUTPUT_NAMES = (["lock_note", "n_arms", "blind", "system", "title", "window", "reveal", "send_btn", "status", "progress",
                      "msg"] + [f"arm{p + 1}_{k}" for p in range(N_PANES) for k, _ in PANE_OUTPUTS])
OUTPUT_NAMES = [n for n in _ALL_OUTPUT_NAMES
                if n not in ("reveal", "send_btn") and not n.endswith(("_settings", "_stop", "_save"))]
"""What an API client gets from /send, /regenerate, /new_session, /reveal and /continue_session, in order
(buttons and accordions among the outputs are not part of the API)."""


def build_arena_tab(ctx: LabContext) -> dict:
    """Build the Arena inside the current Tab; returns its components (and `wire_inspect`)."""
    n_layers = ctx.lm.model.config.num_hidden_layers
    layout = PaneLayout.current()
    tab_state = gr.State(lambda: ArenaSession(ctx.store, ctx.lm, ctx.scheduler))

    gr.Markdown("Chat with **2–4 arms of the same model side by side**: the *observer* is the plain model, the others "
                "carry a memory mechanism at some linkage λ. One message goes to every arm; all stream at once. "
                "Label each reply below its pane (did the arm keep or revise its stance?). "
                "Every finished turn is logged to the database.", elem_classes=["lab-intro"])
    with gr.Row(equal_height=True):
        n_arms = FieldRadio([2, 3, 4], value=2, label="Arms", scale=1, min_width=140)
        blind = gr.Checkbox(label="Blind mode", value=False, scale=1, min_width=160,
                            info="hide which arm is which and shuffle the panes")
        annotator = gr.Textbox(value="", label="Annotator", placeholder="your name (for labels)", scale=2, min_width=160,
                               elem_id="lab-annotator")
        title = gr.Textbox(value="", label="Session title", placeholder="optional", scale=2, min_width=160)
        window = gr.Textbox(value="", label="Attention window (tokens)", placeholder="blank = full attention",
                            info="every arm sees the first 4 + the last N tokens; memories keep the rest",
                            scale=1, min_width=160, elem_id="lab-window")
    with gr.Accordion("System prompt (optional, same for every arm)", open=False):
        system = gr.Textbox(value="", show_label=False, lines=2, placeholder="e.g. You are a helpful assistant.")
    lock_note = gr.Markdown(LOCK_OPEN, elem_classes=["lock-note"])

    panes = []
    with gr.Row(equal_height=False, elem_classes=["panes"]):
        for p in range(N_PANES):
            d = layout.defaults(p)
            with gr.Column(visible=p < 2, min_width=260, elem_classes=["pane"]) as col:
                header = gr.Markdown(pane_header(ArenaSession(ctx.store, ctx.lm), p, False, layout.spec(d)),
                                     elem_classes=["pane-header"], elem_id=f"arm{p + 1}-header")
                with gr.Accordion("Arm settings (click to change)", open=False,
                                  elem_classes=["pane-settings"]) as acc:
                    controls = [FieldDropdown(mechanism_choices(), value=d[0], label="Mechanism",
                                              info=mechanism_help(d[0]), elem_classes=["mechanism"])]
                    by_slot = {}
                    groups = {}
                    conditional = []  # (control, (other key, value)) of the shown mechanism's group

                    def add(name, c, d=d, by_slot=by_slot, conditional=conditional):  # bound now: called in this loop
                        value = d[layout.slots.index((name, c.key))]
                        when = c.only_when
                        comp = make_control(c, value)
                        if when:
                            other = d[layout.slots.index((name, when[0]))] if (name, when[0]) in layout.slots else None
                            comp.visible = str(other) == str(when[1])
                            conditional.append((name, comp, when))
                        by_slot[(name, c.key)] = comp
                        if c.kind == "file":
                            up = gr.UploadButton(f"Upload {c.label.lower()}…", size="sm",
                                                 file_count="single", type="filepath",
                                                 file_types=[c.suffix] if c.suffix else None)
                            up.upload(lambda f: f or gr.skip(), inputs=[up], outputs=[comp], api_name=False,
                                      queue=False, show_progress="hidden")

                    for name, cs in layout.mechanisms.items():
                        with gr.Group(visible=d[0] == name, elem_classes=[f"mech-{name}"]) as g:
                            gr.Markdown(f"<sub>**{html.escape(name)}** settings</sub>")
                            for c in cs:
                                if not c.advanced:
                                    add(name, c)
                            advanced = [c for c in cs if c.advanced]
                            if advanced:
                                with gr.Accordion(f"Advanced ({len(advanced)}: training-only or rarely changed)",
                                                  open=False, elem_classes=["advanced"]):
                                    for c in advanced:
                                        add(name, c)
                        groups[name] = g
                    samp = {c.key: c for c in layout.sampling}
                    with gr.Row():
                        for key in [k for k in samp if k not in ("temperature", "top_p")]:
                            by_slot[("sampling", key)] = make_control(samp[key], d[layout.slots.index(("sampling", key))])
                    greedy_on = bool(d[layout.slots.index(("sampling", "greedy"))]) if "greedy" in samp else False
                    with gr.Row(visible=not greedy_on) as samp_row:
                        for key in [k for k in samp if k in ("temperature", "top_p")]:
                            by_slot[("sampling", key)] = make_control(samp[key], d[layout.slots.index(("sampling", key))])
                    controls += [by_slot[s] for s in layout.slots[1:]]
                err = gr.Markdown("", elem_classes=["pane-error"])
                locked = gr.Markdown("", visible=False, elem_classes=["pane-locked"])
                chat = gr.Chatbot(value=[], show_label=False, height=360, elem_classes=["pane-chat"],
                                  placeholder="Replies appear here.", buttons=["copy"], elem_id=f"arm{p + 1}-chat")
                with gr.Row(equal_height=True):
                    info = gr.Markdown("", elem_classes=["pane-info"])
                    stop = gr.Button(f"Stop arm {p + 1}", size="sm", variant="stop", scale=0, min_width=110,
                                     elem_classes=["pane-stop"])
            assert len(controls) == len(layout)
            panes.append(dict(col=col, header=header, acc=acc, groups=groups, samp_row=samp_row, err=err,
                              locked=locked, chat=chat, info=info, stop=stop, controls=controls, by_slot=by_slot,
                              conditional=conditional))

    # the composer sticks to the bottom of the window: its status line is where one types and sends
    with gr.Column(elem_classes=["composer"], elem_id="lab-composer"):
        with gr.Row(equal_height=True, elem_classes=["status-row"]):
            status = gr.Markdown("", elem_id="lab-status")
            resume_btn = gr.Button("Continue my last session", size="sm", visible=False, elem_id="lab-resume",
                                   scale=0, min_width=200)
            progress = gr.Markdown("", elem_id="lab-progress")
        with gr.Row(equal_height=True):
            msg = gr.Textbox(show_label=False,
                             placeholder="Message to every arm — Enter sends, Shift+Enter for a new line",
                             lines=1, max_lines=8, scale=8, elem_id="lab-message")
            send_btn = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="lab-send")
        with gr.Row():
            stop_all_btn = gr.Button("Stop all", variant="stop", size="sm")
            regen_btn = gr.Button("Regenerate last turn", size="sm")
            new_btn = gr.Button("New session", size="sm")
            reveal_btn = gr.Button("Reveal arms", size="sm", visible=False, elem_id="lab-reveal")
    # the last session this browser logged to, kept across reloads (the live one dies with the page)
    last_sid = gr.BrowserState("", storage_key="lab-last-session")
    saved_name = gr.BrowserState("", storage_key="lab-annotator")  # the annotator's name, per browser

    gr.Markdown("#### Label the replies\n<sub>Pick a turn, a stance label, optionally a note and your confidence, "
                "then **Save label**. You can label while the next turn is streaming. Enter your name under "
                "**Annotator** at the top.</sub>", elem_classes=["ann-intro"])
    with gr.Row(equal_height=True):
        next_btn = gr.Button("Next unlabelled reply", size="sm", scale=0, min_width=180, elem_id="lab-next")
        gr.Markdown(SHORTCUTS, elem_classes=["shortcuts"])
        active_box = gr.Textbox("1", visible=True, show_label=False, container=False, elem_id="label-active",
                                elem_classes=["hidden-box"], interactive=False)
    with gr.Row(equal_height=False, elem_classes=["annotate-row"]):
        for p in range(N_PANES):
            with gr.Column(visible=p < 2, min_width=260, elem_classes=["pane-annotate"],
                           elem_id=f"arm{p + 1}-label") as ann_col:
                ann_title = gr.Markdown(ann_title_text(ArenaSession(ctx.store, ctx.lm), p, False,
                                                       layout.spec(layout.defaults(p))), elem_classes=["ann-title"])
                turn_sel = FieldDropdown(choices=[], value=None, label="Turn", interactive=True,
                                       info="the latest is selected after each reply")
                stance = FieldRadio(STANCE_LABELS, value=None, label="Stance", elem_classes=["stance"])
                with gr.Row(equal_height=True):
                    note = gr.Textbox(value="", label="Note", placeholder="optional", lines=1, scale=3, min_width=120)
                    confidence = FieldSlider(0, 1, value=0.8, step=0.05, label="Confidence", scale=2, min_width=120)
                with gr.Row():
                    save = gr.Button(f"Save label for arm {p + 1}", size="sm", variant="primary",
                                     elem_classes=["save-label"])
                    inspect_btn = gr.Button("Inspect", size="sm", visible=False)
                saved = gr.Markdown("", elem_classes=["saved"], elem_id=f"arm{p + 1}-saved")
            panes[p].update(ann_col=ann_col, label_title=ann_title, turn_sel=turn_sel, stance=stance, note=note,
                            confidence=confidence, save=save, inspect=inspect_btn, saved=saved)

    all_controls = [c for pn in panes for c in pn["controls"]]

    # ---------------------------------------------------------------- rendering
    def pane_spec(vals, p):
        """The pane's settings as an ArmSpec, or the one-line reason they are refused."""
        try:
            return layout.spec(layout.pane_values(vals, p), n_layers)
        except (SpecError, ValueError) as e:
            return (str(e).splitlines() or [type(e).__name__])[0]

    def full_render(tab: ArenaSession, blind_value: bool, vals, status_text=None, clear_msg=False,
                    annotator_name=None) -> dict:
        out = {lock_note: LOCK_CLOSED if tab.started else LOCK_OPEN,
               n_arms: gr.update(interactive=not tab.started, **({"value": tab.n} if tab.started else {})),
               blind: gr.update(interactive=not tab.started, **({"value": tab.blind} if tab.started else {})),
               system: gr.update(interactive=not tab.started),
               title: gr.update(interactive=not tab.started),
               window: gr.update(interactive=not tab.started,
                                 **({"value": "" if tab.window is None else str(tab.window)} if tab.started else {})),
               reveal_btn: gr.update(visible=tab.started and tab.hidden),
               send_btn: gr.update(interactive=True)}
        if status_text is not None:
            out[status] = status_text
        if annotator_name is not None:
            out[progress] = progress_text(tab, annotator_name)
        if clear_msg:
            out[msg] = ""
        choices = turn_choices(tab)
        bv = tab.blind if tab.started else blind_value
        for p, pn in enumerate(panes):
            arm = tab.arm_of(p)
            spec = pane_spec(vals, p) if vals and not tab.started else None
            out[pn["col"]] = gr.update(visible=p < tab.n) if tab.started else gr.skip()
            out[pn["ann_col"]] = gr.update(visible=p < tab.n) if tab.started else gr.skip()
            out[pn["header"]] = pane_header(tab, p, bv, spec)
            out[pn["acc"]] = gr.update(visible=not tab.started and not bv)
            name = pane_name(tab, p, bv)
            out[pn["stop"]] = gr.update(value=f"Stop arm {name}")
            out[pn["save"]] = gr.update(value=f"Save label for arm {name}")
            out[pn["label_title"]] = ann_title_text(tab, p, bv, spec)
            if tab.started and arm is not None and not tab.hidden:
                out[pn["locked"]] = gr.update(visible=True, value=f"<sub>fixed: `{tab.spec_of(p).to_string()}`</sub>")
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

    named_outputs = ([("lock_note", lock_note), ("n_arms", n_arms), ("blind", blind), ("system", system),
                      ("title", title), ("window", window), ("reveal", reveal_btn), ("send_btn", send_btn), ("status", status),
                      ("progress", progress), ("msg", msg)]
                     + [(f"arm{p + 1}_{name}", pn[k]) for p, pn in enumerate(panes) for name, k in PANE_OUTPUTS])
    assert [n for n, _ in named_outputs] == _ALL_OUTPUT_NAMES
    # columns are outputs too (a resumed session may have 3 or 4 arms) but not part of the API
    full_outputs = [c for _, c in named_outputs] + [pn[k] for pn in panes for k in ("col", "ann_col")]
    api_visible = [n for n, c in named_outputs if not c.skip_api]
    assert api_visible == OUTPUT_NAMES, api_visible

    # ---------------------------------------------------------------- the turn
    def stream(tab: ArenaSession, message: str, blind_value, vals, annotator_name, events, give_back=None):
        """Render a turn's StreamEvents into the panes; the final TurnOutcome into the whole tab.

        `give_back`: the text to put back in the message box if the turn is refused."""
        base = None
        user_msg = {"role": "user", "content": message}
        for item in events:
            if isinstance(item, TurnOutcome):
                if item.kind == "done":
                    yield full_render(tab, blind_value, vals, status_text=item.status, annotator_name=annotator_name)
                    return
                if item.kind == "refused":
                    gr.Warning(item.status.lstrip("⚠ "))
                upd = full_render(tab, blind_value, vals, status_text=item.status, annotator_name=annotator_name)
                for pn in panes:  # keep what the annotator is doing
                    for k in ("turn_sel", "saved", "stance", "note"):
                        upd.pop(pn[k], None)
                if item.kind == "failed":
                    for p in range(tab.n):
                        upd[panes[p]["info"]] = f"✗ generation failed: {html.escape(item.error or '')}"
                if item.kind == "refused" and give_back is not None:
                    upd[msg] = give_back
                yield upd
                return
            ev = item
            if ev.status:  # held back by the row cap: say where it stands, keep the panes as they are
                yield {status: f"⏳ {ev.status.capitalize()} — the lab is serving other sessions; this turn starts "
                               "as soon as rows free up (Stop cancels it)."}
                continue
            upd = {status: f"Generating… step {ev.step} (Stop buttons work while it runs)"}
            if base is None:  # after a regenerate's rollback
                base = [chat_history(tab, tab.arm_of(p)) if p < tab.n else [] for p in range(N_PANES)]
                upd[send_btn] = gr.update(interactive=False)
            for p in range(tab.n):
                a = tab.arm_of(p)
                text = ev.texts[a] + ("" if ev.done[a] else " ▌")
                upd[panes[p]["chat"]] = base[p] + [user_msg, {"role": "assistant", "content": text}]
            yield upd

    def start_session(tab: ArenaSession, n, blind_value, system_text, title_text, annotator_name, window_text,
                      vals) -> dict:
        """Build the arms from the settings; return {pane: error} (or {"session": error}) if refused."""
        why = check_session_fields(system_text, title_text, annotator_name)
        if why:
            return {"session": why}
        try:
            window_n = parse_window(window_text)
        except ArenaError as e:
            return {"session": str(e)}
        try:
            n = int(n or 2)
        except (TypeError, ValueError):
            return {0: f"the number of arms must be 2 to {N_PANES}, not {n!r}"}
        if not 2 <= n <= N_PANES:
            return {0: f"the number of arms must be 2 to {N_PANES}, not {n}"}
        specs, errors = [], {}
        for p in range(n):
            s = pane_spec(vals, p)
            if isinstance(s, str):
                errors[p] = s
            else:
                specs.append(s)
        if errors:
            return errors
        try:
            tab.start(specs, blind=bool(blind_value), system=system_text, title=title_text, annotator=annotator_name,
                      window=window_n)
        except ArenaError as e:
            return {0: str(e)}
        return {}

    def send(tab: ArenaSession, message, n, blind_value, system_text, title_text, annotator_name, window_text, *vals):
        why = check_message(message)
        if why:
            gr.Warning(why)
            yield {status: f"⚠ {why}", send_btn: gr.update(interactive=True)}
            return
        if tab.busy:
            yield {status: "⚠ A turn is still running; your message stays in the box — send it when it ends."}
            return
        if not tab.started:
            errors = start_session(tab, n, blind_value, system_text, title_text, annotator_name, window_text, vals)
            if errors:
                upd = {status: "⚠ " + html.escape(settings_refusal(errors, lambda p: pane_name(tab, p, blind_value))),
                       msg: message}
                errors.pop("session", None)
                for p, pn in enumerate(panes):
                    upd[pn["err"]] = f"⚠ {html.escape(errors[p])}" if p in errors else ""
                yield upd
                return
        # the sent text leaves the box at once; anything typed while the arms stream stays there
        yield {msg: "", send_btn: gr.update(interactive=False), status: "Generating… (Stop buttons work while it runs)"}
        yield from stream(tab, message, blind_value, vals, annotator_name, tab.run_turn(message), give_back=message)

    def regenerate(tab: ArenaSession, blind_value, annotator_name, *vals):
        message = tab.failed_message or (tab.turns[-1].user if tab.turns else "")
        yield from stream(tab, message, blind_value, vals, annotator_name, tab.regenerate())

    def stop_pane(p):
        def fn(tab: ArenaSession):
            if tab.stop_pane(p):
                return f"■ Stopping arm {tab.pane_name(p)}…"
            return gr.skip()
        return fn

    def stop_all(tab: ArenaSession):
        if tab.stop_all():
            return "■ Stopping every arm…"
        return gr.skip()

    def new_session(tab: ArenaSession, blind_value, annotator_name, *vals):
        tab.reset()
        out = full_render(tab, blind_value, vals, status_text="New session: adjust the settings if you like, then "
                                                              "send a message.", clear_msg=False,
                          annotator_name=annotator_name)
        return out  # the panes' visibility follows the Arms choice (the event chained after this one)

    def reveal(tab: ArenaSession, blind_value, annotator_name, *vals):
        try:
            mapping = tab.reveal()
        except ArenaError as e:
            return {status: str(e)}
        out = full_render(tab, blind_value, vals, status_text=f"Revealed: {mapping}.", annotator_name=annotator_name)
        for pn in panes:  # keep what the annotator is doing in the annotation boxes
            for k in ("turn_sel", "saved", "stance", "note"):
                out.pop(pn[k], None)
        return out

    def continue_session(tab: ArenaSession, session_id, annotator_name):
        """Reopen a logged session here and continue it (its arms rebuilt from the logged tokens)."""
        if tab.busy:
            raise gr.Error("A turn is running in the Arena; wait for it or press Stop first.", print_exception=False)
        try:
            resumed = ArenaSession.resume(ctx.store, ctx.lm, session_id, ctx.scheduler)
        except ArenaError as e:
            raise gr.Error(str(e), print_exception=False) from None
        tab.reset()
        tab.__dict__.update(resumed.__dict__)
        out = full_render(tab, tab.blind, None, annotator_name=annotator_name,
                          status_text=f"Reopened session `{tab.session_id}` with {len(tab.turns)} turn"
                                      f"{'s' if len(tab.turns) != 1 else ''}: the next message continues it.")
        return out

    def annotate_pane(p):
        def fn(tab: ArenaSession, name, turn_index, label, note_text, conf):
            try:
                k, tid = tab.annotate(p, turn_index, name, label, note_text, conf)
            except ArenaError as e:
                if "Annotator" in str(e):
                    gr.Warning("Enter your name in Annotator (top of the page) first.")
                return f"⚠ {e}", gr.skip()
            return f"Saved for turn {k + 1}.\n\n" + annotations_text(ctx, tid), progress_text(tab, name)
        return fn

    def show_annotations(p):
        def fn(tab: ArenaSession, turn_index):
            arm = tab.arm_of(p)
            try:
                tid = tab.turns[int(turn_index)].turn_ids[arm]
            except (ValueError, TypeError, IndexError):
                return ""
            return annotations_text(ctx, tid)
        return fn

    def next_unlabelled(tab: ArenaSession, name, active, *turn_sels):
        name = (name or "").strip()
        if not name:
            gr.Warning("Enter your name in Annotator (top of the page) first.")
            return {progress: "⚠ Enter your name under **Annotator** first."}
        try:
            a = int(active) - 1
            after = (int(turn_sels[a]), a) if turn_sels[a] is not None else None
        except (TypeError, ValueError, IndexError):
            after = None
        cell = tab.next_unlabelled(name, after)
        out = {progress: progress_text(tab, name)}
        if cell is None:
            out[progress] += " — nothing left to label." if tab.turns else "Nothing to label yet."
            return out
        k, p = cell
        out[panes[p]["turn_sel"]] = gr.update(value=k)
        out[panes[p]["stance"]] = None
        out[panes[p]["saved"]] = annotations_text(ctx, tab.turns[k].turn_ids[tab.arm_of(p)])
        out[active_box] = str(p + 1)
        return out

    # ---------------------------------------------------------------- events
    pane_columns = [pn["col"] for pn in panes] + [pn["ann_col"] for pn in panes]

    def panes_for(n):
        """Pane and label columns for the Arms choice: exactly the first n are shown."""
        try:
            n = min(max(int(n or 2), 2), N_PANES)
        except (TypeError, ValueError):
            n = 2
        return [gr.update(visible=p < n) for p in range(N_PANES)] * 2

    ctrl_names = [n for p in range(N_PANES) for n in layout.api_names(p)]
    send = named(send, ["message", "n_arms", "blind", "system_prompt", "title", "annotator", "window"] + ctrl_names)
    regenerate = named(regenerate, ["blind", "annotator"] + ctrl_names)
    new_session = named(new_session, ["blind", "annotator"] + ctrl_names)
    reveal = named(reveal, ["blind", "annotator"] + ctrl_names)
    common = [tab_state]
    top = [n_arms, blind, system, title, annotator, window]
    # every tab's turns run at once: the step scheduler batches them (and queues past its row cap)
    model_bound = dict(concurrency_id=ARENA_QUEUE, concurrency_limit=None)
    send_ev = gr.on([msg.submit, send_btn.click], send, inputs=common + [msg] + top + all_controls,
                    outputs=full_outputs, api_name="send", show_progress="hidden", **model_bound)
    regen_ev = regen_btn.click(regenerate, inputs=common + [blind, annotator] + all_controls, outputs=full_outputs,
                               api_name="regenerate", show_progress="hidden", **model_bound)
    stop_all_btn.click(stop_all, inputs=common, outputs=[status], api_name="stop_all", queue=False)
    for p, pn in enumerate(panes):
        pn["stop"].click(stop_pane(p), inputs=common, outputs=[status], api_name=f"stop_arm_{p + 1}", queue=False)
    # New session: stop what is running now (outside the queue), then reset once the turn has finished.
    new_btn.click(stop_all, inputs=common, outputs=[status], queue=False, api_name=False).then(
        new_session, inputs=common + [blind, annotator] + all_controls, outputs=full_outputs, api_name="new_session",
        **model_bound).then(panes_for, inputs=[n_arms], outputs=pane_columns, queue=False, api_name=False,
                            show_progress="hidden")
    reveal_btn.click(reveal, inputs=common + [blind, annotator] + all_controls, outputs=full_outputs, api_name="reveal")

    for p, pn in enumerate(panes):
        pn["save"].click(annotate_pane(p),
                         inputs=common + [annotator, pn["turn_sel"], pn["stance"], pn["note"], pn["confidence"]],
                         outputs=[pn["saved"], progress], api_name=f"annotate_arm_{p + 1}")
        pn["turn_sel"].input(show_annotations(p), inputs=common + [pn["turn_sel"]], outputs=[pn["saved"]],
                             api_name=False, show_progress="hidden")
    next_btn.click(next_unlabelled, inputs=common + [annotator, active_box] + [pn["turn_sel"] for pn in panes],
                   outputs=[progress, active_box] + [pn[k] for pn in panes for k in ("turn_sel", "stance", "saved")],
                   api_name="next_unlabelled").then(
        None, inputs=[active_box], outputs=None, js="(v) => { window.labSetActive && window.labSetActive(v); }")
    annotator.blur(lambda tab, name: (progress_text(tab, name), (name or "").strip()), inputs=common + [annotator],
                   outputs=[progress, saved_name], api_name=False, queue=False, show_progress="hidden")

    # settings (before a session): live header, mechanism groups, sampling row, pane count, blind
    def header_fn(p):
        def fn(tab: ArenaSession, blind_value, *v):
            if tab.started:
                return gr.skip(), gr.skip(), gr.skip()
            spec = pane_spec(list(v), 0)  # v is this pane's values alone
            err_text = f"⚠ {html.escape(spec)} — Send is refused until this is fixed." if isinstance(spec, str) else ""
            return pane_header(tab, p, blind_value, spec), ann_title_text(tab, p, blind_value, spec), err_text
        return fn

    mech_names = list(layout.mechanisms)
    for p, pn in enumerate(panes):
        c = pn["controls"]
        c[0].change(lambda m: [gr.update(visible=m == name) for name in mech_names] + [gr.update(info=mechanism_help(m))],
                    inputs=[c[0]], outputs=[pn["groups"][name] for name in mech_names] + [c[0]], queue=False,
                    api_name=False, show_progress="hidden")
        for name, comp, (other, value) in pn["conditional"]:
            pn["by_slot"][(name, other)].change(lambda v, want=value: gr.update(visible=str(v) == str(want)),
                                                inputs=[pn["by_slot"][(name, other)]], outputs=[comp], queue=False,
                                                api_name=False, show_progress="hidden")
        if ("sampling", "greedy") in pn["by_slot"]:
            pn["by_slot"][("sampling", "greedy")].change(lambda g: gr.update(visible=not g),
                                                        inputs=[pn["by_slot"][("sampling", "greedy")]],
                                                        outputs=[pn["samp_row"]], queue=False, api_name=False,
                                                        show_progress="hidden")
        triggers = [x.release if isinstance(x, gr.Slider) else x.change for x in c]
        gr.on(triggers, header_fn(p), inputs=common + [blind] + c, outputs=[pn["header"], pn["label_title"], pn["err"]],
              queue=False, api_name=False, show_progress="hidden")

    n_arms.change(panes_for, inputs=[n_arms], outputs=pane_columns, queue=False, api_name=False,
                  show_progress="hidden")

    def blind_changed(tab: ArenaSession, blind_value, *vals):
        out = {}
        for p, pn in enumerate(panes):
            spec = pane_spec(vals, p)
            out[pn["header"]] = pane_header(tab, p, blind_value, spec)
            out[pn["label_title"]] = ann_title_text(tab, p, blind_value, spec)
            out[pn["acc"]] = gr.update(visible=not tab.started and not blind_value)
            name = pane_name(tab, p, blind_value)
            out[pn["stop"]] = gr.update(value=f"Stop arm {name}")
            out[pn["save"]] = gr.update(value=f"Save label for arm {name}")
        return out

    blind.change(blind_changed, inputs=common + [blind] + all_controls,
                 outputs=[pn[k] for pn in panes for k in ("header", "acc", "label_title", "stop", "save")],
                 queue=False, api_name=False, show_progress="hidden")

    def wire_inspect(inspect_parts: dict, tabs: gr.Tabs, tab_id: str = "inspect"):
        """Each pane's Inspect button fills the Inspect tab with its selected turn and switches to it."""
        def go(p):
            def fn(tab: ArenaSession, turn_index):
                arm = tab.arm_of(p)
                if tab.hidden:  # the arm index would tell which pane is which
                    raise gr.Error("Blind session: press Reveal arms before inspecting a reply.",
                                   print_exception=False)
                try:
                    k = int(turn_index)
                    tid = tab.turns[k].turn_ids[arm]
                except (TypeError, ValueError, IndexError):
                    raise gr.Error("Pick a logged turn first.", print_exception=False) from None
                if tid is None:
                    raise gr.Error("This turn was not logged, so it cannot be inspected.", print_exception=False)
                return tab.session_id, arm, k + 1, gr.Tabs(selected=tab_id)  # Inspect counts turns from 1
            return fn

        for p, pn in enumerate(panes):
            pn["inspect"].visible = True
            event = pn["inspect"].click(go(p), inputs=[tab_state, pn["turn_sel"]],
                                        outputs=[inspect_parts["session"], inspect_parts["arm"], inspect_parts["turn"],
                                                 tabs], api_name=False)
            if "then_show" in inspect_parts:
                inspect_parts["then_show"](event)

    # remember the session after every turn; after a reload offer to continue it
    for ev in (send_ev, regen_ev):
        ev.then(lambda tab: tab.session_id or gr.skip(), inputs=[tab_state], outputs=[last_sid], api_name=False,
                queue=False, show_progress="hidden")

    def offer_resume(tab: ArenaSession, sid):
        if tab.started or not (sid or "").strip():
            return gr.update(visible=False), gr.skip()
        return (gr.update(visible=True),
                f"This browser's last session was `{html.escape(sid)}`: press **Continue my last session** to go on "
                "with it (its arms are rebuilt from the logged tokens), or start a new one.")

    resume_ev = resume_btn.click(named(continue_session, ["session_id", "annotator"]),
                                 inputs=[tab_state, last_sid, annotator], outputs=full_outputs, api_name=False,
                                 **model_bound)
    resume_ev.success(lambda: gr.update(visible=False), outputs=[resume_btn], api_name=False, queue=False)

    def on_load(demo: gr.Blocks):
        demo.load(offer_resume, inputs=[tab_state, last_sid], outputs=[resume_btn, status], api_name=False,
                  queue=False)
        demo.load(lambda name: (name or "") if (name or "").strip() else gr.skip(), inputs=[saved_name],
                  outputs=[annotator], api_name=False, queue=False, show_progress="hidden")

    def wire_continue(button: gr.Button, session_box: gr.Textbox, tabs: gr.Tabs, tab_id: str = "arena"):
        """A button elsewhere (Sessions) that reopens the session in `session_box` here and switches to the Arena."""
        ev = button.click(named(continue_session, ["session_id", "annotator"]),
                          inputs=[tab_state, session_box, annotator], outputs=full_outputs,
                          api_name="continue_session", **model_bound)
        ev.success(lambda: gr.Tabs(selected=tab_id), outputs=[tabs], api_name=False, queue=False)

    return dict(state=tab_state, n_arms=n_arms, blind=blind, annotator=annotator, title=title, system=system, window=window,
                msg=msg, send=send_btn, stop_all=stop_all_btn, regenerate=regen_btn, new_session=new_btn,
                reveal=reveal_btn, status=status, progress=progress, next=next_btn, panes=panes, layout=layout,
                send_event=send_ev, regen_event=regen_ev, wire_inspect=wire_inspect, wire_continue=wire_continue,
                on_load=on_load, resume=resume_btn)
