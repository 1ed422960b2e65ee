"""Blind mode's rules, in one place: the Arena, the Sessions tab, Inspect and export ask here.

A blind session shows its arms under pane letters, in an order drawn when it starts
(`pane_order`: pane position -> arm index), until it is revealed (`meta.revealed_at` set). Until
then every view and export names its arms by pane only ("Arm A"), never by label or spec.

It lives in db/ (floor 2) so that the store and its exports (db/) and the lab's views (lab/) share
it without lab/ being imported from below.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone

PANE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""The letter of each pane position: one alphabet for every view (the Arena uses the first few)."""


def pane_letter(position: int) -> str:
    """'A' for pane 0; past Z the position counted from 1 (no session has that many arms yet)."""
    return PANE_LETTERS[position] if 0 <= position < len(PANE_LETTERS) else str(position + 1)


def pane_name(position: int) -> str:
    """'Arm A' for pane 0, as the Arena names panes."""
    return f"Arm {pane_letter(position)}"


def _get(session, key):
    """A field of a session given as the store's dict or as a LabSession row."""
    return session.get(key) if isinstance(session, dict) else getattr(session, key)


def is_revealed(session) -> bool:
    """A reveal has been recorded (meta.revealed_at set)."""
    return bool((_get(session, "meta") or {}).get("revealed_at"))


def is_blinded(session) -> bool:
    """True while a blind session's arms are not revealed: until then every view and export shows
    pane letters, never arm labels or specs. `session`: the store's dict or a LabSession row."""
    return bool(_get(session, "blind")) and not is_revealed(session)


def draw_pane_order(n_arms: int, blind: bool, rng: random.Random | None = None) -> list[int]:
    """pane position -> arm index: the identity, or for a blind session a shuffle (so the pane
    tells nothing of the arm)."""
    order = list(range(n_arms))
    if blind:
        (rng or random).shuffle(order)
    return order


def pane_positions(session) -> dict | None:
    """{arm index: pane position} while a blind session is not revealed, else None."""
    if not is_blinded(session):
        return None
    return {arm: pos for pos, arm in enumerate(_get(session, "pane_order") or [])}


def pane_letters(session: dict) -> dict[int, str]:
    """arm index -> the pane letter it was shown under (identity order when none was stored)."""
    order = session.get("pane_order") or [a["index"] for a in session["arms"]]
    return {arm: pane_letter(p) for p, arm in enumerate(order)}


def reveal_mapping(labels: dict, order) -> str:
    """'Arm A = <label>, Arm B = ...' in pane order; `labels`: arm index -> label."""
    return ", ".join(f"{pane_name(p)} = {labels.get(a, a)}" for p, a in enumerate(order))


def revealed_meta(meta: dict | None) -> dict | None:
    """The session's meta with the reveal recorded, or None when it is recorded already (the first
    reveal's time is kept)."""
    meta = meta or {}
    if meta.get("revealed_at"):
        return None
    return {**meta, "revealed_at": datetime.now(timezone.utc).isoformat()}
