"""The lab in the browser: Arena, Sessions, Experiments, Inspect.

    python app.py [--host 127.0.0.1] [--port 7860] [--db URL] [--model M] [--load-in-4bit] [--auth user:pass]

The model is loaded once per process and shared by every browser tab; one step scheduler
(engine/scheduler.py) runs it for all of them, batching every tab's turns into shared forward passes
(up to `--max-rows` rows; more wait in order). Each tab's conversation lives in its own gr.State.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import gradio as gr

from .context import LabContext

CSS = """
.gradio-container {max-width: 1600px !important; overflow: clip !important}  /* hidden would break sticky */
.lab-intro p {font-size: 0.92em; margin: 0}
.lock-note p {font-size: 0.85em; margin: 0; opacity: 0.85}
.pane-header h3 {margin: 0 0 2px 0}
.pane-header sub, .pane-locked sub, .pane-info sub {line-height: 1.3}
.pane-error p {color: var(--error-text-color, #b91c1c); font-size: 0.9em; margin: 0}
.pane-info p {margin: 0}
.saved p {font-size: 0.88em; margin: 2px 0}
.stance label {font-size: 0.85em}
#lab-status p {margin: 4px 0}
.pane-chat button[aria-label="Clear"], .session-chat button[aria-label="Clear"] {display: none !important}
.short-btn {align-self: flex-end !important; max-height: 46px}
.hidden-box {display: none !important}
.composer {position: sticky; bottom: 0; z-index: 1000; background: var(--background-fill-primary);
            padding: 6px 0 4px 0; border-top: 1px solid var(--border-color-primary)}
.status-row {min-height: 1.6em; align-items: center}
.pane-note {color: var(--error-text-color, #b45309); font-size: 0.85em; font-weight: 600}
.pane-settings {max-height: 520px; overflow-y: auto}
#lab-status p, #lab-progress p {margin: 2px 0}
.pane-annotate.label-active {outline: 2px solid var(--color-accent); border-radius: 6px}
.shortcuts p {margin: 0}
/* a primary button looks enabled when it is (hover darkens it; the theme's lighter hover read as disabled) and
   clearly disabled when it is not */
button.primary:disabled, button.primary[disabled] {background: var(--neutral-200) !important; color: var(--neutral-500)
  !important; border: 1px dashed var(--neutral-400) !important; box-shadow: none !important; cursor: not-allowed}
"""

# Labelling shortcuts (outside text boxes): 1-6 pick a stance in the active label box, s saves it,
# n goes to the next unlabelled reply. Clicking a label box makes it the active one.
SHORTCUTS_JS = """
<script>
(() => {
  let active = 1;
  const box = (n) => document.getElementById('arm' + n + '-label');
  const mark = () => { for (let i = 1; i <= 4; i++) { const b = box(i); if (b) b.classList.toggle('label-active', i === active); } };
  window.labSetActive = (v) => { const n = parseInt(v); if (n >= 1 && n <= 4) { active = n; mark();
    const b = box(n); if (b) b.scrollIntoView({block: 'nearest'}); } };
  document.addEventListener('click', (e) => {
    const b = e.target.closest && e.target.closest('.pane-annotate');
    if (b && b.id) { active = parseInt(b.id.replace('arm', '')); mark(); }
  }, true);
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target;
    if (t && (t.isContentEditable || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT' ||
              (t.tagName === 'INPUT' && !['radio', 'checkbox', 'button'].includes(t.type)))) return;
    const b = box(active);
    if (!b || b.offsetParent === null) return;
    if (/^[1-9]$/.test(e.key)) {
      const radios = b.querySelectorAll('.stance input[type=radio]');
      const r = radios[parseInt(e.key) - 1];
      if (r) { r.click(); e.preventDefault(); mark(); }
    } else if (e.key === 's' || e.key === 'S') {
      const s = b.querySelector('.save-label'); if (s) { s.click(); e.preventDefault(); }
    } else if (e.key === 'n' || e.key === 'N') {
      const n = document.getElementById('lab-next'); if (n) { n.click(); e.preventDefault(); }
    }
  });
  const ready = setInterval(() => { if (box(1)) { mark(); clearInterval(ready); } }, 300);
})();
</script>
"""


# Soft, but a hovered primary button darkens instead of paling (a pale Run read as disabled, issue 22)
THEME = gr.themes.Soft().set(
    button_primary_background_fill_hover="*primary_600",
    button_primary_background_fill_hover_dark="*primary_600",
    button_primary_text_color="white",
    button_primary_text_color_hover="white",
)


def _unavailable(name: str, e: Exception) -> None:
    gr.Markdown(
        f"*The {name} view is not available in this build ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else 'not importable'}).*"
    )


def build_app(ctx: LabContext) -> gr.Blocks:
    from .arena import build_arena_tab
    from .sessions import build_sessions_tab

    ident = ctx.lm.identity
    with gr.Blocks(title="memory-linkage lab") as demo:
        gr.Markdown(
            f"## The memory-linkage lab\n<sub>model **{ident.name}** · {ident.n_layers} layers · "
            f"{ident.dtype} · {ident.device} · database `{ctx.db_url or ctx.store.name}` · "
            f"up to {ctx.scheduler.max_rows} arms generating at once, over all tabs</sub>"
        )
        experiments = None
        with gr.Tabs(selected="arena") as tabs:
            with gr.Tab("Arena", id="arena"):
                arena = build_arena_tab(ctx)
            with gr.Tab("Sessions", id="sessions") as sessions_tab:
                sessions = build_sessions_tab(ctx)
            with gr.Tab("Experiments", id="experiments"):
                try:
                    from .experiments_view import build_experiments_tab
                except ImportError as e:
                    _unavailable("Experiments", e)
                else:
                    experiments = build_experiments_tab(ctx)
            with gr.Tab("Inspect", id="inspect"):
                inspect = None
                try:
                    from .inspect_view import build_inspect_tab
                except ImportError as e:
                    _unavailable("Inspect", e)
                else:
                    inspect = build_inspect_tab(ctx)
        if inspect is not None:
            arena.wire_inspect(inspect, tabs)
            sessions.wire_inspect(inspect, tabs)
        arena.wire_continue(sessions.continue_btn, sessions.session_id, tabs)
        if experiments is not None:
            _wire_open_in_sessions(experiments, sessions, tabs)
        sessions_tab.select(sessions.list_fn, inputs=[sessions.kind], outputs=[sessions.table], api_name=False)
        demo.load(sessions.list_fn, inputs=[sessions.kind], outputs=[sessions.table], api_name=False)
        arena.on_load(demo)
    return demo


def _wire_open_in_sessions(experiments, sessions, tabs: gr.Tabs) -> None:
    """The Experiments tab's 'Open in Sessions' shows the dialogue behind a point, read-only."""

    def go(sid):
        if not sid:
            raise gr.Error("Pick a dialogue of the run first.", print_exception=False)
        return sid, gr.Tabs(selected="sessions")

    experiments.open_session.click(
        go, inputs=[experiments.session], outputs=[sessions.session_id, tabs], api_name=False
    ).success(sessions.open_fn, inputs=[sessions.session_id], outputs=sessions.open_outputs, api_name=False)


def launch(
    ctx: LabContext,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    prevent_thread_lock: bool = False,
    auth=None,
    quiet: bool = False,
) -> gr.Blocks:
    """Build and serve the lab; with prevent_thread_lock=True it returns while the server runs."""
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=prevent_thread_lock,
        auth=auth,
        show_error=True,
        quiet=quiet,
        css=CSS,
        theme=THEME,
        head=SHORTCUTS_JS,
        footer_links=["gradio"],
    )
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="app.py", description="The memory-linkage lab in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--db", default=None, help="database URL or SQLite file (default $LAB_DB or sqlite:///lab.db)")
    p.add_argument("--model", default=None, help="'embedded' (default), a local folder, or a cached HF id")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the model loader's choice)")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit weights (bitsandbytes, CUDA)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="ask for a login (not production-grade)")
    p.add_argument(
        "--max-rows",
        default=None,
        metavar="N",
        help="most rows (arms) generating at once over all tabs; more wait in order "
        "(default $LAB_MAX_ROWS, else estimated from free memory)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # The scheduler's thread runs the model's Python between kernels; with the default 5 ms switch
    # interval every busy request thread (Gradio rendering a step) can hold it up for 5 ms per op.
    sys.setswitchinterval(float(os.environ.get("LAB_SWITCH_INTERVAL", "0.0005")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = None
    if args.auth:
        user, sep, pw = args.auth.partition(":")
        if not sep or not user or not pw:
            print("error: --auth must be USER:PASS", file=sys.stderr)
            return 2
        auth = (user, pw)
    max_rows = None
    if args.max_rows is not None:
        try:
            max_rows = int(args.max_rows)
            if max_rows < 1:
                raise ValueError
        except ValueError:
            print(f"error: --max-rows must be a whole number >= 1, not {args.max_rows!r}", file=sys.stderr)
            return 2
    from db import Store, StoreError, default_db_url
    from engine import DialogueError, ModelLoadError, load_model

    db_url = args.db or default_db_url()
    try:
        store = Store(db_url)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        lm = load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit)
    except ModelLoadError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: cannot load the model {args.model or 'embedded'}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    captures = store.dir / "captures" if store.dir else Path(tempfile.gettempdir()) / "lab-captures"
    try:
        ctx = LabContext(store=store, lm=lm, db_url=store.name, captures_dir=str(captures), max_rows=max_rows)
    except DialogueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"lab: model {lm.identity.name} on {lm.identity.device}, database {store.name}, "
        f"up to {ctx.scheduler.max_rows} rows at once",
        flush=True,
    )
    try:
        launch(ctx, args.host, args.port, auth=auth)
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
