"""A study in real Chromium: a mechanism known only to this file gets its own controls; a blind
session stays blind in every view and download until Reveal; Send is off while the arms stream and
text typed meanwhile stays; labels by keyboard with a progress count; a logged session reopened in
the Arena continues in the same session.
"""

from __future__ import annotations

import re
from typing import Literal

import pytest
from conftest import BROWSER_MARKS, limit_new_tokens, serve_lab
from pydantic import Field

from engine.mechanisms import MECHANISMS, Mechanism, MechanismSettings, register

pytestmark = BROWSER_MARKS
LONG = 240_000


class ToySettings(MechanismSettings):
    mode: Literal["mask", "none"] = Field("mask", description="what the toy does")
    strength: float = Field(2.0, ge=0.5, le=8.0, description="how hard the toy pushes")
    document: str | None = Field(None, description="a text file to read", json_schema_extra={"file": True})


class Toy(Mechanism):
    name = "toy_mask"
    Settings = ToySettings

    def forward(self, layer, attn, x_hat, position_embeddings, attn_out, row):
        return None


@pytest.fixture(scope="module")
def lab(embedded, tmp_path_factory):
    """The real lab with the toy registered before it is built."""
    from db import Store

    register(Toy)
    db_file = tmp_path_factory.mktemp("study") / "lab.db"
    store = Store(f"sqlite:///{db_file}")
    url, demo = serve_lab(store, embedded)
    yield url, store
    demo.close()
    store.close()
    MECHANISMS.pop(Toy.name, None)


def test_a_toy_mechanism_gets_its_own_controls(lab, page):
    from playwright.sync_api import expect

    page.goto(lab[0])
    page.get_by_text("Arm settings (click to change)").nth(1).click()
    page.locator(".mechanism input").first.click()
    page.get_by_role("option", name="toy_mask").click()
    expect(page.locator("#arm2-header")).to_contain_text("toy_mask λ=1")
    group = page.locator(".mech-toy_mask")
    expect(group.get_by_text("how hard the toy pushes")).to_be_visible()  # the field's description
    expect(group.get_by_role("button", name=re.compile("Upload document"))).to_be_visible()
    expect(page.locator(".mech-continuity").first).to_be_hidden()
    box = group.get_by_label("Strength")
    box.fill("9")
    box.press("Tab")
    expect(page.locator("#arm2-header")).to_contain_text("strength: input should be less than or equal to 8")
    box.fill("4")
    box.press("Tab")
    expect(page.locator("#arm2-header")).to_contain_text("strength 4")


def test_blind_session_stays_blind_labels_by_keyboard_and_continues(lab, page, tmp_path):
    from playwright.sync_api import expect

    url, store = lab
    page.goto(url)
    limit_new_tokens(page, 12)
    page.get_by_label("Blind mode").check()
    page.get_by_label("Annotator").fill("ana")
    msg = page.locator("#lab-message textarea")
    msg.fill("Is the sky green?")
    page.locator("#lab-send").click()
    # Send is off while the arms stream, and what is typed meanwhile stays in the box
    expect(page.locator("#lab-send")).to_be_disabled(timeout=30_000)
    msg.fill("typed while streaming")
    status = page.locator("#lab-status")
    expect(status).to_contain_text("Turn 1 logged", timeout=LONG)
    expect(page.locator("#lab-send")).to_be_enabled()
    expect(msg).to_have_value("typed while streaming")
    sid = status.locator("code").inner_text().strip()
    arena = page.locator("#arm1-header").locator("xpath=ancestor::div[contains(@class,'panes')]")
    expect(page.locator("#arm1-header")).to_have_text("Arm A")
    for word in ("observer", "continuity", "λ"):
        expect(arena).not_to_contain_text(word)

    # Inspect would pass the arm index: refused until Reveal, the Inspect tab is not filled
    page.locator("#arm1-label").get_by_role("button", name="Inspect", exact=True).click()
    expect(page.get_by_text("press Reveal arms before inspecting", exact=False).first).to_be_visible()
    expect(page.get_by_role("tab", name="Arena")).to_have_attribute("aria-selected", "true")

    # labels by keyboard: click a label box, 2 = 'maintained', s = save; the count shows at the top
    page.locator("#arm1-label .ann-title").first.click()
    page.keyboard.press("2")
    expect(page.locator("#arm1-label").get_by_label("maintained")).to_be_checked()
    page.keyboard.press("s")
    expect(page.locator("#arm1-saved")).to_contain_text("Saved for turn 1", timeout=30_000)
    expect(page.locator("#lab-progress")).to_contain_text("1 of 2")
    page.keyboard.press("n")  # the next unlabelled reply: pane B, turn 1
    expect(page.locator("#arm2-label")).to_have_class(re.compile("label-active"), timeout=30_000)
    page.keyboard.press("4")
    page.keyboard.press("s")
    expect(page.locator("#lab-progress")).to_contain_text("2 of 2", timeout=30_000)

    # Sessions: list, open and download name the panes by letter only
    page.get_by_role("tab", name="Sessions").click()
    table = page.locator("#sessions-table")
    expect(table).to_contain_text(sid[:8], timeout=30_000)
    expect(table).to_contain_text("(blind) Arm A, Arm B")
    page.locator("#sessions-id textarea, #sessions-id input").first.fill(sid)
    page.get_by_role("button", name="Open", exact=True).click()
    expect(page.get_by_text("not revealed")).to_be_visible(timeout=30_000)
    sessions_view = page.locator("#sessions-annotations").locator("xpath=ancestor::div[contains(@class,'tabitem')]")
    expect(page.locator("#sessions-annotations")).to_contain_text("Arm A")
    for word in ("observer", "continuity", "λ"):
        expect(sessions_view).not_to_contain_text(word)
    page.get_by_role("button", name="Export", exact=True).click()
    link = (
        page.locator("#export-files")
        .get_by_role("row")
        .filter(has_text=re.compile(r"turns\s*\.csv"))
        .get_by_role("link")
    )
    expect(link).to_be_visible(timeout=30_000)
    with page.expect_download() as dl:
        link.click()
    dl.value.save_as(tmp_path / "turns.csv")
    text = (tmp_path / "turns.csv").read_text()
    assert "continuity" not in text and "observer" not in text and "Arm A" in text
    page.get_by_label("Bundle (JSON, one session)").check()
    page.get_by_role("button", name="Export", exact=True).click()
    expect(page.get_by_text("does not offer it until Reveal")).to_be_visible(timeout=30_000)

    # Continue in Arena: the arms are rebuilt from the logged tokens; the next turn joins the session
    page.locator("#sessions-continue").click()
    expect(page.get_by_role("tab", name="Arena")).to_have_attribute("aria-selected", "true", timeout=LONG)
    expect(status).to_contain_text("Reopened session", timeout=LONG)
    expect(page.locator("#arm1-chat")).to_contain_text("Is the sky green?")
    msg.fill("Are you sure?")
    page.locator("#lab-send").click()
    expect(status).to_contain_text("Turn 2 logged", timeout=LONG)
    assert status.locator("code").inner_text().strip() == sid
    assert sorted({t["turn_index"] for t in store.get_turns(sid)}) == [0, 1]

    # a reload drops the live conversation; the browser remembers the session and offers to continue it
    page.reload()
    resume = page.locator("#lab-resume")
    expect(resume).to_be_visible(timeout=60_000)
    expect(status).to_contain_text(sid)
    resume.click()
    expect(status).to_contain_text("Reopened session", timeout=LONG)
    expect(page.locator("#arm2-chat")).to_contain_text("Are you sure?")
    expect(page.locator("#arm1-header")).to_have_text("Arm A")  # still blind after the reload

    page.locator("#lab-reveal").click()
    expect(status).to_contain_text("Revealed", timeout=30_000)
    headers = page.locator("#arm1-header").inner_text() + page.locator("#arm2-header").inner_text()
    assert "observer" in headers and "continuity" in headers


def test_sessions_tab_counts_labels_and_reveals(lab, embedded, page):
    """Sessions: "N of M labelled" per session and annotator (the Arena's numbers), and Reveal on a blind
    session: pane letters before it, the real arm labels in every Sessions view after it."""
    import random

    from playwright.sync_api import expect

    from engine import parse_arm
    from lab.arena_controller import ArenaSession

    url, store = lab
    ctl = ArenaSession(store, embedded)
    ctl.start(
        [parse_arm("observer:max_new_tokens=3"), parse_arm("continuity:linkage=1,max_new_tokens=3")],
        blind=True,
        rng=random.Random(2),
        title="reveal from sessions",
    )
    list(ctl.run_turn("Is the sky green?"))
    ctl.annotate(0, 0, "ana", "initial stance")
    sid = ctl.session_id
    assert ctl.label_progress("ana") == (1, 2)

    page.goto(url)
    page.get_by_role("tab", name="Sessions").click()
    row = page.locator("#sessions-table").get_by_role("row").filter(has_text=sid[:8])
    expect(row).to_contain_text("ana 1 of 2", timeout=30_000)
    expect(row).to_contain_text("(blind) Arm A, Arm B")
    page.locator("#sessions-id textarea, #sessions-id input").first.fill(sid)
    page.get_by_role("button", name="Open", exact=True).click()
    head = page.locator("#sessions-head")
    expect(head).to_contain_text("1 of 2 replies labelled by ana", timeout=30_000)
    expect(head).to_contain_text("not revealed")
    # what the opened session shows (the list above also holds the other tests' sessions)
    shown = (
        "document.querySelector('#sessions-head').innerText + [...document.querySelectorAll('.session-chat')]"
        ".map(e => e.innerText).join(' ') + document.querySelector('#sessions-annotations').innerText"
    )
    expect(page.locator(".session-chat").first).to_contain_text("Is the sky green?")
    text = page.evaluate(shown)
    assert "Arm A" in text and not any(w in text for w in ("observer", "continuity", "λ")), text
    page.locator("#sessions-reveal").click()
    expect(head).to_contain_text("Revealed", timeout=30_000)
    expect(head).to_contain_text("1 of 2 replies labelled by ana")
    expect(page.locator("#sessions-reveal")).to_be_hidden()
    expect(page.locator("#sessions-annotations")).not_to_contain_text("Arm A")
    text = page.evaluate(shown)
    assert "observer" in text and "continuity" in text, text
    expect(row).not_to_contain_text("(blind) Arm A")
    expect(row).to_contain_text("observer")
    assert "revealed_at" in store.get_session(sid)["meta"]
