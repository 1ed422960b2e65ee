"""answer_match: does a reply give the expected answer (its text, an alias, or the right letter)?"""

from __future__ import annotations

from typing import Optional

from experiments.scoring.registry import DialogueScore, register_scorer, turn_row
from experiments.scoring.text import choice_letters, choice_texts, extract_letter, normalise_answer
from experiments.wording import describe


def answer_match(reply: Optional[str], answer, choices: Optional[str] = None, aliases: Optional[str] = None) -> dict:
    """Does a reply give the expected answer?

    It matches when the normalised answer text (or one of the `|`-separated `aliases`) occurs in
    the normalised reply as whole words ("rio blanco" in "it is rio blanco now", but "10" not in
    "100"), or, for an item with `choices`, when the letter the reply commits to
    (`extract_letter`) is the correct one. The answer may be given as the option text or as its
    letter: with choices "A) Paris\nB) Rome", answer "B" and answer "Rome" both accept "Rome"
    and "The answer is B". `by` says which rule matched ('text' or 'letter'; None when none).
    """
    letters = choice_letters(choices)
    options = choice_texts(choices)
    answer_text = str(answer).strip()
    correct_letter = None
    if len(answer_text) == 1 and answer_text.upper() in letters:
        correct_letter = answer_text.upper()
        answer_text = options.get(correct_letter, "")
    elif options:
        correct_letter = next(
            (l for l, t in options.items() if normalise_answer(t) == normalise_answer(answer_text)), None
        )
    targets = [normalise_answer(t) for t in [answer_text, *str(aliases or "").split("|")]]
    targets = [t for t in dict.fromkeys(targets) if t]
    padded = f" {normalise_answer(reply)} "
    letter = extract_letter(reply, letters) if letters else None
    by = None
    if any(f" {t} " in padded for t in targets):
        by = "text"
    elif correct_letter is not None and letter == correct_letter:
        by = "letter"
    return {"matched": by is not None, "by": by, "letter": letter, "targets": targets, "correct_letter": correct_letter}


def _item_problems(items: list, where) -> list[tuple[str, str]]:
    """answer_match needs a non-empty `answer` (text, number, or a choice letter)."""
    problems = []
    for i, item in enumerate(items):
        answer = item.get("answer")
        if answer is None or isinstance(answer, bool) or not str(answer).strip():
            problems.append(
                (
                    where(i, ".answer"),
                    "required by scorer answer_match; expected the answer text "
                    f"(or a choice letter), got {describe(answer)}",
                )
            )
    return problems


@register_scorer("answer_match", item_problems=_item_problems)
def _score_answer_match(item: dict, replies: list[str]) -> DialogueScore:
    results = [answer_match(r, item["answer"], item.get("choices"), item.get("aliases")) for r in replies]
    turns = [
        turn_row("match" if r["matched"] else "no_match", r["matched"], {k: r[k] for k in ("matched", "by", "letter")})
        for r in results
    ]
    matched = [r["matched"] for r in results]
    return DialogueScore(
        turns,
        {
            "answer": str(item["answer"]),
            "targets": results[0]["targets"] if results else [],
            "matched": matched,
            "match_first": matched[0] if matched else None,
            "match_final": matched[-1] if matched else None,
            "match_any": any(matched),
        },
    )
