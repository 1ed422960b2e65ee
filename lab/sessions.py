"""The Sessions tab: past sessions from the database, reopened read-only, and exports."""
from __future__ import annotations

import html
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from db import StoreError
from db.export import export as export_files
from db.blind import is_blinded, pane_letters, reveal_mapping

from .arena_controller import (ArenaError, label_progress, labelled_line, reveal_session, stop_reason_text,
                               turn_label)
from .fields import FieldDropdown, FieldNumber, FieldRadio
from .context import LabContext

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
        out.append([s["id"], _when(s.get("created_at")), s.get("kind", ""), s.get("title") or "", arms,
                    int(s.get("n_turns") or 0), int(s.get("n_annotations") or 0),  # n_turns: exchanges
                    labelled_cell(counts.get(s["id"]))])
    return pd.DataFrame(out, columns=LIST_COLUMNS)


def build_sessions_tab(ctx: LabContext) -> dict:
    gr.Markdown("Every session in the database (newest first). Click a row, then **Open** to read it side by side "
                "with its labels, or export it.")
    with gr.Row(equal_height=True):
        kind = FieldDropdown(["all", "lab", "experiment"], value="all", label="Kind", scale=1, min_width=120)
        refresh = gr.Button("Refresh", size="sm", scale=1, min_width=100, elem_classes=["short-btn"])
        gr.Markdown(f"<sub>Database: `{html.escape(ctx.db_url or ctx.store.name)}`</sub>")
    table = gr.Dataframe(value=pd.DataFrame(columns=LIST_COLUMNS), interactive=False, wrap=True, max_height=320,
                         label="Sessions", elem_id="sessions-table",
                         # every column on screen, the labelling count included (the id alone is 32 characters)
                         column_widths=["22%", "11%", "6%", "20%", "16%", "6%", "8%", "11%"])
    with gr.Row(equal_height=True):
        session_id = gr.Textbox(label="Session id", placeholder="click a row above or paste an id", scale=3,
                                elem_id="sessions-id")
        open_btn = gr.Button("Open", variant="primary", scale=1, min_width=100, elem_classes=["short-btn"])
        continue_btn = gr.Button("Continue in Arena", scale=1, min_width=140, elem_classes=["short-btn"],
                                 elem_id="sessions-continue")
        reveal_btn = gr.Button("Reveal arms", scale=1, min_width=120, visible=False, elem_classes=["short-btn"],
                               elem_id="sessions-reveal")
    head = gr.Markdown("", elem_id="sessions-head")
    cols, chats = [], []
    with gr.Row(equal_height=False):
        for i in range(N_COLS):
            with gr.Column(visible=False, min_width=240) as col:
                chat = gr.Chatbot(value=[], label=f"Arm {i}", height=360, buttons=["copy"], elem_classes=["session-chat"])
            cols.append(col)
            chats.append(chat)
    annotations = gr.Dataframe(value=pd.DataFrame(columns=ANN_COLUMNS), interactive=False, wrap=True,
                               label="Annotations (newest label per turn and annotator)", max_height=260,
                               elem_id="sessions-annotations")
    with gr.Row(equal_height=True):
        insp_arm = FieldNumber(value=0, precision=0, minimum=0, label="Arm (index)", scale=1, min_width=100)
        insp_turn = FieldNumber(value=1, precision=0, minimum=1, label="Turn", info="counted from 1, as in the Arena",
                                 scale=1, min_width=100)
        inspect_btn = gr.Button("Inspect this turn", size="sm", scale=1, visible=False, elem_classes=["short-btn"])
    with gr.Accordion("Export", open=True):
        with gr.Row(equal_height=True):
            fmt = FieldRadio(list(FORMATS), value="CSV", label="Format", scale=3)
            scope = FieldRadio(["this session", "all sessions"], value="this session", label="What", scale=2)
            export_btn = gr.Button("Export", variant="primary", scale=1, min_width=100, elem_classes=["short-btn"])
        files = gr.File(label="Files to download", file_count="multiple", interactive=False, elem_id="export-files")
        export_msg = gr.Markdown("")

    def list_fn(k):
        try:
            return sessions_frame(ctx, k)
        except StoreError as e:
            gr.Warning(str(e))
            return pd.DataFrame(columns=LIST_COLUMNS)

    def pick(evt: gr.SelectData, df):
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            return str(df.iloc[int(row)]["id"])
        except Exception:  # noqa: BLE001
            return gr.skip()

    def open_fn(sid):
        sid = (sid or "").strip()
        blank = [gr.update(visible=False)] * N_COLS + [gr.update(value=[])] * N_COLS
        if not sid:
            return ["⚠ Pick a session first.", *blank, pd.DataFrame(columns=ANN_COLUMNS), gr.update(visible=False)]
        try:
            s = ctx.store.get_session(sid)
            turns = ctx.store.get_turns(sid)
            anns = ctx.store.latest_annotations(sid)
            progress = {who: label_progress(ctx.store, sid, who) for who in sorted({a["annotator"] for a in anns})}
            total = label_progress(ctx.store, sid, "")[1]
        except StoreError as e:
            return [f"⚠ {e}", *blank, pd.DataFrame(columns=ANN_COLUMNS), gr.update(visible=False)]
        hidden = is_hidden(s)
        letters = pane_letters(s)
        # a blind session's columns in pane order (A, B, ...), as its panes showed them
        arms = sorted(s["arms"], key=lambda a: letters.get(a["index"], "Z")) if s.get("blind") else s["arms"]
        labels = ({a["index"]: f"Arm {letters.get(a['index'], '?')}" for a in arms} if hidden
                  else {a["index"]: a["label"] for a in arms})
        model = (s.get("model") or {}).get("name", "?")
        lines = [f"**{html.escape(s.get('title') or '(untitled)')}** · {s['kind']} · {_when(s['created_at'])} · "
                 f"model `{html.escape(str(model))}` · {len(arms)} arms"
                 + (f" · annotator {html.escape(s['user'])}" if s.get("user") else "")
                 + (f" · attention window {window} tokens" if (window := (s.get("meta") or {}).get("window")) else "")]
        lines.append(" · ".join(labelled_line(done, m, who) for who, (done, m) in progress.items())
                     if progress else f"**0 of {total}** replies labelled")
        if hidden:
            lines.append("Blind session, **not revealed**: panes are named by letter only. Press *Reveal arms* "
                         "(here or in the Arena) to see which arm is which.")
        elif s.get("blind"):
            order = s.get("pane_order") or []
            lines.append("Blind session (revealed); panes showed: " + reveal_mapping(labels, order))
        if s.get("system_prompt"):
            lines.append(f"System prompt: *{html.escape(s['system_prompt'])}*")
        ann_by_turn: dict[int, list] = {}
        for a in anns:
            ann_by_turn.setdefault(a["turn_id"], []).append(a)
        col_updates, chat_updates = [], []
        for i in range(N_COLS):
            if i >= len(arms):
                col_updates.append(gr.update(visible=False))
                chat_updates.append(gr.update(value=[]))
                continue
            idx = arms[i]["index"]
            msgs = []
            for t in turns:
                if t["arm_index"] != idx or t["role"] == "system":
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
            col_updates.append(gr.update(visible=True))
            chat_updates.append(gr.update(value=msgs, label=labels[idx] if hidden else f"Arm {idx} · {arms[i]['label']}"))
        if hidden:  # in pane order, so the row order says nothing about the arm index
            anns = sorted(anns, key=lambda a: (a["turn_index"], letters.get(a["arm_index"], "Z")))
        ann_df = pd.DataFrame([[labels.get(a["arm_index"], a["arm_index"]), a["turn_index"] + 1, a["annotator"],
                                a["stance_label"], a.get("confidence"), a.get("note") or "",
                                _when(a.get("created_at"))] for a in anns], columns=ANN_COLUMNS)
        return ["\n\n".join(lines), *col_updates, *chat_updates, ann_df, gr.update(visible=hidden)]

    def export_fn(sid, fmt_label, what, progress=gr.Progress()):
        sid = (sid or "").strip()
        f = FORMATS.get(fmt_label, "csv")
        if what == "this session" and not sid:
            return None, "⚠ Pick a session first (or choose *all sessions*)."
        if f == "bundle" and not sid:
            return None, "⚠ A bundle holds one session: pick a session first."
        progress(0.2, desc="exporting")
        one = sid if what == "this session" or f == "bundle" else None
        if f == "bundle":
            try:
                if is_hidden(ctx.store.get_session(one)):
                    # the bundle's sealed copy holds the mapping (decodable by anyone): not offered from here
                    return None, ("⚠ This blind session has not been revealed: a bundle carries its arms sealed "
                                  "inside, so the lab does not offer it until Reveal (CSV, JSONL and Parquet name "
                                  "the panes by letter).")
            except StoreError as e:
                return None, f"⚠ Export failed: {e}"
        out_dir = Path(tempfile.mkdtemp(prefix="lab-export-"))
        try:
            paths = export_files(ctx.store, f, out_dir, session_id=one)
        except (StoreError, ValueError, OSError, ImportError) as e:
            return None, f"⚠ Export failed: {e}"
        progress(1.0)
        return [str(p) for p in paths], f"✓ Wrote {', '.join(Path(p).name for p in paths)}."

    refresh.click(list_fn, inputs=[kind], outputs=[table], api_name="list_sessions")
    kind.change(list_fn, inputs=[kind], outputs=[table], api_name=False)
    table.select(pick, inputs=[table], outputs=[session_id], api_name=False)
    open_outputs = [head, *cols, *chats, annotations, reveal_btn]
    open_btn.click(open_fn, inputs=[session_id], outputs=open_outputs, api_name="open_session")
    session_id.submit(open_fn, inputs=[session_id], outputs=open_outputs, api_name=False)

    def reveal_fn(sid, k):
        """Reveal a blind session (the Arena's own call), then show it and the list with the real arm labels."""
        sid = (sid or "").strip()
        if not sid:
            raise gr.Error("Open a session first.", print_exception=False)
        try:
            mapping = reveal_session(ctx.store, sid)
        except ArenaError as e:
            raise gr.Error(str(e), print_exception=False) from None
        out = open_fn(sid)
        out[0] = f"✓ Revealed: {html.escape(mapping)}.\n\n" + out[0]
        return [*out, list_fn(k)]

    reveal_btn.click(reveal_fn, inputs=[session_id, kind], outputs=[*open_outputs, table], api_name="reveal_session")
    export_btn.click(export_fn, inputs=[session_id, fmt, scope], outputs=[files, export_msg], api_name="export")

    def wire_inspect(inspect_parts: dict, tabs: gr.Tabs, tab_id: str = "inspect"):
        def go(sid, arm, turn):
            if not (sid or "").strip():
                raise gr.Error("Open a session first.", print_exception=False)
            try:
                if is_hidden(ctx.store.get_session(sid.strip())):
                    raise gr.Error("Blind session: reveal its arms (Reveal arms, here or in the Arena) before "
                                   "inspecting it.", print_exception=False)
            except StoreError as e:
                raise gr.Error(str(e), print_exception=False) from None
            try:
                return sid.strip(), int(arm or 0), int(turn or 1), gr.Tabs(selected=tab_id)  # turns from 1 in both
            except (TypeError, ValueError, OverflowError):
                raise gr.Error("Arm and turn must be whole numbers.", print_exception=False) from None

        inspect_btn.visible = True
        event = inspect_btn.click(go, inputs=[session_id, insp_arm, insp_turn],
                                  outputs=[inspect_parts["session"], inspect_parts["arm"], inspect_parts["turn"], tabs],
                                  api_name=False)
        if "then_show" in inspect_parts:
            inspect_parts["then_show"](event)

    return dict(kind=kind, refresh=refresh, table=table, session_id=session_id, open=open_btn, head=head,
                chats=chats, annotations=annotations, fmt=fmt, scope=scope, export=export_btn, files=files,
                export_msg=export_msg, list_fn=list_fn, wire_inspect=wire_inspect, continue_btn=continue_btn,
                open_fn=open_fn, open_outputs=open_outputs, reveal=reveal_btn, reveal_fn=reveal_fn)
