"""The Arena tab: 2-4 arms of one model side by side, streamed from one batched Dialogue.

Layout and wiring only: the session logic (start and its validation, stream, log, regenerate,
reveal, resume, labels) is `lab.arena_controller.ArenaSession`, one per browser tab in a gr.State;
`build_arena_tab` lays the components out into typed parts (`PaneParts`, `TopRow`, `Composer`,
`LabelBar`) and `ArenaView` wires their events to the session. Gradio does not copy a
State value between events, so the stop buttons, which run outside the model queue, reach the very
Dialogue that is streaming.

Each pane's settings controls are generated from the registered mechanisms' settings models
(`lab.settings.PaneLayout`): one group of controls per mechanism, shown when it is selected.
"""

from __future__ import annotations

import html
import inspect
from dataclasses import dataclass
from typing import Any

import gradio as gr

from db import STANCE_LABELS, StoreError
from db.blind import pane_letter
from engine import SpecError

from .arena_controller import (
    MAX_ARMS,
    ArenaError,
    ArenaSession,
    SessionSettings,
    SettingsRefused,
    TurnOutcome,
    labelled_line,
    settings_refusal,
    stop_reason_text,
)
from .context import ARENA_QUEUE, LabContext
from .fields import FieldDropdown, FieldNumber, FieldRadio, FieldSlider
from .settings import Control, PaneLayout, mechanism_choices, mechanism_help, summary, untrained_note

LOCK_OPEN = (
    "Settings take effect when a session starts (your first message). "
    "After that they are fixed until you press **New session**."
)
LOCK_CLOSED = (
    "**Settings are fixed for this session**; press **New session** to change them "
    "(the number of arms, blind mode, the attention window and the system prompt too)."
)
SHORTCUTS = (
    "<sub>Keys (outside text boxes): **1–6** pick a stance in the active label box (click a box to "
    "make it active), **s** saves it, **n** jumps to the next unlabelled reply.</sub>"
)
# every tab's turns run at once: the step scheduler batches them (and queues past its row cap)
MODEL_BOUND: dict = dict(concurrency_id=ARENA_QUEUE, concurrency_limit=None)


# ------------------------------------------------------------------------------------------ controls
def make_control(c: Control, value=None):
    """The Gradio component for one settings field."""
    value = c.default if value is None else value
    if c.kind == "checkbox":
        return gr.Checkbox(value=bool(value), label=c.label, info=c.info or None, min_width=80)
    if c.kind == "dropdown":
        choices = ([""] if c.optional else []) + list(c.choices)
        return FieldDropdown(
            choices, value=value if value is not None else "", label=c.label, info=c.info or None, min_width=80
        )
    if c.kind == "number" and c.optional:  # blank = unset (a number box could not be left empty over the API)
        return gr.Textbox(
            value="" if value is None else str(value),
            label=c.label,
            info=c.info or None,
            placeholder="blank = unset",
            min_width=80,
        )
    if c.kind == "number":
        # a plain number box, bounds in its help text: a slider (or the box's own min/max) would snap a typed
        # 7 back to 1 on blur while the settings model refused the 7, so the page would show what does not run
        return FieldNumber(
            value=value,
            label=c.label,
            info=c.info or None,
            precision=0 if c.integer else None,
            step=1 if c.integer else 0.05,
            min_width=80,
        )
    placeholder = "path on the server, or Upload" if c.kind == "file" else ("blank = default" if c.optional else None)
    return gr.Textbox(
        value="" if value is None else str(value),
        label=c.label,
        info=c.info or None,
        placeholder=placeholder,
        min_width=100,
        elem_classes=["file-path"] if c.kind == "file" else None,
    )


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
            return f"### Arm {pane_letter(pane)}"
        if tab.blind:
            return (
                f"### Arm {pane_letter(pane)} = {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>"
                + note_line(spec)
            )
        return f"### Arm {pane + 1} · {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>" + note_line(spec)
    if blind:
        return f"### Arm {pane_letter(pane)}"
    if spec_or_error is None:
        return f"### Arm {pane + 1}"
    if isinstance(spec_or_error, str):
        return f"### Arm {pane + 1} · ⚠ invalid settings\n<sub>{html.escape(spec_or_error)}</sub>"
    spec = spec_or_error
    return f"### Arm {pane + 1} · {spec.display_label}\n<sub>{html.escape(summary(spec))}</sub>" + note_line(spec)


def pane_name(tab: ArenaSession, pane: int, blind: bool) -> str:
    hidden = tab.blind if tab.started else blind
    return pane_letter(pane) if hidden else str(pane + 1)


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
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__name__ = fn.__name__
    return wrapper


# a pane's outputs: (name in the API, attribute of its PaneParts)
PANE_OUTPUTS = (
    ("header", "header"),
    ("settings", "acc"),
    ("locked", "locked"),
    ("chat", "chat"),
    ("info", "info"),
    ("turn", "turn_sel"),
    ("saved", "saved"),
    ("stance", "stance"),
    ("note", "note"),
    ("error", "err"),
    ("label_title", "label_title"),
    ("stop", "stop"),
    ("save", "save"),
)
_ALL_OUTPUT_NAMES = [
    "lock_note",
    "n_arms",
    "blind",
    "system",
    "title",
    "window",
    "reveal",
    "send_btn",
    "status",
    "progress",
    "msg",
] + [f"arm{p + 1}_{k}" for p in range(MAX_ARMS) for k, _ in PANE_OUTPUTS]
OUTPUT_NAMES = [
    n for n in _ALL_OUTPUT_NAMES if n not in ("reveal", "send_btn") and not n.endswith(("_settings", "_stop", "_save"))
]
"""What an API client gets from /send, /regenerate, /new_session, /reveal and /continue_session, in order
(buttons and accordions among the outputs are not part of the API)."""
ANNOTATING = ("turn_sel", "saved", "stance", "note")  # what the annotator is doing: kept by partial renders


@dataclass
class PaneParts:
    """One pane's components: the arm's column (settings, chat, stop) and, below, its labelling box."""

    col: Any
    header: Any
    acc: Any
    groups: dict  # mechanism name -> its settings group
    samp_row: Any
    err: Any
    locked: Any
    chat: Any
    info: Any
    stop: Any
    controls: list  # in PaneLayout slot order
    by_slot: dict  # (mechanism or "sampling", key) -> control
    conditional: list  # (mechanism, control, (other key, value)): shown only when the other key has that value
    ann_col: Any = None
    label_title: Any = None
    turn_sel: Any = None
    stance: Any = None
    note: Any = None
    confidence: Any = None
    save: Any = None
    inspect: Any = None
    saved: Any = None


@dataclass
class TopRow:
    """The session's settings above the panes (fixed once it starts)."""

    n_arms: Any
    blind: Any
    annotator: Any
    title: Any
    window: Any
    system: Any
    lock_note: Any


@dataclass
class Composer:
    """The bar at the bottom: status, message box and the session's buttons."""

    status: Any
    resume: Any
    progress: Any
    msg: Any
    send: Any
    stop_all: Any
    regenerate: Any
    new_session: Any
    reveal: Any
    last_sid: Any  # the last session this browser logged to (BrowserState)
    saved_name: Any  # the annotator's name, per browser (BrowserState)


@dataclass
class LabelBar:
    """Above the labelling boxes: Next unlabelled, and which box the keyboard shortcuts act on."""

    next: Any
    active_box: Any


# ------------------------------------------------------------------------------------------ layout
def _build_top() -> TopRow:
    gr.Markdown(
        "Chat with **2–4 arms of the same model side by side**: the *observer* is the plain model, the others "
        "carry a memory mechanism at some linkage λ. One message goes to every arm; all stream at once. "
        "Label each reply below its pane (did the arm keep or revise its stance?). "
        "Every finished turn is logged to the database.",
        elem_classes=["lab-intro"],
    )
    with gr.Row(equal_height=True):
        n_arms = FieldRadio(list(range(2, MAX_ARMS + 1)), value=2, label="Arms", scale=1, min_width=140)
        blind = gr.Checkbox(
            label="Blind mode",
            value=False,
            scale=1,
            min_width=160,
            info="hide which arm is which and shuffle the panes",
        )
        annotator = gr.Textbox(
            value="",
            label="Annotator",
            placeholder="your name (for labels)",
            scale=2,
            min_width=160,
            elem_id="lab-annotator",
        )
        title = gr.Textbox(value="", label="Session title", placeholder="optional", scale=2, min_width=160)
        window = gr.Textbox(
            value="",
            label="Attention window (tokens)",
            placeholder="blank = full attention",
            info="every arm sees the first 4 + the last N tokens; memories keep the rest",
            scale=1,
            min_width=160,
            elem_id="lab-window",
        )
    with gr.Accordion("System prompt (optional, same for every arm)", open=False):
        system = gr.Textbox(value="", show_label=False, lines=2, placeholder="e.g. You are a helpful assistant.")
    lock_note = gr.Markdown(LOCK_OPEN, elem_classes=["lock-note"])
    return TopRow(n_arms, blind, annotator, title, window, system, lock_note)


def _add_control(layout: PaneLayout, d: list, name: str, c: Control, by_slot: dict, conditional: list) -> None:
    """One settings control of mechanism `name` (and its Upload button for a file)."""
    comp = make_control(c, d[layout.slots.index((name, c.key))])
    when = c.only_when
    if when:
        other = d[layout.slots.index((name, when[0]))] if (name, when[0]) in layout.slots else None
        comp.visible = str(other) == str(when[1])
        conditional.append((name, comp, when))
    by_slot[(name, c.key)] = comp
    if c.kind == "file":
        up = gr.UploadButton(
            f"Upload {c.label.lower()}…",
            size="sm",
            file_count="single",
            type="filepath",
            file_types=[c.suffix] if c.suffix else None,
        )
        up.upload(
            lambda f: f or gr.skip(), inputs=[up], outputs=[comp], api_name=False, queue=False, show_progress="hidden"
        )


def _build_settings(layout: PaneLayout, d: list) -> tuple[list, dict, dict, list, Any]:
    """A pane's settings accordion: (controls, by_slot, groups, conditional, sampling row)."""
    controls = [
        FieldDropdown(
            mechanism_choices(), value=d[0], label="Mechanism", info=mechanism_help(d[0]), elem_classes=["mechanism"]
        )
    ]
    by_slot: dict = {}
    groups: dict = {}
    conditional: list = []
    for name, cs in layout.mechanisms.items():
        with gr.Group(visible=d[0] == name, elem_classes=[f"mech-{name}"]) as g:
            gr.Markdown(f"<sub>**{html.escape(name)}** settings</sub>")
            for c in cs:
                if not c.advanced:
                    _add_control(layout, d, name, c, by_slot, conditional)
            advanced = [c for c in cs if c.advanced]
            if advanced:
                with gr.Accordion(
                    f"Advanced ({len(advanced)}: training-only or rarely changed)",
                    open=False,
                    elem_classes=["advanced"],
                ):
                    for c in advanced:
                        _add_control(layout, d, name, c, by_slot, conditional)
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
    assert len(controls) == len(layout)
    return controls, by_slot, groups, conditional, samp_row


def _build_pane(ctx: LabContext, layout: PaneLayout, p: int) -> PaneParts:
    """Pane p's column: header, settings, chat, info and its Stop button."""
    d = layout.defaults(p)
    with gr.Column(visible=p < 2, min_width=260, elem_classes=["pane"]) as col:
        header = gr.Markdown(
            pane_header(ArenaSession(ctx.store, ctx.lm), p, False, layout.spec(d)),
            elem_classes=["pane-header"],
            elem_id=f"arm{p + 1}-header",
        )
        with gr.Accordion("Arm settings (click to change)", open=False, elem_classes=["pane-settings"]) as acc:
            controls, by_slot, groups, conditional, samp_row = _build_settings(layout, d)
        err = gr.Markdown("", elem_classes=["pane-error"])
        locked = gr.Markdown("", visible=False, elem_classes=["pane-locked"])
        chat = gr.Chatbot(
            value=[],
            show_label=False,
            height=360,
            elem_classes=["pane-chat"],
            placeholder="Replies appear here.",
            buttons=["copy"],
            elem_id=f"arm{p + 1}-chat",
        )
        with gr.Row(equal_height=True):
            info = gr.Markdown("", elem_classes=["pane-info"])
            stop = gr.Button(
                f"Stop arm {p + 1}", size="sm", variant="stop", scale=0, min_width=110, elem_classes=["pane-stop"]
            )
    return PaneParts(col, header, acc, groups, samp_row, err, locked, chat, info, stop, controls, by_slot, conditional)


def _build_composer() -> Composer:
    """The composer sticks to the bottom of the window: its status line is where one types and sends."""
    with gr.Column(elem_classes=["composer"], elem_id="lab-composer"):
        with gr.Row(equal_height=True, elem_classes=["status-row"]):
            status = gr.Markdown("", elem_id="lab-status")
            resume = gr.Button(
                "Continue my last session", size="sm", visible=False, elem_id="lab-resume", scale=0, min_width=200
            )
            progress = gr.Markdown("", elem_id="lab-progress")
        with gr.Row(equal_height=True):
            msg = gr.Textbox(
                show_label=False,
                placeholder="Message to every arm — Enter sends, Shift+Enter for a new line",
                lines=1,
                max_lines=8,
                scale=8,
                elem_id="lab-message",
            )
            send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="lab-send")
        with gr.Row():
            stop_all = gr.Button("Stop all", variant="stop", size="sm")
            regenerate = gr.Button("Regenerate last turn", size="sm")
            new_session = gr.Button("New session", size="sm")
            reveal = gr.Button("Reveal arms", size="sm", visible=False, elem_id="lab-reveal")
    # the last session this browser logged to, kept across reloads (the live one dies with the page)
    last_sid = gr.BrowserState("", storage_key="lab-last-session")
    saved_name = gr.BrowserState("", storage_key="lab-annotator")
    return Composer(
        status, resume, progress, msg, send, stop_all, regenerate, new_session, reveal, last_sid, saved_name
    )


def _build_label_bar() -> LabelBar:
    gr.Markdown(
        "#### Label the replies\n<sub>Pick a turn, a stance label, optionally a note and your confidence, "
        "then **Save label**. You can label while the next turn is streaming. Enter your name under "
        "**Annotator** at the top.</sub>",
        elem_classes=["ann-intro"],
    )
    with gr.Row(equal_height=True):
        next_btn = gr.Button("Next unlabelled reply", size="sm", scale=0, min_width=180, elem_id="lab-next")
        gr.Markdown(SHORTCUTS, elem_classes=["shortcuts"])
        active_box = gr.Textbox(
            "1",
            visible=True,
            show_label=False,
            container=False,
            elem_id="label-active",
            elem_classes=["hidden-box"],
            interactive=False,
        )
    return LabelBar(next_btn, active_box)


def _build_label_box(ctx: LabContext, layout: PaneLayout, p: int, pn: PaneParts) -> None:
    """Pane p's labelling box (turn, stance, note, confidence, Save, Inspect), added to its PaneParts."""
    with gr.Column(visible=p < 2, min_width=260, elem_classes=["pane-annotate"], elem_id=f"arm{p + 1}-label") as col:
        pn.ann_col = col
        pn.label_title = gr.Markdown(
            ann_title_text(ArenaSession(ctx.store, ctx.lm), p, False, layout.spec(layout.defaults(p))),
            elem_classes=["ann-title"],
        )
        pn.turn_sel = FieldDropdown(
            choices=[], value=None, label="Turn", interactive=True, info="the latest is selected after each reply"
        )
        pn.stance = FieldRadio(STANCE_LABELS, value=None, label="Stance", elem_classes=["stance"])
        with gr.Row(equal_height=True):
            pn.note = gr.Textbox(value="", label="Note", placeholder="optional", lines=1, scale=3, min_width=120)
            pn.confidence = FieldSlider(0, 1, value=0.8, step=0.05, label="Confidence", scale=2, min_width=120)
        with gr.Row():
            pn.save = gr.Button(
                f"Save label for arm {p + 1}", size="sm", variant="primary", elem_classes=["save-label"]
            )
            pn.inspect = gr.Button("Inspect", size="sm", visible=False)
        pn.saved = gr.Markdown("", elem_classes=["saved"], elem_id=f"arm{p + 1}-saved")


def build_arena_tab(ctx: LabContext) -> "ArenaView":
    """Build the Arena inside the current Tab: the layout, then its wiring (`ArenaView`)."""
    layout = PaneLayout.current()
    state = gr.State(lambda: ArenaSession(ctx.store, ctx.lm, ctx.scheduler))
    top = _build_top()
    with gr.Row(equal_height=False, elem_classes=["panes"]):
        panes = [_build_pane(ctx, layout, p) for p in range(MAX_ARMS)]
    composer = _build_composer()
    bar = _build_label_bar()
    with gr.Row(equal_height=False, elem_classes=["annotate-row"]):
        for p, pn in enumerate(panes):
            _build_label_box(ctx, layout, p, pn)
    view = ArenaView(ctx, layout, state, top, composer, bar, panes)
    view.wire()
    return view


# ------------------------------------------------------------------------------------------ wiring
@dataclass(eq=False)  # compared and hashed by identity: Gradio keeps its bound handlers
class ArenaView:
    """The Arena's components and their event handlers: each handler turns one browser event into
    calls on the tab's `ArenaSession` and renders the result. What the rest of the app wires to is
    `wire_inspect`, `wire_continue` and `on_load`."""

    ctx: LabContext
    layout: PaneLayout
    state: Any  # gr.State holding this browser tab's ArenaSession
    top: TopRow
    composer: Composer
    bar: LabelBar
    panes: list[PaneParts]
    send_event: Any = None
    regen_event: Any = None

    def __post_init__(self) -> None:
        t, c = self.top, self.composer
        self.n_layers = self.ctx.lm.model.config.num_hidden_layers
        named_outputs = [
            ("lock_note", t.lock_note),
            ("n_arms", t.n_arms),
            ("blind", t.blind),
            ("system", t.system),
            ("title", t.title),
            ("window", t.window),
            ("reveal", c.reveal),
            ("send_btn", c.send),
            ("status", c.status),
            ("progress", c.progress),
            ("msg", c.msg),
        ] + [(f"arm{p + 1}_{name}", getattr(pn, k)) for p, pn in enumerate(self.panes) for name, k in PANE_OUTPUTS]
        assert [n for n, _ in named_outputs] == _ALL_OUTPUT_NAMES
        # columns are outputs too (a resumed session may have 3 or 4 arms) but not part of the API
        self.full_outputs = [x for _, x in named_outputs] + [
            getattr(pn, k) for pn in self.panes for k in ("col", "ann_col")
        ]
        api_visible = [n for n, x in named_outputs if not x.skip_api]
        assert api_visible == OUTPUT_NAMES, api_visible
        self.all_controls = [x for pn in self.panes for x in pn.controls]
        self.pane_columns = [pn.col for pn in self.panes] + [pn.ann_col for pn in self.panes]

    # ---------------------------------------------------------------- rendering
    def pane_spec(self, vals, p: int):
        """The pane's settings as an ArmSpec, or the one-line reason they are refused."""
        try:
            return self.layout.spec(self.layout.pane_values(vals, p), self.n_layers)
        except (SpecError, ValueError) as e:
            return (str(e).splitlines() or [type(e).__name__])[0]

    def render_top(self, tab: ArenaSession) -> dict:
        """The top row and buttons: editable before a session, fixed (showing its values) after."""
        t, started = self.top, tab.started
        return {
            t.lock_note: LOCK_CLOSED if started else LOCK_OPEN,
            t.n_arms: gr.update(interactive=not started, **({"value": tab.n} if started else {})),
            t.blind: gr.update(interactive=not started, **({"value": tab.blind} if started else {})),
            t.system: gr.update(interactive=not started),
            t.title: gr.update(interactive=not started),
            t.window: gr.update(
                interactive=not started, **({"value": "" if tab.window is None else str(tab.window)} if started else {})
            ),
            self.composer.reveal: gr.update(visible=started and tab.hidden),
            self.composer.send: gr.update(interactive=True),
        }

    def render_pane(self, tab: ArenaSession, p: int, bv: bool, vals, choices) -> dict:
        pn, arm = self.panes[p], tab.arm_of(p)
        spec = self.pane_spec(vals, p) if vals and not tab.started else None
        name = pane_name(tab, p, bv)
        out = {
            pn.col: gr.update(visible=p < tab.n) if tab.started else gr.skip(),
            pn.ann_col: gr.update(visible=p < tab.n) if tab.started else gr.skip(),
            pn.header: pane_header(tab, p, bv, spec),
            pn.acc: gr.update(visible=not tab.started and not bv),
            pn.stop: gr.update(value=f"Stop arm {name}"),
            pn.save: gr.update(value=f"Save label for arm {name}"),
            pn.label_title: ann_title_text(tab, p, bv, spec),
            pn.chat: chat_history(tab, arm) if arm is not None else [],
            pn.info: pane_info(tab, p),
            pn.turn_sel: gr.update(choices=choices, value=choices[-1][1] if choices else None),
            pn.saved: "",
            pn.stance: None,
            pn.note: "",
        }
        if tab.started and arm is not None and not tab.hidden:
            out[pn.locked] = gr.update(visible=True, value=f"<sub>fixed: `{tab.spec_of(p).to_string()}`</sub>")
        else:
            out[pn.locked] = gr.update(visible=False, value="")
        if tab.started:
            out[pn.err] = ""
        return out

    def full_render(
        self, tab: ArenaSession, blind_value: bool, vals, status_text=None, clear_msg=False, annotator_name=None
    ) -> dict:
        c = self.composer
        out = self.render_top(tab)
        if status_text is not None:
            out[c.status] = status_text
        if annotator_name is not None:
            out[c.progress] = progress_text(tab, annotator_name)
        if clear_msg:
            out[c.msg] = ""
        choices = turn_choices(tab)
        bv = tab.blind if tab.started else blind_value
        for p in range(len(self.panes)):
            out.update(self.render_pane(tab, p, bv, vals, choices))
        return out

    def keep_annotating(self, out: dict) -> dict:
        """A render that leaves what the annotator is doing in the labelling boxes."""
        for pn in self.panes:
            for k in ANNOTATING:
                out.pop(getattr(pn, k), None)
        return out

    # ---------------------------------------------------------------- the turn
    def stream(self, tab: ArenaSession, message: str, blind_value, vals, annotator_name, events, give_back=None):
        """Render a turn's StreamEvents into the panes; the final TurnOutcome into the whole tab.

        `give_back`: the text to put back in the message box if the turn is refused."""
        base = None
        user_msg = {"role": "user", "content": message}
        status, panes = self.composer.status, self.panes
        for item in events:
            if isinstance(item, TurnOutcome):
                yield self.outcome_render(tab, item, blind_value, vals, annotator_name, give_back)
                return
            ev = item
            if ev.status:  # held back by the row cap: say where it stands, keep the panes as they are
                yield {
                    status: f"⏳ {ev.status.capitalize()} — the lab is serving other sessions; this turn starts "
                    "as soon as rows free up (Stop cancels it)."
                }
                continue
            upd = {status: f"Generating… step {ev.step} (Stop buttons work while it runs)"}
            if base is None:  # after a regenerate's rollback
                base = [chat_history(tab, tab.arm_of(p)) if p < tab.n else [] for p in range(MAX_ARMS)]
                upd[self.composer.send] = gr.update(interactive=False)
            for p in range(tab.n):
                a = tab.arm_of(p)
                text = ev.texts[a] + ("" if ev.done[a] else " ▌")
                upd[panes[p].chat] = base[p] + [user_msg, {"role": "assistant", "content": text}]
            yield upd

    def outcome_render(
        self, tab: ArenaSession, item: TurnOutcome, blind_value, vals, annotator_name, give_back
    ) -> dict:
        """The whole tab after a turn ended: done, refused (the message back in the box) or failed."""
        upd = self.full_render(tab, blind_value, vals, status_text=item.status, annotator_name=annotator_name)
        if item.kind == "done":
            return upd
        if item.kind == "refused":
            gr.Warning(item.status.lstrip("⚠ "))
        self.keep_annotating(upd)
        if item.kind == "failed":
            for p in range(tab.n):
                upd[self.panes[p].info] = f"✗ generation failed: {html.escape(item.error or '')}"
        if item.kind == "refused" and give_back is not None:
            upd[self.composer.msg] = give_back
        return upd

    def send(
        self, tab: ArenaSession, message, n, blind_value, system_text, title_text, annotator_name, window_text, *vals
    ):
        c = self.composer
        settings = SessionSettings(
            n,
            lambda p: self.pane_spec(vals, p),
            bool(blind_value),
            system_text,
            title_text,
            annotator_name,
            window_text,
        )
        events = tab.send(message, settings)
        first = next(events)
        if isinstance(first, TurnOutcome):  # a bad message, or the tab is busy: the box keeps the message
            if first.kind == "refused":
                gr.Warning(first.error)
                yield {c.status: first.status, c.send: gr.update(interactive=True)}
            else:
                yield {c.status: first.status}
            return
        if isinstance(first, SettingsRefused):
            errors = dict(first.errors)
            upd = {
                c.status: "⚠ " + html.escape(settings_refusal(errors, lambda p: pane_name(tab, p, blind_value))),
                c.msg: message,
            }
            errors.pop("session", None)
            for p, pn in enumerate(self.panes):
                upd[pn.err] = f"⚠ {html.escape(errors[p])}" if p in errors else ""
            yield upd
            return
        # the sent text leaves the box at once; anything typed while the arms stream stays there
        yield {c.msg: "", c.send: gr.update(interactive=False), c.status: first.status}
        yield from self.stream(tab, message, blind_value, vals, annotator_name, events, give_back=message)

    def regenerate(self, tab: ArenaSession, blind_value, annotator_name, *vals):
        message = tab.failed_message or (tab.turns[-1].user if tab.turns else "")
        yield from self.stream(tab, message, blind_value, vals, annotator_name, tab.regenerate())

    def stop_pane(self, p: int):
        def fn(tab: ArenaSession):
            if tab.stop_pane(p):
                return f"■ Stopping arm {tab.pane_name(p)}…"
            return gr.skip()

        return fn

    def stop_all(self, tab: ArenaSession):
        if tab.stop_all():
            return "■ Stopping every arm…"
        return gr.skip()

    def new_session(self, tab: ArenaSession, blind_value, annotator_name, *vals):
        tab.reset()
        # the panes' visibility follows the Arms choice (the event chained after this one)
        return self.full_render(
            tab,
            blind_value,
            vals,
            status_text="New session: adjust the settings if you like, then send a message.",
            clear_msg=False,
            annotator_name=annotator_name,
        )

    def reveal(self, tab: ArenaSession, blind_value, annotator_name, *vals):
        try:
            mapping = tab.reveal()
        except ArenaError as e:
            return {self.composer.status: str(e)}
        return self.keep_annotating(
            self.full_render(tab, blind_value, vals, status_text=f"Revealed: {mapping}.", annotator_name=annotator_name)
        )

    def continue_session(self, tab: ArenaSession, session_id, annotator_name):
        """Reopen a logged session here and continue it (its arms rebuilt from the logged tokens)."""
        try:
            tab.reopen(session_id)
        except ArenaError as e:
            raise gr.Error(str(e), print_exception=False) from None
        n = len(tab.turns)
        return self.full_render(
            tab,
            tab.blind,
            None,
            annotator_name=annotator_name,
            status_text=f"Reopened session `{tab.session_id}` with {n} turn"
            f"{'s' if n != 1 else ''}: the next message continues it.",
        )

    # ---------------------------------------------------------------- labels
    def annotate_pane(self, p: int):
        def fn(tab: ArenaSession, name, turn_index, label, note_text, conf):
            try:
                k, tid = tab.annotate(p, turn_index, name, label, note_text, conf)
            except ArenaError as e:
                if "Annotator" in str(e):
                    gr.Warning("Enter your name in Annotator (top of the page) first.")
                return f"⚠ {e}", gr.skip()
            return f"Saved for turn {k + 1}.\n\n" + annotations_text(self.ctx, tid), progress_text(tab, name)

        return fn

    def show_annotations(self, p: int):
        def fn(tab: ArenaSession, turn_index):
            arm = tab.arm_of(p)
            try:
                tid = tab.turns[int(turn_index)].turn_ids[arm]
            except (ValueError, TypeError, IndexError):
                return ""
            return annotations_text(self.ctx, tid)

        return fn

    def next_unlabelled(self, tab: ArenaSession, name, active, *turn_sels):
        progress = self.composer.progress
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
        pn = self.panes[p]
        out[pn.turn_sel] = gr.update(value=k)
        out[pn.stance] = None
        out[pn.saved] = annotations_text(self.ctx, tab.turns[k].turn_ids[tab.arm_of(p)])
        out[self.bar.active_box] = str(p + 1)
        return out

    # ---------------------------------------------------------------- settings before a session
    @staticmethod
    def panes_for(n):
        """Pane and label columns for the Arms choice: exactly the first n are shown."""
        try:
            n = min(max(int(n or 2), 2), MAX_ARMS)
        except (TypeError, ValueError):
            n = 2
        return [gr.update(visible=p < n) for p in range(MAX_ARMS)] * 2

    def header_fn(self, p: int):
        def fn(tab: ArenaSession, blind_value, *v):
            if tab.started:
                return gr.skip(), gr.skip(), gr.skip()
            spec = self.pane_spec(list(v), 0)  # v is this pane's values alone
            err_text = f"⚠ {html.escape(spec)} — Send is refused until this is fixed." if isinstance(spec, str) else ""
            return pane_header(tab, p, blind_value, spec), ann_title_text(tab, p, blind_value, spec), err_text

        return fn

    def blind_changed(self, tab: ArenaSession, blind_value, *vals):
        out = {}
        for p, pn in enumerate(self.panes):
            spec = self.pane_spec(vals, p)
            out[pn.header] = pane_header(tab, p, blind_value, spec)
            out[pn.label_title] = ann_title_text(tab, p, blind_value, spec)
            out[pn.acc] = gr.update(visible=not tab.started and not blind_value)
            name = pane_name(tab, p, blind_value)
            out[pn.stop] = gr.update(value=f"Stop arm {name}")
            out[pn.save] = gr.update(value=f"Save label for arm {name}")
        return out

    def offer_resume(self, tab: ArenaSession, sid):
        if tab.started or not (sid or "").strip():
            return gr.update(visible=False), gr.skip()
        return (
            gr.update(visible=True),
            f"This browser's last session was `{html.escape(sid)}`: press **Continue my last session** to go on "
            "with it (its arms are rebuilt from the logged tokens), or start a new one.",
        )

    # ---------------------------------------------------------------- events
    def wire(self) -> None:
        self.wire_turns()
        self.wire_labels()
        self.wire_settings()
        self.wire_resume()

    def wire_turns(self) -> None:
        """Send, Regenerate, Stop, New session, Reveal."""
        t, c, common = self.top, self.composer, [self.state]
        ctrl_names = [n for p in range(MAX_ARMS) for n in self.layout.api_names(p)]
        send = named(
            self.send, ["message", "n_arms", "blind", "system_prompt", "title", "annotator", "window"] + ctrl_names
        )
        regenerate = named(self.regenerate, ["blind", "annotator"] + ctrl_names)
        new_session = named(self.new_session, ["blind", "annotator"] + ctrl_names)
        reveal = named(self.reveal, ["blind", "annotator"] + ctrl_names)
        top = [t.n_arms, t.blind, t.system, t.title, t.annotator, t.window]
        again = common + [t.blind, t.annotator] + self.all_controls
        # every tab's turns run at once: the step scheduler batches them (and queues past its row cap)
        self.send_event = gr.on(
            [c.msg.submit, c.send.click],
            send,
            inputs=common + [c.msg] + top + self.all_controls,
            outputs=self.full_outputs,
            api_name="send",
            show_progress="hidden",
            **MODEL_BOUND,
        )
        self.regen_event = c.regenerate.click(
            regenerate,
            inputs=again,
            outputs=self.full_outputs,
            api_name="regenerate",
            show_progress="hidden",
            **MODEL_BOUND,
        )
        c.stop_all.click(self.stop_all, inputs=common, outputs=[c.status], api_name="stop_all", queue=False)
        for p, pn in enumerate(self.panes):
            pn.stop.click(
                self.stop_pane(p), inputs=common, outputs=[c.status], api_name=f"stop_arm_{p + 1}", queue=False
            )
        # New session: stop what is running now (outside the queue), then reset once the turn has finished.
        c.new_session.click(self.stop_all, inputs=common, outputs=[c.status], queue=False, api_name=False).then(
            new_session, inputs=again, outputs=self.full_outputs, api_name="new_session", **MODEL_BOUND
        ).then(
            self.panes_for,
            inputs=[t.n_arms],
            outputs=self.pane_columns,
            queue=False,
            api_name=False,
            show_progress="hidden",
        )
        c.reveal.click(reveal, inputs=again, outputs=self.full_outputs, api_name="reveal")

    def wire_labels(self) -> None:
        """Save label, the turn picker, Next unlabelled, the annotator's name."""
        c, common = self.composer, [self.state]
        for p, pn in enumerate(self.panes):
            pn.save.click(
                self.annotate_pane(p),
                inputs=common + [self.top.annotator, pn.turn_sel, pn.stance, pn.note, pn.confidence],
                outputs=[pn.saved, c.progress],
                api_name=f"annotate_arm_{p + 1}",
            )
            pn.turn_sel.input(
                self.show_annotations(p),
                inputs=common + [pn.turn_sel],
                outputs=[pn.saved],
                api_name=False,
                show_progress="hidden",
            )
        self.bar.next.click(
            self.next_unlabelled,
            inputs=common + [self.top.annotator, self.bar.active_box] + [pn.turn_sel for pn in self.panes],
            outputs=[c.progress, self.bar.active_box]
            + [getattr(pn, k) for pn in self.panes for k in ("turn_sel", "stance", "saved")],
            api_name="next_unlabelled",
        ).then(
            None,
            inputs=[self.bar.active_box],
            outputs=None,
            js="(v) => { window.labSetActive && window.labSetActive(v); }",
        )
        self.top.annotator.blur(
            lambda tab, name: (progress_text(tab, name), (name or "").strip()),
            inputs=common + [self.top.annotator],
            outputs=[c.progress, c.saved_name],
            api_name=False,
            queue=False,
            show_progress="hidden",
        )

    def wire_settings(self) -> None:
        """Before a session: live headers, mechanism groups, the sampling row, pane count, blind."""
        quiet = dict(queue=False, api_name=False, show_progress="hidden")
        mech_names = list(self.layout.mechanisms)
        for p, pn in enumerate(self.panes):
            c = pn.controls
            c[0].change(
                lambda m: [gr.update(visible=m == name) for name in mech_names] + [gr.update(info=mechanism_help(m))],
                inputs=[c[0]],
                outputs=[pn.groups[name] for name in mech_names] + [c[0]],
                **quiet,
            )
            for name, comp, (other, value) in pn.conditional:
                pn.by_slot[(name, other)].change(
                    lambda v, want=value: gr.update(visible=str(v) == str(want)),
                    inputs=[pn.by_slot[(name, other)]],
                    outputs=[comp],
                    **quiet,
                )
            if ("sampling", "greedy") in pn.by_slot:
                greedy = pn.by_slot[("sampling", "greedy")]
                greedy.change(lambda g: gr.update(visible=not g), inputs=[greedy], outputs=[pn.samp_row], **quiet)
            triggers = [x.release if isinstance(x, gr.Slider) else x.change for x in c]
            gr.on(
                triggers,
                self.header_fn(p),
                inputs=[self.state, self.top.blind] + c,
                outputs=[pn.header, pn.label_title, pn.err],
                **quiet,
            )
        self.top.n_arms.change(self.panes_for, inputs=[self.top.n_arms], outputs=self.pane_columns, **quiet)
        self.top.blind.change(
            self.blind_changed,
            inputs=[self.state, self.top.blind] + self.all_controls,
            outputs=[getattr(pn, k) for pn in self.panes for k in ("header", "acc", "label_title", "stop", "save")],
            **quiet,
        )

    def wire_resume(self) -> None:
        """Remember the session after every turn; after a reload offer to continue it."""
        c = self.composer
        for ev in (self.send_event, self.regen_event):
            ev.then(
                lambda tab: tab.session_id or gr.skip(),
                inputs=[self.state],
                outputs=[c.last_sid],
                api_name=False,
                queue=False,
                show_progress="hidden",
            )
        resume_ev = c.resume.click(
            named(self.continue_session, ["session_id", "annotator"]),
            inputs=[self.state, c.last_sid, self.top.annotator],
            outputs=self.full_outputs,
            api_name=False,
            **MODEL_BOUND,
        )
        resume_ev.success(lambda: gr.update(visible=False), outputs=[c.resume], api_name=False, queue=False)

    def wire_inspect(self, inspect_tab, tabs: gr.Tabs, tab_id: str = "inspect") -> None:
        """Each pane's Inspect button fills the Inspect tab with its selected turn and switches to it."""

        def go(p):
            def fn(tab: ArenaSession, turn_index):
                arm = tab.arm_of(p)
                if tab.hidden:  # the arm index would tell which pane is which
                    raise gr.Error("Blind session: press Reveal arms before inspecting a reply.", print_exception=False)
                try:
                    k = int(turn_index)
                    tid = tab.turns[k].turn_ids[arm]
                except (TypeError, ValueError, IndexError):
                    raise gr.Error("Pick a logged turn first.", print_exception=False) from None
                if tid is None:
                    raise gr.Error("This turn was not logged, so it cannot be inspected.", print_exception=False)
                return tab.session_id, arm, k + 1, gr.Tabs(selected=tab_id)  # Inspect counts turns from 1

            return fn

        for p, pn in enumerate(self.panes):
            pn.inspect.visible = True
            event = pn.inspect.click(
                go(p),
                inputs=[self.state, pn.turn_sel],
                outputs=[inspect_tab.session, inspect_tab.arm, inspect_tab.turn, tabs],
                api_name=False,
            )
            inspect_tab.then_show(event)

    def on_load(self, demo: gr.Blocks) -> None:
        demo.load(
            self.offer_resume,
            inputs=[self.state, self.composer.last_sid],
            outputs=[self.composer.resume, self.composer.status],
            api_name=False,
            queue=False,
        )
        demo.load(
            lambda name: (name or "") if (name or "").strip() else gr.skip(),
            inputs=[self.composer.saved_name],
            outputs=[self.top.annotator],
            api_name=False,
            queue=False,
            show_progress="hidden",
        )

    def wire_continue(self, button: gr.Button, session_box: gr.Textbox, tabs: gr.Tabs, tab_id: str = "arena") -> None:
        """A button elsewhere (Sessions) that reopens the session in `session_box` here and switches to the Arena."""
        ev = button.click(
            named(self.continue_session, ["session_id", "annotator"]),
            inputs=[self.state, session_box, self.top.annotator],
            outputs=self.full_outputs,
            api_name="continue_session",
            **MODEL_BOUND,
        )
        ev.success(lambda: gr.Tabs(selected=tab_id), outputs=[tabs], api_name=False, queue=False)
