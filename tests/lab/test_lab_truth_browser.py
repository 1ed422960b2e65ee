"""What the Arena shows is what runs (issue 22), in real Chromium on the real lab and model.

The page opens at the top; the panes follow the Arms choice, also after New session; a setting
outside its bounds stays as typed, is marked, and Send is refused with one line naming it; an edit
made just before Send (and just after New session) is the one that runs; the status line sits in
the composer beside the Send box; an untrained arm says so; training-only keys are behind
"Advanced"; every view counts turns from 1 and words a stop reason the same way.
"""

from __future__ import annotations

import re

from conftest import BROWSER_MARKS

pytestmark = BROWSER_MARKS
LONG = 240_000  # ms: generation on a busy 2-core CPU


def visible_panes(page) -> int:
    return sum(page.locator(f"#arm{i}-chat").is_visible() for i in range(1, 5))


def settings(page, pane: int):
    """Open a pane's settings accordion (if closed) and return the pane's column."""
    col = page.locator(".pane").nth(pane)
    acc = col.get_by_text("Arm settings (click to change)")
    if not col.locator(".mechanism input").first.is_visible():
        acc.click()
    return col


def logged_max_tokens(db_file, sid) -> dict[int, tuple[int, int]]:
    """{arm index: (max_new_tokens the turn ran with, tokens it generated)} of a session's last turn."""
    from db import Store

    with Store(f"sqlite:///{db_file}") as store:
        rows = [t for t in store.get_turns(sid) if t["role"] == "assistant"]
        last = max(t["turn_index"] for t in rows)
        return {
            t["arm_index"]: (t["gen_settings"]["max_new_tokens"], t["n_tokens"])
            for t in rows
            if t["turn_index"] == last
        }


def test_the_arena_shows_what_runs(server, page):
    from playwright.sync_api import expect

    from db import Store

    url, db_file = server
    page.goto(url)
    expect(page.locator("#lab-message textarea")).to_be_visible()
    page.wait_for_timeout(1500)
    assert page.evaluate("window.scrollY") == 0, "the page must open at the top (no autofocus scroll)"

    # panes follow the Arms choice
    assert visible_panes(page) == 2
    page.get_by_role("radio", name="3", exact=True).click()
    expect(page.locator("#arm3-chat")).to_be_visible()
    assert visible_panes(page) == 3
    page.get_by_role("radio", name="2", exact=True).click()
    expect(page.locator("#arm3-chat")).to_be_hidden()

    # controls: the seed's storage bound is not printed; mechanism help follows the mechanism;
    # an untrained arm says so; training-only keys hide behind Advanced; `hidden` only for the MLP memory
    pane2 = settings(page, 1)
    expect(pane2.get_by_text("9.22337e+18")).to_have_count(0)
    mech = pane2.locator(".mechanism input").first
    mech.click()
    page.get_by_role("option", name="memory_bank").click()
    expect(pane2.get_by_text("memory_bank: The memory bank")).to_be_visible()
    expect(page.locator("#arm2-header")).to_contain_text("fresh random bank: expect noise")
    bank = pane2.locator(".mech-memory_bank")
    expect(bank.get_by_label("Init std")).to_be_hidden()
    bank.get_by_text(re.compile(r"^Advanced \(")).click()
    expect(bank.get_by_label("Init std")).to_be_visible()
    expect(bank.get_by_text(re.compile("training only"))).to_have_count(2)
    mech.click()
    page.get_by_role("option", name="neural_memory").click()
    nm = pane2.locator(".mech-neural_memory")
    expect(nm.get_by_label("Hidden")).to_be_hidden()
    nm.get_by_label("Memory", exact=True).click()
    page.get_by_role("option", name="mlp").click()
    expect(nm.get_by_label("Hidden")).to_be_visible()
    expect(page.locator("#arm2-header")).not_to_contain_text("expect noise")
    expect(page.locator("#arm2-header")).to_contain_text("close to the observer's")  # its default gain is weak
    mech.click()
    page.get_by_role("option", name="continuity").click()
    expect(pane2.get_by_text("continuity: The continuity stream")).to_be_visible()

    # a value out of bounds stays as typed, is marked, and Send is refused with one line naming it
    linkage = pane2.get_by_label("Linkage λ")
    linkage.fill("7")
    linkage.press("Tab")
    page.wait_for_timeout(500)
    expect(linkage).to_have_value("7")
    expect(page.locator("#arm2-header")).to_contain_text("invalid settings")
    expect(pane2.locator(".pane-error").first).to_contain_text("linkage")
    page.locator("#lab-message textarea").fill("Is the sky green?")
    page.locator("#lab-send").click()
    status = page.locator("#lab-status")
    expect(status).to_contain_text("Not sent: arm 2 · continuity: linkage", timeout=30_000)
    expect(page.locator("#lab-message textarea")).to_have_value("Is the sky green?")
    expect(linkage).to_have_value("7")
    with Store(f"sqlite:///{db_file}") as store:
        assert store.list_sessions() == [], "a refused first message must leave nothing behind"

    # the edits made right before Send are the ones that run (no blur, no wait)
    linkage.fill("1")
    pane1 = settings(page, 0)
    pane1.get_by_label("Max new tokens").fill("5")
    pane2.get_by_label("Max new tokens").fill("3")
    page.locator("#lab-send").click()
    expect(status).to_contain_text("Turn 1 logged", timeout=LONG)
    sid = status.locator("code").inner_text().strip()
    assert {a: m for a, (m, _) in logged_max_tokens(db_file, sid).items()} == {0: 5, 1: 3}
    assert all(n <= m for m, n in logged_max_tokens(db_file, sid).values())

    # the status line is in the composer, beside the Send box, and stays in view while scrolled
    box, send = status.bounding_box(), page.locator("#lab-send").bounding_box()
    assert abs((box["y"] + box["height"]) - send["y"]) < 120, (box, send)
    page.mouse.wheel(0, -3000)
    page.wait_for_timeout(300)
    assert page.locator("#lab-composer").bounding_box()["y"] < 1000

    # New session shows the chosen number of panes; an edit right after it is the one that runs
    page.get_by_role("button", name="New session").click()
    expect(status).to_contain_text("New session", timeout=60_000)
    assert visible_panes(page) == 2, "New session must show exactly the panes the Arms choice says"
    pane1 = settings(page, 0)
    pane1.get_by_label("Max new tokens").fill("4")
    page.locator("#lab-message textarea").fill("And the grass?")
    page.locator("#lab-send").click()
    expect(status).to_contain_text("Turn 1 logged", timeout=LONG)
    sid2 = status.locator("code").inner_text().strip()
    assert sid2 != sid
    assert logged_max_tokens(db_file, sid2)[0][0] == 4
    expect(page.locator("#arm1-chat")).to_contain_text(re.compile(r"\d+ tokens? · .*(finished|hit the token limit)"))

    # after a reload: Continue sits beside the status line, the page still opens at the top
    page.get_by_label("Annotator").fill("rita")
    page.get_by_label("Annotator").press("Tab")
    page.wait_for_timeout(500)
    page.reload()
    resume = page.locator("#lab-resume")
    expect(resume).to_be_visible(timeout=30_000)
    assert page.evaluate("window.scrollY") == 0
    r, s = resume.bounding_box(), page.locator("#lab-status").bounding_box()
    assert abs(r["y"] - s["y"]) < 60, (r, s)
    expect(page.get_by_label("Annotator")).to_have_value("rita")  # remembered by this browser

    # Sessions counts turns from 1 and words the stop reason as the Arena does
    page.get_by_role("tab", name="Sessions").click()
    page.locator("#sessions-id textarea, #sessions-id input").first.fill(sid2)
    page.get_by_role("button", name="Open", exact=True).click()
    chat = page.locator(".session-chat").first
    expect(chat).to_contain_text("turn 1 ·", timeout=30_000)
    expect(chat).not_to_contain_text("turn 0")
    expect(chat).to_contain_text(re.compile(r"(finished|hit the token limit)"))
    expect(chat).not_to_contain_text(re.compile(r"· (length|eos)\b"))
    turn_box = page.get_by_role("spinbutton", name="Turn")
    expect(turn_box).to_have_value("1")

    # ... and so does Inspect, opened from there on the same (first) turn
    page.locator("#sessions-arm input").first.fill("2")  # arms count from 1: the linked arm
    page.get_by_role("button", name="Inspect this turn").click()
    expect(page.get_by_role("tab", name="Inspect")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#inspect-turn input").first).to_have_value("1")
    inspect_status = page.locator("#inspect-status")
    expect(inspect_status).to_contain_text("turn 1 of 1", timeout=LONG)
    expect(page.locator("#inspect-heatmap")).to_contain_text("turn 1", timeout=60_000)
