"""The Sessions tab: past sessions from the database, reopened read-only, and exports."""

from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from db import StoreError
from db.blind import is_blinded, pane_letters, reveal_mapping
from db.export import export as export_files

from .arena_controller import ArenaError, label_progress, labelled_line, reveal_session, stop_reason_text, turn_label
from .context import LabContext
from .fields import FieldDropdown, FieldNumber, FieldRadio

N_COLS = 4


def is_hidden(session: dict) -> bool:
    """A blind session whose arms have not been revealed: only pane letters may be shown."""
    return is_blinded(session)


FORMATS = {"CSV": "csv", "JSONL": "jsonl", "Parquet": "parquet", "Bundle (JSON, one session)": "bundle"}
LIST_COLUMNS = ["id", "created", "kind", "title", "arms", "turns", "annotations", "labelled"]
ANN_COLUMNS = ["arm", "turn", "annotator", "stance", "confidence", "note", "created"]


def _when(dt) -> str:
    try:
        return dt.astimezone().strftime("%Y-%m-%d %H:%M")
    except Exception:  # noqa: BLE001 - whatever the backend returned, show something
        return str(dt or "")


def labelled_cell(counts: dict | None) -> str:
    """The list's "labelled" cell: "N of M" per annotator (the Arena's numbers), or "0 of M"."""
    counts = counts or {"replies": 0, "labelled": {}}
    m = counts["replies"]
    if not counts["labelled"]:
        return f"0 of {m}"
    return ", ".join(f"{who} {n} of {m}" for who, n in sorted(counts["labelled"].items()))


def sessions_frame(ctx: LabContext, kind: str = "all", limit: int = 300) -> pd.DataFrame:
    rows = ctx.store.list_sessions(kind=None if kind in (None, "", "all") else kind)[:limit]
    counts = ctx.store.label_counts([s["id"] for s in rows]) if rows else {}
    out = []
    for s in rows:
        try:
            arms = ", ".join(a["label"] for a in ctx.store.get_session(s["id"])["arms"])
        except StoreError:
            arms = str(s.get("n_arms", ""))
        if s.get("blind"):
            try:
                full = ctx.store.get_session(s["id"])
                if is_hidden(full):
                    arms = ", ".join(f"Arm {x}" for x in sorted(pane_letters(full).values()))
            except StoreError:
                arms = ""
            arms = "(blind) " + arms
        out.append(
            [
                s["id"],
                _when(s.get("created_at")),
                s.get("kind", ""),
                s.get("title") or "",
                arms,
                int(s.get("n_turns") or 0),
                int(s.get("n_annotations") or 0),  # n_turns: exchanges
                labelled_cell(counts.get(s["id"])),
            ]
        )
    return pd.DataFrame(out, columns=LIST_COLUMNS)


# ---------------------------------------------------------------------------------- the tab's controller
# Plain functions of (ctx, values) -> values: no Gradio, testable on a real store.


class SessionsError(ValueError):
    """A request the Sessions tab refuses, in one line for the researcher."""


@dataclass
class OpenedSession:
    """A session as the tab shows it: the head, one (label, messages) per column, the annotations, and
    whether it is blind and not revealed (Reveal is offered)."""

    head: str
    panes: list = field(default_factory=list)
    annotations: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ANN_COLUMNS))
    hidden: bool = False


def list_sessions(ctx: LabContext, kind: str) -> tuple[pd.DataFrame, str | None]:
    """The list, or an empty one and the store's complaint."""
    try:
        return sessions_frame(ctx, kind), None
    except StoreError as e:
        return pd.DataFrame(columns=LIST_COLUMNS), str(e)


def _head(s: dict, arms: list, labels: dict, progress: dict, total: int, hidden: bool) -> str:
    """The lines above the columns: title, model, arms, labelling progress, blind state, system prompt."""
    model = (s.get("model") or {}).get("name", "?")
    lines = [
        f"**{html.escape(s.get('title') or '(untitled)')}** · {s['kind']} · {_when(s['created_at'])} · "
        f"model `{html.escape(str(model))}` · {len(arms)} arms"
        + (f" · annotator {html.escape(s['user'])}" if s.get("user") else "")
        + (f" · attention window {window} tokens" if (window := (s.get("meta") or {}).get("window")) else "")
    ]
    lines.append(
        " · ".join(labelled_line(done, m, who) for who, (done, m) in progress.items())
        if progress
        else f"**0 of {total}** replies labelled"
    )
    if hidden:
        lines.append(
            "Blind session, **not revealed**: panes are named by letter only. Press *Reveal arms* "
            "(here or in the Arena) to see which arm is which."
        )
    elif s.get("blind"):
        order = s.get("pane_order") or []
        lines.append("Blind session (revealed); panes showed: " + reveal_mapping(labels, order))
    if s.get("system_prompt"):
        lines.append(f"System prompt: *{html.escape(s['system_prompt'])}*")
    return "\n\n".join(lines)


def _messages(turns: list, arm_index: int, ann_by_turn: dict) -> list[dict]:
    """One arm's transcript as chat messages; each reply with its turn (from 1), length, time, stop and labels."""
    msgs = []
    for t in turns:
        if t["arm_index"] != arm_index or t["role"] == "system":
            continue
        content = t["text"] or "*(empty)*"
        if t["role"] == "assistant":
            bits = [turn_label(t["turn_index"]), f"{t.get('n_tokens') or 0} tokens"]
            if t.get("duration_s"):
                bits.append(f"{t['duration_s']:.1f} s")
            if t.get("finish_reason"):
                bits.append(stop_reason_text(t["finish_reason"]))
            for a in ann_by_turn.get(t["id"], []):
                bits.append(f"label {a['annotator']}: {a['stance_label']}")
            content += "\n\n<sub>" + html.escape(" · ".join(bits)) + "</sub>"
        msgs.append({"role": t["role"], "content": content})
    return msgs


def _annotations(anns: list, labels: dict, letters: dict, hidden: bool) -> pd.DataFrame:
    if hidden:  # in pane order, so the row order says nothing about the arm index
        anns = sorted(anns, key=lambda a: (a["turn_index"], letters.get(a["arm_index"], "Z")))
    return pd.DataFrame(
        [
            [
                labels.get(a["arm_index"], arm_name(a["arm_index"])),
                a["turn_index"] + 1,
                a["annotator"],
                a["stance_label"],
                a.get("confidence"),
                a.get("note") or "",
                _when(a.get("created_at")),
            ]
            for a in anns
        ],
        columns=ANN_COLUMNS,
    )


def arm_name(arm_index: int) -> str:
    """'Arm 1' for the stored index 0: every view counts arms from 1 (the store stays 0-based)."""
    return f"Arm {int(arm_index) + 1}"


def open_session(ctx: LabContext, sid) -> OpenedSession:
    """A logged session read back for the tab: columns in pane order (by letter only while blind)."""
    sid = (sid or "").strip()
    if not sid:
        return OpenedSession("⚠ Pick a session first.")
    try:
        s = ctx.store.get_session(sid)
        turns = ctx.store.get_turns(sid)
        anns = ctx.store.latest_annotations(sid)
        progress = {who: label_progress(ctx.store, sid, who) for who in sorted({a["annotator"] for a in anns})}
        total = label_progress(ctx.store, sid, "")[1]
    except StoreError as e:
        return OpenedSession(f"⚠ {e}")
    hidden = is_hidden(s)
    letters = pane_letters(s)
    # a blind session's columns in pane order (A, B, ...), as its panes showed them
    arms = sorted(s["arms"], key=lambda a: letters.get(a["index"], "Z")) if s.get("blind") else s["arms"]
    labels = (
        {a["index"]: f"Arm {letters.get(a['index'], '?')}" for a in arms}
        if hidden
        else {a["index"]: a["label"] for a in arms}
    )
    ann_by_turn: dict[int, list] = {}
    for a in anns:
        ann_by_turn.setdefault(a["turn_id"], []).append(a)
    panes = [
        (
            labels[a["index"]] if hidden else f"{arm_name(a['index'])} · {a['label']}",
            _messages(turns, a["index"], ann_by_turn),
        )
        for a in arms[:N_COLS]
    ]
    return OpenedSession(
        _head(s, arms, labels, progress, total, hidden), panes, _annotations(anns, labels, letters, hidden), hidden
    )


def reveal_and_open(ctx: LabContext, sid) -> OpenedSession:
    """Reveal a blind session (the Arena's own call), then read it back with the real arm labels."""
    sid = (sid or "").strip()
    if not sid:
        raise SessionsError("Open a session first.")
    try:
        mapping = reveal_session(ctx.store, sid)
    except ArenaError as e:
        raise SessionsError(str(e)) from None
    opened = open_session(ctx, sid)
    opened.head = f"✓ Revealed: {html.escape(mapping)}.\n\n" + opened.head
    return opened


def export_session(ctx: LabContext, sid, fmt_label, what, progress=None) -> tuple[list[str] | None, str]:
    """Write the chosen export; (paths, message). A blind session that is not revealed gets no bundle."""
    sid = (sid or "").strip()
    f = FORMATS.get(fmt_label, "csv")
    if what == "this session" and not sid:
        return None, "⚠ Pick a session first (or choose *all sessions*)."
    if f == "bundle" and not sid:
        return None, "⚠ A bundle holds one session: pick a session first."
    if progress is not None:
        progress(0.2, desc="exporting")
    one = sid if what == "this session" or f == "bundle" else None
    if f == "bundle":
        try:
            if is_hidden(ctx.store.get_session(one)):
                # the bundle's sealed copy holds the mapping (decodable by anyone): not offered from here
                return None, (
                    "⚠ This blind session has not been revealed: a bundle carries its arms sealed "
                    "inside, so the lab does not offer it until Reveal (CSV, JSONL and Parquet name "
                    "the panes by letter)."
                )
        except StoreError as e:
            return None, f"⚠ Export failed: {e}"
    out_dir = Path(tempfile.mkdtemp(prefix="lab-export-"))
    try:
        paths = export_files(ctx.store, f, out_dir, session_id=one)
    except (StoreError, ValueError, OSError, ImportError) as e:
        return None, f"⚠ Export failed: {e}"
    if progress is not None:
        progress(1.0)
    return [str(p) for p in paths], f"✓ Wrote {', '.join(Path(p).name for p in paths)}."


def inspect_target(ctx: LabContext, sid, arm, turn) -> tuple[str, int, int]:
    """(session id, stored arm index, turn counted from 1) for Inspect; the form counts arms and turns from 1.
    A blind session that is not revealed is refused: the arm index would tell which pane is which."""
    sid = (sid or "").strip()
    if not sid:
        raise SessionsError("Open a session first.")
    try:
        if is_hidden(ctx.store.get_session(sid)):
            raise SessionsError(
                "Blind session: reveal its arms (Reveal arms, here or in the Arena) before inspecting it."
            )
    except StoreError as e:
        raise SessionsError(str(e)) from None
    try:
        return sid, int(arm or 1) - 1, int(turn or 1)  # arms and turns from 1 in both tabs
    except (TypeError, ValueError, OverflowError):
        raise SessionsError("Arm and turn must be whole numbers.") from None


# ---------------------------------------------------------------------------------- layout and wiring


def _sessions_layout(ctx: LabContext) -> dict:
    """The tab's components, by name."""
    c: dict = {}
    gr.Markdown(
        "Every session in the database (newest first). Click a row, then **Open** to read it side by side "
        "with its labels, or export it."
    )
    with gr.Row(equal_height=True):
        c["kind"] = FieldDropdown(["all", "lab", "experiment"], value="all", label="Kind", scale=1, min_width=120)
        c["refresh"] = gr.Button("Refresh", size="sm", scale=1, min_width=100, elem_classes=["short-btn"])
        gr.Markdown(f"<sub>Database: `{html.escape(ctx.db_url or ctx.store.name)}`</sub>")
    c["table"] = gr.Dataframe(
        value=pd.DataFrame(columns=LIST_COLUMNS),
        interactive=False,
        wrap=True,
        max_height=320,
        label="Sessions",
        elem_id="sessions-table",
        # every column on screen, the labelling count included (the id alone is 32 characters)
        column_widths=["22%", "11%", "6%", "20%", "16%", "6%", "8%", "11%"],
    )
    with gr.Row(equal_height=True):
        c["session_id"] = gr.Textbox(
            label="Session id", placeholder="click a row above or paste an id", scale=3, elem_id="sessions-id"
        )
        c["open"] = gr.Button("Open", variant="primary", scale=1, min_width=100, elem_classes=["short-btn"])
        c["continue_btn"] = gr.Button(
            "Continue in Arena", scale=1, min_width=140, elem_classes=["short-btn"], elem_id="sessions-continue"
        )
        c["reveal"] = gr.Button(
            "Reveal arms", scale=1, min_width=120, visible=False, elem_classes=["short-btn"], elem_id="sessions-reveal"
        )
    c["head"] = gr.Markdown("", elem_id="sessions-head")
    c["cols"], c["chats"] = [], []
    with gr.Row(equal_height=False):
        for i in range(N_COLS):
            with gr.Column(visible=False, min_width=240) as col:
                c["chats"].append(
                    gr.Chatbot(value=[], label=arm_name(i), height=360, buttons=["copy"], elem_classes=["session-chat"])
                )
            c["cols"].append(col)
    c["annotations"] = gr.Dataframe(
        value=pd.DataFrame(columns=ANN_COLUMNS),
        interactive=False,
        wrap=True,
        label="Annotations (newest label per turn and annotator)",
        max_height=260,
        elem_id="sessions-annotations",
    )
    with gr.Row(equal_height=True):
        c["insp_arm"] = FieldNumber(
            value=1,
            precision=0,
            minimum=1,
            label="Arm",
            info="counted from 1, as in the Arena",
            scale=1,
            min_width=100,
            elem_id="sessions-arm",
        )
        c["insp_turn"] = FieldNumber(
            value=1,
            precision=0,
            minimum=1,
            label="Turn",
            info="counted from 1, as in the Arena",
            scale=1,
            min_width=100,
        )
        c["inspect_btn"] = gr.Button("Inspect this turn", size="sm", scale=1, visible=False, elem_classes=["short-btn"])
    with gr.Accordion("Export", open=True):
        with gr.Row(equal_height=True):
            c["fmt"] = FieldRadio(list(FORMATS), value="CSV", label="Format", scale=3)
            c["scope"] = FieldRadio(["this session", "all sessions"], value="this session", label="What", scale=2)
            c["export"] = gr.Button("Export", variant="primary", scale=1, min_width=100, elem_classes=["short-btn"])
        c["files"] = gr.File(
            label="Files to download", file_count="multiple", interactive=False, elem_id="export-files"
        )
        c["export_msg"] = gr.Markdown("")
    return c


def _open_updates(opened: OpenedSession) -> list:
    """An OpenedSession as the tab's outputs: head, N_COLS columns, N_COLS chats, annotations, Reveal."""
    n = len(opened.panes)
    cols = [gr.update(visible=i < n) for i in range(N_COLS)]
    chats = [
        gr.update(value=opened.panes[i][1], label=opened.panes[i][0]) if i < n else gr.update(value=[])
        for i in range(N_COLS)
    ]
    return [opened.head, *cols, *chats, opened.annotations, gr.update(visible=opened.hidden)]


def _wire_sessions(ctx: LabContext, c: dict) -> dict:
    """The list, Open, Reveal and Export events; returns the Gradio-facing functions other tabs chain."""

    def list_fn(k):
        frame, problem = list_sessions(ctx, k)
        if problem:
            gr.Warning(problem)
        return frame

    def pick(evt: gr.SelectData, df):
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            return str(df.iloc[int(row)]["id"])
        except Exception:  # noqa: BLE001
            return gr.skip()

    def open_fn(sid):
        return _open_updates(open_session(ctx, sid))

    def reveal_fn(sid, k):
        """Reveal a blind session (the Arena's own call), then show it and the list with the real arm labels."""
        try:
            opened = reveal_and_open(ctx, sid)
        except SessionsError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return [*_open_updates(opened), list_fn(k)]

    def export_fn(sid, fmt_label, what, progress=gr.Progress()):
        return export_session(ctx, sid, fmt_label, what, progress=progress)

    c["refresh"].click(list_fn, inputs=[c["kind"]], outputs=[c["table"]], api_name="list_sessions")
    c["kind"].change(list_fn, inputs=[c["kind"]], outputs=[c["table"]], api_name=False)
    c["table"].select(pick, inputs=[c["table"]], outputs=[c["session_id"]], api_name=False)
    open_outputs = [c["head"], *c["cols"], *c["chats"], c["annotations"], c["reveal"]]
    c["open"].click(open_fn, inputs=[c["session_id"]], outputs=open_outputs, api_name="open_session")
    c["session_id"].submit(open_fn, inputs=[c["session_id"]], outputs=open_outputs, api_name=False)
    c["reveal"].click(
        reveal_fn, inputs=[c["session_id"], c["kind"]], outputs=[*open_outputs, c["table"]], api_name="reveal_session"
    )
    c["export"].click(
        export_fn,
        inputs=[c["session_id"], c["fmt"], c["scope"]],
        outputs=[c["files"], c["export_msg"]],
        api_name="export",
    )
    return dict(list_fn=list_fn, open_fn=open_fn, open_outputs=open_outputs, reveal_fn=reveal_fn)


def _inspect_wiring(ctx: LabContext, c: dict):
    """`wire_inspect(inspect_tab, tabs)`: 'Inspect this turn' fills Inspect (session, 0-based arm index, turn
    from 1), switches to it and chains its Show."""

    def wire_inspect(inspect_tab, tabs: gr.Tabs, tab_id: str = "inspect"):
        def go(sid, arm, turn):
            try:
                return (*inspect_target(ctx, sid, arm, turn), gr.Tabs(selected=tab_id))
            except SessionsError as e:
                raise gr.Error(str(e), print_exception=False) from None

        c["inspect_btn"].visible = True
        event = c["inspect_btn"].click(
            go,
            inputs=[c["session_id"], c["insp_arm"], c["insp_turn"]],
            outputs=[inspect_tab.session, inspect_tab.arm, inspect_tab.turn, tabs],
            api_name=False,
        )
        inspect_tab.then_show(event)

    return wire_inspect


@dataclass
class SessionsTab:
    """The Sessions tab as the app wires it: its components, the handlers other tabs chain
    (`list_fn`, `open_fn` with `open_outputs`, `reveal_fn`) and `wire_inspect(inspect_tab, tabs)`."""

    kind: Any
    refresh: Any
    table: Any
    session_id: Any
    open: Any
    head: Any
    chats: Any
    annotations: Any
    fmt: Any
    scope: Any
    export: Any
    files: Any
    export_msg: Any
    list_fn: Any
    wire_inspect: Any
    continue_btn: Any
    open_fn: Any
    open_outputs: Any
    reveal: Any
    reveal_fn: Any


def build_sessions_tab(ctx: LabContext) -> SessionsTab:
    """Build the tab in the current Blocks; returns its components and the functions other tabs wire to."""
    c = _sessions_layout(ctx)
    fns = _wire_sessions(ctx, c)
    return SessionsTab(
        kind=c["kind"],
        refresh=c["refresh"],
        table=c["table"],
        session_id=c["session_id"],
        open=c["open"],
        head=c["head"],
        chats=c["chats"],
        annotations=c["annotations"],
        fmt=c["fmt"],
        scope=c["scope"],
        export=c["export"],
        files=c["files"],
        export_msg=c["export_msg"],
        list_fn=fns["list_fn"],
        wire_inspect=_inspect_wiring(ctx, c),
        continue_btn=c["continue_btn"],
        open_fn=fns["open_fn"],
        open_outputs=fns["open_outputs"],
        reveal=c["reveal"],
        reveal_fn=fns["reveal_fn"],
    )
