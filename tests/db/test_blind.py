"""Blind mode's rules (db/blind.py), the one module the Arena, Sessions, Inspect and export ask.

Plain functions over the store's session dicts (and LabSession-like rows): no model, no Gradio.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from db.blind import (
    PANE_LETTERS,
    draw_pane_order,
    is_blinded,
    is_revealed,
    pane_letter,
    pane_letters,
    pane_name,
    pane_positions,
    reveal_mapping,
    revealed_meta,
)

BLIND = {"blind": True, "meta": {}, "pane_order": [2, 0, 1], "arms": [{"index": i} for i in range(3)]}


def test_one_alphabet_for_every_view():
    assert [pane_letter(p) for p in range(4)] == list("ABCD") == list(PANE_LETTERS[:4])
    assert pane_name(0) == "Arm A" and pane_name(25) == "Arm Z" and pane_name(26) == "Arm 27"


def test_blinded_until_a_reveal_is_recorded_on_dicts_and_rows():
    assert is_blinded(BLIND) and not is_revealed(BLIND)
    revealed = {**BLIND, "meta": {"revealed_at": "2026-12-01T00:00:00+00:00"}}
    assert not is_blinded(revealed) and is_revealed(revealed)
    assert not is_blinded({**BLIND, "blind": False})
    row = SimpleNamespace(blind=True, meta=None, pane_order=[1, 0])  # a LabSession row
    assert is_blinded(row) and pane_positions(row) == {1: 0, 0: 1}


def test_pane_positions_and_letters_follow_the_stored_order():
    assert pane_positions(BLIND) == {2: 0, 0: 1, 1: 2}
    assert pane_letters(BLIND) == {2: "A", 0: "B", 1: "C"}
    assert pane_positions({**BLIND, "blind": False}) is None
    assert pane_letters({"arms": [{"index": 0}, {"index": 1}]}) == {0: "A", 1: "B"}  # no order stored


def test_draw_pane_order_shuffles_only_blind_sessions():
    assert draw_pane_order(4, False, random.Random(0)) == [0, 1, 2, 3]
    orders = {tuple(draw_pane_order(4, True, random.Random(seed))) for seed in range(20)}
    assert len(orders) > 1 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert draw_pane_order(3, True, random.Random(5)) == draw_pane_order(3, True, random.Random(5))


def test_reveal_mapping_and_the_first_reveal_time_is_kept():
    assert reveal_mapping({0: "observer", 1: "continuity"}, [1, 0]) == "Arm A = continuity, Arm B = observer"
    meta = revealed_meta({"note": "x"})
    assert meta["note"] == "x" and meta["revealed_at"]
    assert revealed_meta(meta) is None and revealed_meta(None)["revealed_at"]
