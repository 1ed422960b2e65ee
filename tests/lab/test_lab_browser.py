"""The lab in a real browser: Debian's Chromium driven by Playwright (sync API).

Type a message, see both panes answer, label a reply, open Sessions, download the CSV export, and
find the turns and the label in the database.
"""

from __future__ import annotations

import re

from conftest import BROWSER_MARKS, limit_new_tokens

pytestmark = BROWSER_MARKS
LONG = 240_000  # ms: generation on a busy 2-core CPU


def test_chat_annotate_export(server, page, tmp_path):
    from playwright.sync_api import expect

    from db import Store

    url, db_file = server
    page.goto(url)
    limit_new_tokens(page, 8)  # short replies
    expect(page.locator("#arm1-header")).to_contain_text("≤8 tokens")
    page.get_by_label("Annotator").fill("ana")
    page.locator("#lab-message textarea").fill("Is the sky green?")
    page.locator("#lab-send").click()

    status = page.locator("#lab-status")
    expect(status).to_contain_text("Turn 1 logged", timeout=LONG)
    for i in range(2):  # both panes answered (the reply carries its token count)
        chat = page.locator(f"#arm{i + 1}-chat")
        expect(chat).to_contain_text("Is the sky green?")
        expect(chat).to_contain_text(re.compile(r"\d+ tokens ·"))
    expect(page.get_by_text("Settings are fixed for this session")).to_be_visible()
    session_id = status.locator("code").inner_text().strip()

    # label arm 2's reply
    ann = page.locator("#arm2-label")
    ann.get_by_text("maintained", exact=True).click()
    ann.get_by_label("Note").fill("keeps its view")
    ann.get_by_role("button", name="Save label for arm 2").click()
    saved = page.locator("#arm2-saved")
    expect(saved).to_contain_text("Saved for turn 1", timeout=30_000)
    expect(saved).to_contain_text("maintained")

    # Inspect (when that view is built in): fills the Inspect tab with this turn and switches to it
    inspect_btn = ann.get_by_role("button", name="Inspect", exact=True)
    if inspect_btn.count():
        inspect_btn.click()
        expect(page.get_by_role("tab", name="Inspect")).to_have_attribute("aria-selected", "true")
        expect(page.get_by_label("session id")).to_have_value(session_id)
        page.get_by_role("tab", name="Arena").click()

    # Sessions: the session is listed; open it; export CSV and download it
    page.get_by_role("tab", name="Sessions").click()
    expect(page.locator("#sessions-table")).to_contain_text(session_id[:8], timeout=30_000)
    page.locator("#sessions-id textarea, #sessions-id input").first.fill(session_id)
    page.get_by_role("button", name="Open", exact=True).click()
    expect(page.locator("#sessions-annotations")).to_contain_text("keeps its view", timeout=30_000)
    page.get_by_role("button", name="Export", exact=True).click()
    row = page.locator("#export-files").get_by_role("row").filter(has_text=re.compile(r"turns\s*\.csv"))
    link = row.get_by_role("link")
    expect(link).to_be_visible(timeout=30_000)
    with page.expect_download() as dl:
        link.click()
    path = tmp_path / "turns.csv"
    dl.value.save_as(path)
    import pandas as pd

    turns = pd.read_csv(path)
    assert set(turns["session_id"]) == {session_id}
    assert sorted(turns["role"]) == ["assistant", "assistant", "user", "user"]

    with Store(f"sqlite:///{db_file}") as store:
        rows = store.get_turns(session_id)
        assert {(t["arm_index"], t["role"]) for t in rows} == {
            (0, "user"),
            (0, "assistant"),
            (1, "user"),
            (1, "assistant"),
        }
        assert all(t["text"] for t in rows if t["role"] == "assistant")
        anns = store.latest_annotations(session_id)
        assert [(a["arm_index"], a["stance_label"], a["note"], a["annotator"]) for a in anns] == [
            (1, "maintained", "keeps its view", "ana")
        ]


def test_two_tabs_stream_at_once(server, page):
    """Two researchers' tabs: both turns stream at the same time (the step scheduler batches them)."""
    import time

    from playwright.sync_api import expect

    url, _ = server
    tabs = [page, page.context.new_page()]
    for k, pg in enumerate(tabs):
        pg.set_default_timeout(60_000)
        pg.goto(url)
        limit_new_tokens(pg, 48)
        pg.locator("#lab-message textarea").fill(f"Tell me a story about a lighthouse number {k + 1}.")
    for pg in tabs:
        pg.locator("#lab-send").click()
    statuses = [pg.locator("#lab-status") for pg in tabs]
    both_streaming = False
    deadline = time.time() + LONG / 1000
    while time.time() < deadline:
        texts = [s.inner_text() for s in statuses]
        if all("Generating… step" in t for t in texts):
            both_streaming = True
        if all("Turn 1 logged" in t for t in texts):
            break
        time.sleep(0.1)
    for s in statuses:
        expect(s).to_contain_text("Turn 1 logged", timeout=LONG)
    assert both_streaming, "the two tabs never streamed at the same moment"
    for pg in tabs:  # each tab shows its own conversation
        expect(pg.locator("#arm1-chat")).to_contain_text("lighthouse number")
    assert "number 1" in tabs[0].locator("#arm1-chat").inner_text()
    assert "number 2" in tabs[1].locator("#arm1-chat").inner_text()
