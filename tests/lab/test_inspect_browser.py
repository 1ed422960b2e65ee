"""The Inspect tab in a real browser: Debian's Chromium driven by Playwright, the real lab app."""

from __future__ import annotations

import pytest
from conftest import BROWSER_MARKS, CHROMIUM, serve_lab
from conftest import CHROMIUM_ARGS as ARGS

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def served(embedded, tmp_path_factory):
    from db import Store
    from engine import Dialogue, parse_arm
    from experiments.record import SessionRecorder

    folder = tmp_path_factory.mktemp("inspect-browser")
    store = Store(folder / "lab.db")
    d = Dialogue(embedded, [parse_arm("observer"), parse_arm("continuity:linkage=1")], system="You are terse.")
    rec = SessionRecorder(store, embedded, d, title="browser inspect")
    for m in ["Name a colour.", "Are you sure?"]:
        rec.log(m, d.send(m, max_new_tokens=12))
    url, demo = serve_lab(store, embedded, captures_dir=str(folder / "captures"))
    yield url, rec.session_id
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
            page.locator("#inspect-arm input").first.fill("2")  # arms count from 1: the linked arm
            page.locator("#inspect-turn input").first.fill("2")  # turns count from 1
            page.locator("#inspect-show").click()
            for pid in (
                "inspect-divergence",
                "inspect-memory",
                "inspect-grid",
                "inspect-heatmap",
                "inspect-source",
                "inspect-summary",
            ):
                page.locator(f"#{pid} .js-plotly-plot").first.wait_for(state="attached", timeout=240_000)
            page.wait_for_function(
                "document.querySelectorAll('#inspect-heatmap .js-plotly-plot .heatmaplayer, "
                "#inspect-heatmap .js-plotly-plot .hm').length > 0 || "
                "document.querySelectorAll('#inspect-heatmap .js-plotly-plot .main-svg').length > 0",
                timeout=60_000,
            )
            status = page.locator("#inspect-status").inner_text()
            assert "arm" in status and "turn" in status and "Cannot" not in status
            # a bad turn shows a message, the page stays alive
            page.locator("#inspect-turn input").first.fill("9")
            page.locator("#inspect-show").click()
            page.wait_for_function(
                "document.querySelector('#inspect-status').innerText.includes('Cannot inspect')", timeout=60_000
            )
        finally:
            browser.close()


WATCH = """() => {
  window.__capturing = false;
  const look = () => { if (document.body.innerText.includes('capturing turn')) window.__capturing = true; };
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true});
  look();
}"""


def test_other_arm_of_a_captured_turn_opens_from_the_store(served):
    """One capture covers every arm: Inspect of the observer after the linked arm shows its views at once,
    with no 'capturing' progress and no new pass on the server."""
    from playwright.sync_api import expect, sync_playwright

    from experiments import inspect as I

    url, sid = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))  # e.g. Plotly refusing a figure
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Inspect").click()
            page.locator("#inspect-session textarea, #inspect-session input").first.fill(sid)
            status = page.locator("#inspect-status")

            def show(arm):
                page.locator("#inspect-arm input").first.fill(str(arm))
                page.locator("#inspect-turn input").first.fill("1")  # the first turn
                page.evaluate(WATCH)
                page.locator("#inspect-show").click()
                expect(status).to_contain_text(f"**arm** {arm}".replace("**", ""), timeout=240_000)
                page.locator("#inspect-heatmap .js-plotly-plot").first.wait_for(state="attached", timeout=60_000)
                return status.inner_text(), page.evaluate("window.__capturing")

            before = I.STATS["capture_runs"]
            text, capturing = show(
                2
            )  # arms count from 1; turn 1 was never inspected: one capture pass, shown while it runs
            assert "computed now" in text and capturing
            assert I.STATS["capture_runs"] == before + 1
            text, capturing = show(1)  # the observer
            assert "from the cache" in text and "observer" in text, text
            assert not capturing
            assert I.STATS["capture_runs"] == before + 1
            expect(page.locator("#inspect-heatmap")).to_contain_text("arm 1 (observer)")
            # every plot drawn (the divergence strip of one row of tokens once got too little height)
            for pid in ("inspect-divergence", "inspect-grid", "inspect-heatmap", "inspect-source"):
                plot = page.locator(f"#{pid} .js-plotly-plot").first
                plot.wait_for(state="attached", timeout=60_000)
                assert plot.bounding_box()["height"] > 50, pid
            assert not errors, errors
        finally:
            browser.close()
