"""What Sessions, Inspect and Experiments show is what ran (issue 22), in real Chromium on the real lab and model.

Arms are numbered from 1 in Sessions and Inspect (the store stays 0-based) and the Arena's default panes carry
no 'expect noise' warning; Inspect's progress says exactly what the divergence pass compares; the divergence
strip's labels are legible and whole; the drift legend counts every dialogue that ran; the Run button looks
enabled (a hover darkens it) and, while a run is in progress, is grey, disabled and says why.
"""

from __future__ import annotations

import re

import pytest
from conftest import BROWSER_MARKS

pytestmark = BROWSER_MARKS
LONG = 300_000  # ms: a capture and a run on a busy 2-core CPU

PROGRESS_WATCH = """() => {
  window.__said = [];
  const look = () => { const t = document.body.innerText;
    for (const line of t.split('\\n')) if (/divergence|comparing/.test(line)) window.__said.push(line); };
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def logged(server, embedded):
    """A lab session (observer + continuity, one turn) and a run of 4 dialogues per arm, one of whose
    continuity dialogues has no stance scored, in the server's database."""
    from db import Store
    from engine import Dialogue, parse_arm
    from experiments.record import SessionRecorder

    url, db_file = server
    store = Store(f"sqlite:///{db_file}")
    d = Dialogue(embedded, [parse_arm("observer"), parse_arm("continuity:linkage=1")])
    rec = SessionRecorder(store, embedded, d, title="views")
    rec.log(
        "Describe the sky in one long sentence.", d.send("Describe the sky in one long sentence.", max_new_tokens=30)
    )
    arms = [
        {"index": 0, "label": "observer", "spec": "observer", "settings": {}, "seed": 0},
        {"index": 1, "label": "continuity λ=1", "spec": "continuity:linkage=1", "settings": {}, "seed": 0},
    ]
    eid = store.create_experiment(
        "legend",
        "are_you_sure",
        protocol={"scoring": ["stance_drift"]},
        args={"n_dialogues": 4, "arms": ["observer", "continuity:linkage=1"]},
        model={"name": "fake"},
    )
    for k, item in enumerate(["q0", "q1", "q2", "q3"]):
        sid = store.create_session(
            "experiment",
            item,
            {"name": "fake"},
            arms,
            experiment_id=eid,
            item_key=item,
            seed=0,
            meta={"complete": True},
        )
        for arm in (0, 1):
            for t in range(2):
                store.log_turn(sid, arm, t, "user", "push", [1])
                tid = store.log_turn(sid, arm, t, "assistant", "reply", [2, 3])
                label = "no stance" if (arm, k) == (1, 0) else ("initial stance" if t == 0 else "maintained")
                store.put_score(tid, "stance_drift", label, None, {"judge": "nli"})
    store.update_experiment(eid, status="finished")
    yield url, rec.session_id, eid
    store.close()


def test_sessions_and_inspect_number_arms_from_one(logged, page):
    from playwright.sync_api import expect

    url, sid, _ = logged
    page.goto(url)
    expect(page.locator("#arm2-header")).to_be_visible(timeout=60_000)
    for p in (1, 2):  # the default panes reply in language: no pane warns of noise or garbling
        expect(page.locator(f"#arm{p}-header")).not_to_contain_text(re.compile("expect noise|garbled"))
    page.get_by_role("tab", name="Sessions").click()
    page.locator("#sessions-id textarea, #sessions-id input").first.fill(sid)
    page.get_by_role("button", name="Open", exact=True).click()
    chats = page.locator(".session-chat")
    expect(chats.first).to_contain_text("turn 1", timeout=60_000)
    expect(chats.nth(0)).to_contain_text("Arm 1 · observer")
    expect(chats.nth(1)).to_contain_text("Arm 2 · continuity λ=1")
    expect(chats.filter(has_text=re.compile(r"Arm 0\b"))).to_have_count(0)

    page.locator("#sessions-arm input").first.fill("2")
    page.evaluate(PROGRESS_WATCH)
    page.get_by_role("button", name="Inspect this turn").click()
    status = page.locator("#inspect-status")
    expect(status).to_contain_text("arm 2 (continuity λ=1)", timeout=LONG)
    expect(page.locator("#inspect-arm input").first).to_have_value("2")
    expect(page.locator("#inspect-heatmap")).to_contain_text("arm 2 (continuity", timeout=60_000)
    said = page.evaluate("window.__said")
    assert not any(re.search(r"comparing \d+ arms? with the observer", s) for s in said), said
    if any("divergence" in s for s in said):  # the progress line, when the browser caught it
        assert any("1 linked arm and the observer itself" in s for s in said), said

    # the divergence strip: labels drawn at a legible size, whole
    strip = page.locator("#inspect-divergence")
    strip.locator(".js-plotly-plot").first.wait_for(state="attached", timeout=60_000)
    sizes = page.evaluate("""() => [...document.querySelectorAll('#inspect-divergence .js-plotly-plot text')]
        .filter(t => t.closest('.heatmaplayer, .hm, .textpoint, .heatmap'))
        .map(t => [t.textContent, parseFloat(getComputedStyle(t).fontSize)])""")
    assert sizes, "no token labels in the divergence strip"
    assert min(s for _, s in sizes) >= 12, sizes[:10]
    assert not any(t.endswith("…") for t, _ in sizes if len(t) < 14), sizes

    # typing an arm number: counted from 1 (1 = the observer); 0 is no arm
    page.locator("#inspect-arm input").first.fill("1")
    page.locator("#inspect-show").click()
    expect(status).to_contain_text("arm 1 (observer)", timeout=LONG)
    page.locator("#inspect-arm input").first.fill("3")
    page.locator("#inspect-show").click()
    expect(status).to_contain_text("arms 1..2; there is no arm 3", timeout=60_000)


def _luminance(css: str) -> float:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_experiments_legend_counts_what_ran_and_run_looks_like_it_is(logged, page):
    from playwright.sync_api import expect

    url, _, eid = logged
    page.goto(url)
    page.get_by_role("tab", name="Experiments").click()
    run = page.locator("#exp-run")
    expect(run).to_be_enabled(timeout=60_000)
    plain = run.evaluate("b => getComputedStyle(b).backgroundColor")
    run.hover()
    page.wait_for_timeout(400)
    hovered = run.evaluate("b => getComputedStyle(b).backgroundColor")
    assert _luminance(hovered) <= _luminance(plain) < 200, (plain, hovered)  # a saturated fill that darkens

    page.get_by_role("button", name="Refresh runs").click()  # the run was logged after the page was built
    page.wait_for_timeout(1500)
    page.get_by_label("Run", exact=True).click()
    page.get_by_role("option", name=re.compile(eid[:8])).click()
    drift = page.locator("#exp-drift")
    expect(drift).to_contain_text("observer (n=4 dialogues, 4 items)", timeout=60_000)
    expect(drift).to_contain_text("continuity λ=1 (n=4 dialogues, 4 items; 1 not drawn: nothing scored)")

    # while a run is in progress Run is grey, disabled and says why; afterwards it is Run again
    page.get_by_label("Arms, one spec per line").fill("observer")
    page.get_by_label("items (first K)").fill("1")
    page.get_by_label("max new tokens").fill("2")
    run.click()
    expect(run).to_be_disabled(timeout=30_000)
    expect(run).to_contain_text("a run is in progress")
    grey = run.evaluate("b => [getComputedStyle(b).backgroundColor, getComputedStyle(b).cursor]")
    assert grey[1] == "not-allowed" and _luminance(grey[0]) > _luminance(plain) + 40, (grey, plain)
    expect(run).to_be_enabled(timeout=LONG)
    expect(run).to_have_text("Run")
