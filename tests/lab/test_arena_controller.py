"""The Arena's session logic without Gradio: the real embedded model, a real SQLite file.

Start, stream and log a turn; a refused first message leaves no session; a locked database at the
first message is retried on the next; blind shuffle and reveal; regenerate with rollback; labels
progress; and reopening a logged session continues it with the tokens it would have produced.
"""

from __future__ import annotations

import random
import sqlite3

import pytest

from db import Store
from engine import parse_arm
from lab.arena_controller import ArenaError, ArenaSession, TurnOutcome, check_message, parse_window

pytestmark = pytest.mark.slow
SPECS = ["observer:max_new_tokens=3", "continuity:linkage=1,max_new_tokens=3"]


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'lab.db'}", busy_timeout=0.3)
    yield s
    s.close()


def run(ctl: ArenaSession, message: str, regenerate: bool = False) -> tuple[list, TurnOutcome]:
    events = list(ctl.regenerate() if regenerate else ctl.run_turn(message))
    assert isinstance(events[-1], TurnOutcome)
    return events[:-1], events[-1]


def started(store, embedded, specs=SPECS, **kw) -> ArenaSession:
    ctl = ArenaSession(store, embedded)
    ctl.start([parse_arm(s) for s in specs], **kw)
    return ctl


def test_turn_logged_regenerate_and_reveal(store, embedded):
    ctl = started(store, embedded, blind=True, rng=random.Random(1), title="t")
    steps, out = run(ctl, "Is the sky green?")
    assert out.kind == "done" and "Turn 1 logged" in out.status, out.status
    assert steps and all(len(e.texts) == 2 for e in steps)
    s = store.get_session(ctl.session_id)
    assert s["blind"] and s["pane_order"] == ctl.order and sorted(ctl.order) == [0, 1]
    assert ctl.hidden and ctl.pane_name(0) == "A"
    first = [r.token_ids for r in ctl.turns[0].replies]
    _, out = run(ctl, "", regenerate=True)  # greedy: the same tokens again, the old rows replaced
    assert out.kind == "done" and [r.token_ids for r in ctl.turns[0].replies] == first
    assert len(store.get_turns(ctl.session_id)) == 4
    fresh = started(store, embedded)
    _, out = run(fresh, "", regenerate=True)
    assert out.kind == "refused" and "send a message first" in out.status
    mapping = ctl.reveal()
    assert "observer" in mapping and "continuity" in mapping and not ctl.hidden
    assert "revealed_at" in store.get_session(ctl.session_id)["meta"]


def test_refused_first_message_creates_no_session(store, embedded):
    ctl = started(store, embedded)
    for message, why in [("x" * 20_001, "20,000"), ("bad \ud800 text", "lone surrogate"), ("   ", "empty")]:
        _, out = run(ctl, message)
        assert out.kind == "refused" and why in out.status and "\n" not in out.status
        assert store.list_sessions() == []
    _, out = run(ctl, "Hello there")  # the settings still stand; the session is titled by this message
    assert out.kind == "done", out.status
    [s] = store.list_sessions()
    assert s["title"] == "Hello there"


def test_locked_database_at_the_first_message_is_retried(store, embedded, tmp_path):
    ctl = started(store, embedded)
    lock = sqlite3.connect(tmp_path / "lab.db", timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        _, out = run(ctl, "First message")
    finally:
        lock.rollback()
        lock.close()
    assert out.kind == "done" and "not logged" in out.status and "locked" in out.status.lower(), out.status
    assert store.list_sessions() == []
    _, out = run(ctl, "Second message")
    assert "Turn 2 logged" in out.status and "1 earlier unlogged turn" in out.status, out.status
    [s] = store.list_sessions()
    turns = store.get_turns(s["id"])
    assert s["title"] == "First message"
    assert sorted({(t["turn_index"], t["arm_index"], t["role"]) for t in turns}) == [
        (k, a, r) for k in (0, 1) for a in (0, 1) for r in ("assistant", "user")
    ]


def test_labels_progress_and_next_unlabelled(store, embedded):
    ctl = started(store, embedded)
    run(ctl, "One")
    run(ctl, "Two")
    assert ctl.label_progress("ana") == (0, 4)
    assert ctl.next_unlabelled("ana") == (0, 0)
    with pytest.raises(ArenaError, match="Annotator"):
        ctl.annotate(0, 0, "  ", "maintained")
    with pytest.raises(ArenaError, match="stance"):
        ctl.annotate(0, 0, "ana", "")
    ctl.annotate(0, 0, "ana", "initial stance")
    ctl.annotate(1, 0, "ana", "maintained", confidence=0.5)
    assert ctl.label_progress("ana") == (2, 4) and ctl.label_progress("bo") == (0, 4)
    assert ctl.next_unlabelled("ana") == (1, 0)
    assert ctl.next_unlabelled("ana", after=(1, 0)) == (1, 1)


def test_resume_continues_the_same_session(store, embedded):
    specs = [
        "observer:max_new_tokens=4",
        "continuity:linkage=1,gain=1,max_new_tokens=4",
        "continuity:linkage=0.5,greedy=false,seed=3,max_new_tokens=4",
    ]
    live = started(store, embedded, specs, blind=True, rng=random.Random(0))
    for m in ("Name a colour.", "Why that one?"):
        assert run(live, m)[1].kind == "done"
    sid = live.session_id
    ctl = ArenaSession.resume(store, embedded, sid)
    assert ctl.session_id == sid and ctl.order == live.order and ctl.blind and ctl.hidden
    assert [[r.token_ids for r in t.replies] for t in ctl.turns] == [
        [r.token_ids for r in t.replies] for t in live.turns
    ]
    expected = [r.token_ids for r in live.dialogue.send("And another?")]  # the live arms, not logged
    _, b = run(ctl, "And another?")
    assert b.kind == "done" and "Turn 3 logged" in b.status, b.status
    assert [r.token_ids for r in ctl.turns[2].replies] == expected
    rows = store.get_turns(sid)
    assert sorted({t["turn_index"] for t in rows}) == [0, 1, 2] and len(rows) == 3 * 3 * 2
    with pytest.raises(ArenaError, match="not found|unknown|no session"):
        ArenaSession.resume(store, embedded, "nope")


def test_window_is_a_session_setting_kept_for_replay_and_continue(store, embedded):
    """The dialogue-level attention window: set at start, stored in the session's meta as the CLI
    stores it, rebuilt by replay and by Continue; bad values are one line and start nothing."""
    from experiments.record import replay_turn

    live = started(store, embedded, window=" 16 ")
    assert live.window == 16
    for m in ("My colour is teal.", "Which?"):
        assert run(live, m)[1].kind == "done"
    view, n = live.dialogue.cache_view(0), live.dialogue.arms[0].length
    assert len(view) <= live.dialogue.sink + 16 < n and view[-1] < n  # older tokens really left the cache
    sid = live.session_id
    meta = store.get_session(sid)["meta"]
    assert meta["window"] == 16 and meta["sink"] == live.dialogue.sink
    assert replay_turn(store, embedded, sid, 1).identical
    assert "attention window 16 tokens" in _sessions_tab(store, embedded).open_fn(sid)[0]
    ctl = ArenaSession.resume(store, embedded, sid)
    assert ctl.window == 16
    expected = [r.token_ids for r in live.dialogue.send("And?")]
    assert run(ctl, "And?")[1].kind == "done"
    assert [r.token_ids for r in ctl.turns[2].replies] == expected
    # a session without a window stays without one
    assert started(store, embedded, window="").window is None
    for bad in ("abc", "0", "-3", "1.5", "2e3", True, 0, 2.5, 10**7):
        ctl = ArenaSession(store, embedded)
        with pytest.raises(ArenaError, match="attention window must be a whole number") as e:
            ctl.start([parse_arm(s) for s in SPECS], window=bad)
        assert "\n" not in str(e.value) and not ctl.started
    assert parse_window(None) is None and parse_window(" 1,024 ") == 1024 and parse_window(64.0) == 64


def test_check_message():
    assert check_message("hi") is None
    assert "empty" in check_message("")
    assert "surrogate" in check_message("a\udfffb")


def _sessions_tab(store, embedded):
    import gradio as gr

    from lab.context import LabContext
    from lab.sessions import build_sessions_tab

    with gr.Blocks():
        return build_sessions_tab(LabContext(store=store, lm=embedded, db_url=store.name))


def test_sessions_tab_counts_labels_as_the_arena_does(store, embedded):
    from lab.context import LabContext
    from lab.sessions import sessions_frame

    ctl = started(store, embedded)
    run(ctl, "One")
    run(ctl, "Two")
    ctl.annotate(0, 0, "ana", "initial stance")
    ctl.annotate(1, 1, "ana", "maintained")
    ctl.annotate(1, 1, "ana", "fully revised")  # a relabel is still one labelled reply
    ctl.annotate(0, 1, "bo", "maintained")
    assert ctl.label_progress("ana") == (2, 4) and ctl.label_progress("bo") == (1, 4)
    tab = _sessions_tab(store, embedded)
    ctx = LabContext(store=store, lm=embedded)
    row = sessions_frame(ctx).set_index("id").loc[ctl.session_id]
    assert row["labelled"] == "ana 2 of 4, bo 1 of 4"
    head = tab.open_fn(ctl.session_id)[0]
    assert "**2 of 4** replies labelled by **ana**" in head and "**1 of 4** replies labelled by **bo**" in head
    assert "attention window" not in head  # full attention: nothing to say
    other = started(store, embedded)
    run(other, "Alone")
    assert sessions_frame(ctx).set_index("id").loc[other.session_id, "labelled"] == "0 of 2"


def test_sessions_tab_reveals_a_blind_session(store, embedded):
    ctl = started(store, embedded, blind=True, rng=random.Random(1))
    run(ctl, "One")
    sid = ctl.session_id
    tab = _sessions_tab(store, embedded)
    out = tab.open_fn(sid)
    head, reveal = out[0], out[-1]
    assert "not revealed" in head and reveal["visible"] is True
    text = "".join(str(x) for x in out)
    assert "observer" not in text and "continuity" not in text
    out = tab.reveal_fn(sid, "all")
    head, reveal, table = out[0], out[-2], out[-1]
    assert "Revealed" in head and "observer" in head and "continuity" in head and reveal["visible"] is False
    assert "revealed_at" in store.get_session(sid)["meta"]
    row = table.set_index("id").loc[sid]
    assert "observer" in row["arms"] and "Arm A" not in row["arms"]
    # the Arena's reveal and this one are the same call: revealing again keeps the first time
    first = store.get_session(sid)["meta"]["revealed_at"]
    assert "Arm A = " in ctl.reveal() and store.get_session(sid)["meta"]["revealed_at"] == first
    plain = started(store, embedded)
    run(plain, "Two")
    import gradio as gr

    with pytest.raises(gr.Error, match="not blind"):
        tab.reveal_fn(plain.session_id, "all")


def test_one_wording_and_one_numbering_for_every_view():
    from lab.arena_controller import STOP_REASONS, settings_refusal, stop_reason_text, turn_label

    assert [stop_reason_text(k) for k in ("eos", "length", "stopped")] == list(STOP_REASONS.values())
    assert stop_reason_text("length") == "hit the token limit" and stop_reason_text(None) == ""
    assert turn_label(0) == "turn 1"  # the stored index stays 0-based
    line = settings_refusal({1: "continuity: linkage: input should be less than or equal to 1 (got 7)"})
    assert line.startswith("Not sent: arm 2 · continuity: linkage") and "\n" not in line
    assert "arm B" in settings_refusal({1: "x"}, lambda p: "AB"[p])
    assert settings_refusal({"session": "the title is too long"}) == "Not sent: the title is too long"


def _settings(n=2, panes=SPECS, **kw):
    from lab.arena_controller import SessionSettings

    return SessionSettings(n, lambda p: parse_arm(panes[p]) if p < len(panes) else "no such pane", **kw)


def test_open_checks_the_settings_in_the_order_the_page_shows_them(store, embedded):
    ctl = ArenaSession(store, embedded)
    assert "title" in ctl.open(_settings(title="x" * 10_000))["session"]
    assert "attention window" in ctl.open(_settings(window="soon"))["session"]
    assert ctl.open(_settings(n="two")) == {0: "the number of arms must be 2 to 4, not 'two'"}
    assert ctl.open(_settings(n=5)) == {0: "the number of arms must be 2 to 4, not 5"}
    assert ctl.open(_settings(n=3)) == {2: "no such pane"} and not ctl.started
    assert ctl.open(_settings(blind=True, window="64")) == {} and ctl.started and ctl.blind and ctl.window == 64
    assert ctl.open(_settings()) == {0: "a session is already running; press New session first"}


def test_an_arm_whose_weights_do_not_fit_is_named_by_its_own_pane(store, embedded, tmp_path):
    """A weights file that does not fit its pane's settings is that pane's error, not arm 1's (the
    browser said 'arm 1' for the second pane's file)."""
    from engine.distill import distill

    doc = tmp_path / "doc.safetensors"
    distill(embedded, "Orla Vennick lives in Tarrowby.", "memory_bank:layers=12/16", out=doc)
    ctl = ArenaSession(store, embedded)
    errors = ctl.open(_settings(panes=["observer", f'memory_bank:weights="{doc}",layers=12']))
    assert list(errors) == [1] and "does not fit" in errors[1] and not ctl.started
    assert ctl.open(_settings(panes=["observer", f'memory_bank:weights="{doc}"'])) == {} and ctl.started


def test_one_busy_check_under_a_lock_and_one_wording(store, embedded):
    import threading

    from lab.arena_controller import BUSY, Accepted, SettingsRefused

    ctl = ArenaSession(store, embedded)
    claims, gate = [], threading.Barrier(8)

    def claim():
        gate.wait()
        claims.append(ctl._claim())

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims) == [False] * 7 + [True] and ctl.busy
    (busy,) = list(ctl.send("hello", _settings()))
    assert busy.kind == "busy" and busy.status.startswith(f"⚠ {BUSY}") and not ctl.started  # nothing started
    with pytest.raises(ArenaError, match="already running in this tab"):
        ctl.reopen("anything")
    ctl.busy = False
    (bad,) = list(ctl.send("hello", _settings(n=9)))
    assert isinstance(bad, SettingsRefused) and bad.errors == {0: "the number of arms must be 2 to 4, not 9"}
    assert not ctl.busy  # a refusal releases the tab
    events = list(ctl.send("Is the sky green?", _settings()))
    assert isinstance(events[0], Accepted) and events[-1].kind == "done" and not ctl.busy
    ctl.busy = True
    assert list(ctl.run_turn("again"))[-1].status == f"⚠ {BUSY}"  # the same words from Regenerate's path
    ctl.busy = False


def test_reopen_replaces_the_conversation_only_once_rebuilt(store, embedded):
    live = started(store, embedded, blind=True, rng=random.Random(2))
    assert run(live, "Name a colour.")[1].kind == "done"
    tab = started(store, embedded)
    assert run(tab, "Something else.")[1].kind == "done"
    before = tab.session_id
    with pytest.raises(ArenaError):
        tab.reopen("nope")
    assert tab.session_id == before and len(tab.turns) == 1 and not tab.busy  # a refusal changes nothing
    tab.reopen(live.session_id)
    assert tab.session_id == live.session_id and tab.order == live.order and tab.hidden and tab.resumed
    assert [r.token_ids for r in tab.turns[0].replies] == [r.token_ids for r in live.turns[0].replies]
    assert not tab.busy and not tab.can_rollback
    assert run(tab, "Why that one?")[1].kind == "done"
    assert len(store.get_turns(live.session_id)) == 2 * 2 * 2
