"""Dialogue behaviour: per-arm stop while streaming, refusals that change nothing, turn plumbing."""

from __future__ import annotations

import pytest

from engine import Dialogue, DialogueError, parse_arm
from engine.mechanisms.base import ROLE_CODE


def test_stopping_one_arm_lets_the_others_finish(tiny_llama):
    d = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("continuity:linkage=1")])
    d.eos_ids = set()  # random weights: make the length deterministic
    seen_after_stop = []
    for ev in d.stream("Tell me a story.", max_new_tokens=12):
        if ev.step == 3:
            d.stop_arm(0)
        if ev.step > 4:
            seen_after_stop.append(ev.done[0])
        if ev.replies:
            replies = ev.replies
    assert replies[0].finish_reason == "stopped" and len(replies[0].token_ids) == 3
    assert replies[1].finish_reason == "length" and len(replies[1].token_ids) == 12
    assert all(seen_after_stop)
    # the next turn works for both arms
    nxt = d.send("Go on.", max_new_tokens=4)
    assert [len(r.token_ids) for r in nxt] == [4, 4]


def test_refusals_change_nothing(tiny_llama):
    d = Dialogue(tiny_llama, [parse_arm("observer")])
    d.send("Hello", max_new_tokens=3)
    before = (list(d.arms[0].token_ids), d.turn, d.mask.shape)
    for bad, message in [
        ("", "empty"),
        ("   \n ", "empty"),
        ("x" * 20_001, "limit"),
        ("word " * 3000, "too long for the model's context"),
    ]:
        with pytest.raises(DialogueError, match=message):
            d.send(bad, max_new_tokens=3)
        assert (list(d.arms[0].token_ids), d.turn, d.mask.shape) == before
    assert len(d.send("Still here?", max_new_tokens=3)[0].token_ids) == 3


def test_turn_pieces_label_roles(embedded):
    d = Dialogue(embedded, [parse_arm("observer")], system="Be brief.")
    d.send("What is two plus two?", max_new_tokens=5)
    d.send("And three plus three?", max_new_tokens=5)
    arm = d.arms[0]
    text = lambda role, turn: embedded.tokenizer.decode(
        [t for t, r, k in zip(arm.token_ids, arm.roles, arm.turns) if r == ROLE_CODE[role] and k == turn]
    )
    assert text("system", 0) == "Be brief."
    assert text("user", 0) == "What is two plus two?"
    assert text("user", 1) == "And three plus three?"


def test_transcript_matches_template_exactly(embedded):
    """Built incrementally, the token sequence equals the template rendering of the whole dialogue."""
    d = Dialogue(embedded, [parse_arm("observer")])
    d.send("Name a fruit.", max_new_tokens=20)
    d.send("Another one?", max_new_tokens=20)
    arm = d.arms[0]
    assert arm.replies[0].finish_reason == "eos"
    rendered = embedded.tokenizer.apply_chat_template(arm.messages[:-1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(arm.token_ids) - (len(arm.replies[1].token_ids) - 1)
    assert embedded.tokenizer.decode(arm.token_ids[:n_prompt]) == rendered


def test_reply_tokens_belong_to_their_turn(tiny_llama):
    d = Dialogue(tiny_llama, [parse_arm("observer")])
    d.eos_ids = set()
    d.send("One", max_new_tokens=4)
    start = d.arms[0].length - 3  # reply 0 is the last 3 fed tokens + 1 pending
    d.send("Two", max_new_tokens=4)
    arm = d.arms[0]
    assert arm.turns[start : start + 4] == [0, 0, 0, 0]  # incl. its last token, fed at the start of turn 1
    assert arm.roles[start + 3] == ROLE_CODE["assistant"] and arm.turns[start + 4] == 1


def test_failed_turn_restores_state_and_leaves_nothing_to_undo(tiny_llama):
    d = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("continuity:linkage=1")])
    d.send("Hello", max_new_tokens=4)
    before = [(list(a.token_ids), list(a.pending), a.mechanism and a.mechanism.memory_size()) for a in d.arms]
    mech = d.arms[1].mechanism
    calls = {"n": 0}
    real_forward = mech.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("boom")
        return real_forward(*args, **kwargs)

    mech.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        d.send("Again", max_new_tokens=8)
    mech.forward = real_forward
    after = [(list(a.token_ids), list(a.pending), a.mechanism and a.mechanism.memory_size()) for a in d.arms]
    assert after == before and d.turn == 1
    with pytest.raises(DialogueError, match="no turn to undo"):
        d.rollback()
    assert len(d.send("Again", max_new_tokens=3)) == 2
