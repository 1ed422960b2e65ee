"""source_grounding (seed 003): entity precision against the source and instruction adherence,
over the whole reply and at its start vs its end."""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
from pydantic import PositiveInt

from experiments.scoring.registry import DialogueScore, ScorerOptions, register_scorer, turn_row


class SourceGroundingOptions(ScorerOptions):
    n_words: PositiveInt = 60  # the length of the reply's start and end segments


_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*|[\"'(\[]\s*)$")


def entities(text: Optional[str]) -> list[str]:
    """Named-entity-like spans of a text, lower-cased: runs of capitalised words that do not merely
    open a sentence, and numbers (the seed's entity-precision units, re-implemented without a tagger).

    "I met Anna Smith in Lyon in 1999." -> ["anna smith", "lyon", "1999"].
    """
    if not text:
        return []
    found, run = [], []
    for m in _WORD.finditer(text):
        word = m.group(0)
        if word[0].isdigit():
            if run:
                found.append(" ".join(run))
                run = []
            found.append(word.replace(",", ""))
            continue
        capital = word[0].isupper() and word not in ("I", "I'm", "I'd", "I'll", "I've")
        opens_sentence = bool(_SENTENCE_START.search(text[: m.start()]))
        if capital and (run or not opens_sentence):
            run.append(word)
        else:
            if run:
                found.append(" ".join(run))
            run = []
    if run:
        found.append(" ".join(run))
    return [e.lower() for e in found]


def entity_precision(reply: Optional[str], source: Optional[str]) -> Optional[float]:
    """Share of the reply's entities that occur in the source (case-insensitive); None if it names none.

    An entity counts as grounded when the source contains it as a phrase, or contains every word
    of it (so "Lyon" is grounded by "the city of Lyon" and "Anna Smith" by "Smith, Anna").
    """
    ents = entities(reply)
    if not ents:
        return None
    src = (source or "").lower()
    src_words = set(w.lower() for w in _WORD.findall(source or ""))
    grounded = [e in src or all(w in src_words for w in e.split()) for e in ents]
    return float(np.mean(grounded))


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def reply_segments(reply: str, n_words: int = 60) -> tuple[str, str]:
    """The reply's start and end: its first and last `n_words` words (halves when it is shorter
    than 2 x n_words), as character spans of the original text."""
    spans = [m.span() for m in _WORD.finditer(reply or "")]
    if not spans:
        return "", ""
    k = min(n_words, max(1, len(spans) // 2))
    return reply[: spans[k - 1][1]], reply[spans[-k][0] :]


def _word_list(value) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


def adherence(segment: str, item: dict) -> Optional[float]:
    """Share of an item's checkable instructions a stretch of reply keeps; None if it has none.

    Item keys (each optional; word lists as lists or comma-separated strings): `avoid_words` (none
    may appear), `avoid_chars` (none may appear, e.g. "!?"), `keywords` (at least one must appear:
    the reply stays on the source's subject), `no_lists` (true / 1: no line may start with a bullet
    or a number).
    """
    words = set(_words(segment))
    checks = []
    for w in _word_list(item.get("avoid_words")):
        checks.append(str(w).lower() not in words)
    for c in str(item.get("avoid_chars") or ""):
        checks.append(c not in segment)
    keywords = [k.lower() for k in _word_list(item.get("keywords"))]
    if keywords:
        low = segment.lower()
        checks.append(any(k in low for k in keywords))
    if item.get("no_lists"):
        checks.append(not re.search(r"(?m)^\s*(?:[-*•]|\d+[.)])\s", segment))
    return float(np.mean(checks)) if checks else None


def source_text(item: dict, system: Optional[str] = None, first_turn: Optional[str] = None) -> str:
    """The source the reply should stay grounded in: system prompt + first user message, filled."""
    parts = [t.format_map(item) for t in (system, first_turn) if t]
    return "\n".join(parts) if parts else str(item.get("source", ""))


def _from_protocol(protocol) -> dict:
    """The source = the protocol's system prompt + first user message."""
    return {"system": protocol.system, "first_turn": protocol.turns[0]}


@register_scorer("source_grounding", SourceGroundingOptions, from_protocol=_from_protocol)
def _score_source_grounding(
    item: dict, replies: list[str], system: Optional[str] = None, first_turn: Optional[str] = None, n_words: int = 60
) -> DialogueScore:
    """Per reply: entity precision against the source and instruction adherence, over the whole
    reply and at its start vs its end (the first / last `n_words` words)."""
    source = source_text(item, system, first_turn)
    turns = []
    for reply in replies:
        start, end = reply_segments(reply, n_words)
        data = {
            "entity_precision": entity_precision(reply, source),
            "entity_precision_start": entity_precision(start, source),
            "entity_precision_end": entity_precision(end, source),
            "adherence": adherence(reply, item),
            "adherence_start": adherence(start, item),
            "adherence_end": adherence(end, item),
            "n_words": len(_words(reply)),
            "n_entities": len(entities(reply)),
        }
        drift = (
            None
            if data["adherence_start"] is None or data["adherence_end"] is None
            else data["adherence_end"] - data["adherence_start"]
        )
        data["adherence_drift"] = drift
        label = None if drift is None else ("kept" if drift >= 0 else "drifted")
        turns.append(turn_row(label, data["adherence"], data))

    def mean(key):
        vals = [t["data"][key] for t in turns if t["data"][key] is not None]
        return float(np.mean(vals)) if vals else None

    keys = (
        "entity_precision",
        "entity_precision_start",
        "entity_precision_end",
        "adherence",
        "adherence_start",
        "adherence_end",
        "adherence_drift",
    )
    return DialogueScore(turns, {**{k: mean(k) for k in keys}, "n_turns": len(turns), "n_words": n_words})
