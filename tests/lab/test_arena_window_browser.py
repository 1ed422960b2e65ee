"""The Arena's attention-window setting in a real browser (Debian's Chromium via Playwright): a bad
value is refused with one line and nothing sent; a good one starts the session with that window,
is stored in the session's meta, and the box is locked until New session."""

from __future__ import annotations

from conftest import BROWSER_MARKS, limit_new_tokens

pytestmark = BROWSER_MARKS
LONG = 240_000  # ms: generation on a busy 2-core CPU


def test_window_setting_is_validated_stored_and_locked(server, page):
    from playwright.sync_api import expect

    from db import Store

    url, db_file = server
    page.goto(url)
    limit_new_tokens(page, 3)
    window = page.get_by_label("Attention window (tokens)")
    window.fill("ten")
    page.locator("#lab-message textarea").fill("Remember: my colour is teal.")
    page.locator("#lab-send").click()
    status = page.locator("#lab-status")
    expect(status).to_contain_text("attention window must be a whole number", timeout=30_000)
    expect(page.locator("#lab-message textarea")).to_have_value("Remember: my colour is teal.")
    assert Store(f"sqlite:///{db_file}").list_sessions() == []

    window.fill("24")
    page.locator("#lab-send").click()
    expect(status).to_contain_text("Turn 1 logged", timeout=LONG)
    expect(window).to_be_disabled()
    expect(window).to_have_value("24")
    session_id = status.locator("code").inner_text().strip()
    meta = Store(f"sqlite:///{db_file}").get_session(session_id)["meta"]
    assert meta["window"] == 24

    page.get_by_role("button", name="New session").click()
    expect(window).to_be_enabled(timeout=30_000)
