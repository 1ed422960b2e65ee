"""The Inspect tab in a real browser: Debian's Chromium driven by Playwright, the real lab app."""
from __future__ import annotations

import os
import socket

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(embedded, tmp_path_factory):
    from db import Store
    from engine import Dialogue, parse_arm
    from experiments.record import SessionRecorder
    from lab.context import LabContext

    folder = tmp_path_factory.mktemp("inspect-browser")
    store = Store(folder / "lab.db")
    d = Dialogue(embedded, [parse_arm("observer"), parse_arm("continuity:linkage=1")], system="You are terse.")
    rec = SessionRecorder(store, embedded, d, title="browser inspect")
    for m in ["Name a colour.", "Are you sure?"]:
        rec.log(m, d.send(m, max_new_tokens=12))
    ctx = LabContext(store=store, lm=embedded, db_url=store.name, captures_dir=str(folder / "captures"))
    port = _free_port()
    try:
        from lab.app import launch  # the real app, with every tab
        demo = launch(ctx, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    except ImportError:  # pragma: no cover - only while the app is not in the tree
        import gradio as gr

        from lab.inspect_view import build_inspect_tab
        with gr.Blocks() as demo:
            with gr.Tab("Inspect"):
                build_inspect_tab(ctx)
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", rec.session_id
    demo.close()
    store.close()


def test_inspect_tab_renders_plots(served):
    from playwright.sync_api import sync_playwright

    url, sid = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Inspect").click()
            box = page.locator("#inspect-session textarea, #inspect-session input").first
            box.fill(sid)
            page.locator("#inspect-arm input").first.fill("1")
            page.locator("#inspect-turn input").first.fill("1")
            page.locator("#inspect-show").click()
            for pid in ("inspect-divergence", "inspect-memory", "inspect-grid", "inspect-heatmap", "inspect-source",
                        "inspect-summary"):
                page.locator(f"#{pid} .js-plotly-plot").first.wait_for(state="attached", timeout=240_000)
            page.wait_for_function("document.querySelectorAll('#inspect-heatmap .js-plotly-plot .heatmaplayer, "
                                   "#inspect-heatmap .js-plotly-plot .hm').length > 0 || "
                                   "document.querySelectorAll('#inspect-heatmap .js-plotly-plot .main-svg').length > 0",
                                   timeout=60_000)
            status = page.locator("#inspect-status").inner_text()
            assert "arm" in status and "turn" in status and "Cannot" not in status
            # a bad turn shows a message, the page stays alive
            page.locator("#inspect-turn input").first.fill("9")
            page.locator("#inspect-show").click()
            page.wait_for_function("document.querySelector('#inspect-status').innerText.includes('Cannot inspect')",
                                   timeout=60_000)
        finally:
            browser.close()
