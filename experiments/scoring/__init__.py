"""Scorers for protocol dialogues: answer letters and flips, answer matches, concessions, stance
drift, source grounding; and the stance judges behind stance_drift.

One scorer per module, each registering itself with its name and options model
(`registry.register_scorer`); importing this package registers them all, in this order. Everything
is pure text processing except the MiniLM embedder and the NLI / LLM judges, which load their
packaged models lazily on first use (never at import time, never from a hub).

The runner calls one uniform entry point per scorer and dialogue::

    result = score_dialogue("answer_flip", item, assistant_replies)
    result.turns    # one {"label", "value", "data"} dict per assistant turn -> one DB row each
    result.summary  # one JSON-able dict per dialogue
"""

from __future__ import annotations

from typing import Optional, Sequence

# The order of the next imports is the order scorers register (SCORER_NAMES, the lab's lists).
# isort: off
from experiments.scoring.answer_flip import score_answer_flip
from experiments.scoring.stance_drift import StanceDriftOptions
from experiments.scoring.concession import concession
from experiments.scoring.answer_match import answer_match
from experiments.scoring.source_grounding import adherence, entities, entity_precision, reply_segments, source_text

# isort: on
from experiments.scoring.embedding import StanceEmbedder, default_embedder, minilm_model_dir
from experiments.scoring.registry import (
    SCORERS,
    DialogueScore,
    get_scorer,
    judge_names,
    option_problems,
    protocol_options,
    scorer_names,
)
from experiments.scoring.text import choice_letters, choice_texts, extract_letter, first_sentence, normalise_answer

SCORER_NAMES = scorer_names()  # read from the registry: every scorer above, in registration order


def score_dialogue(scorer_name: str, protocol_item: dict, assistant_replies: Sequence[str], **options) -> DialogueScore:
    """Score one dialogue (the assistant replies in turn order) with one named scorer.

    Options per scorer: answer_flip(answer_turns=(0, -1)); stance_drift(stance_turns=None,
    threshold=0.8, judge=None, judge_options=None, embedder=None, embed=None); source_grounding(system,
    first_turn, n_words=60); concession() and answer_match() take none (answer_match reads the item's
    `answer`, optional `choices` and `aliases` "x|y"). A protocol supplies its own with
    `Protocol.scorer_options(name)`.
    """
    return get_scorer(scorer_name).score(protocol_item, list(assistant_replies), **options)


def stance_scorer_names() -> tuple[str, ...]:
    """The scorers that make calls on the judges' scale (`stance_calls`)."""
    return tuple(name for name, spec in SCORERS.items() if spec.stance_calls is not None)


def stance_calls(
    scorer: str,
    replies: Sequence[str],
    judge=None,
    stance_turns: Optional[Sequence[int]] = None,
    claim: Optional[str] = None,
) -> list[dict]:
    """One {"label", "reason"} per reply on the judges' scale, by one scorer (`claim`: the item's,
    for judges that read the question)."""
    spec = SCORERS.get(scorer)
    if spec is None or spec.stance_calls is None:
        raise KeyError(f"scorer {scorer!r} makes no stance calls; use one of: {', '.join(stance_scorer_names())}")
    return spec.stance_calls(replies, judge=judge, stance_turns=stance_turns, claim=claim)


__all__ = [
    "SCORERS",
    "SCORER_NAMES",
    "DialogueScore",
    "StanceEmbedder",
    "adherence",
    "answer_match",
    "choice_letters",
    "choice_texts",
    "concession",
    "default_embedder",
    "entities",
    "entity_precision",
    "extract_letter",
    "first_sentence",
    "get_scorer",
    "judge_names",
    "minilm_model_dir",
    "normalise_answer",
    "option_problems",
    "protocol_options",
    "reply_segments",
    "score_answer_flip",
    "score_dialogue",
    "StanceDriftOptions",
    "scorer_names",
    "source_text",
    "stance_calls",
    "stance_scorer_names",
]
