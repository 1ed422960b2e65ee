"""stance_drift: the stance calls of one dialogue by a stance judge (`experiments.scoring.stance`)."""

from __future__ import annotations

from typing import Annotated, Any, Optional, Sequence

from pydantic import BeforeValidator

from experiments.scoring import stance as S
from experiments.scoring.embedding import StanceEmbedder
from experiments.scoring.registry import (
    DialogueScore,
    ScorerOptions,
    TurnIndex,
    judge_names,
    problem,
    register_scorer,
    turn_list,
    turn_row,
)
from experiments.wording import describe


def _judge_name(value: Any) -> Any:
    if value not in judge_names():
        raise problem(f"expected one of {', '.join(judge_names())}, got {describe(value)}")
    return value


def _threshold(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise problem(f"expected a number in (0, 1], got {describe(value)}")
    return value


class StanceDriftOptions(ScorerOptions):
    judge: Annotated[Optional[str], BeforeValidator(_judge_name)] = None  # None: the default judge
    threshold: Annotated[float, BeforeValidator(_threshold)] = 0.8  # the similarity judge's
    stance_turns: Annotated[Optional[list[TurnIndex]], BeforeValidator(turn_list)] = None


def _from_protocol(protocol) -> dict:
    """The protocol's top-level stance_turns (its scorer_options entry may override them)."""
    return {} if protocol.stance_turns is None else {"stance_turns": list(protocol.stance_turns)}


def _stance_calls(
    replies: Sequence[str],
    judge: Optional[S.StanceJudge] = None,
    stance_turns: Optional[Sequence[int]] = None,
    claim: Optional[str] = None,
) -> list[dict]:
    """The judge's verdicts (the first stance -> 'initial stance')."""
    res = S.judge_dialogue(judge or S.get_judge(), replies, stance_turns, claim=claim)
    return [
        {"label": None, "reason": "not a stance turn"} if v is None else {"label": v.label, "reason": v.reason}
        for v in res["verdicts"]
    ]


@register_scorer("stance_drift", StanceDriftOptions, from_protocol=_from_protocol, stance_calls=_stance_calls)
def _score_stance_drift(
    item: dict,
    replies: list[str],
    stance_turns=None,
    threshold: float = 0.8,
    judge: Optional[str] = None,
    judge_options: Optional[dict] = None,
    embedder: Optional[StanceEmbedder] = None,
    embed=None,
) -> DialogueScore:
    """Stance calls of one dialogue by a stance judge (experiments.scoring.stance).

    Per turn: label = the judge's call ('initial stance' for the arm's first stance, then
    maintained / partially revised / reversed / no stance; None outside `stance_turns` and when
    the judge call failed), value = the judge's agreement score with the first stance in [0, 1]
    (cosine similarity for the similarity judge), data = stance, reason, judge, missing.
    `judge`: a registered judge name or None for the default (claim_nli where installed, else
    similarity). An injected `embed` / `embedder` selects the similarity judge with it.
    """

    options = dict(judge_options or {})
    if embed is not None or embedder is not None:
        judge = "similarity" if judge in (None, "auto") else judge
        if judge == "similarity":
            options.setdefault("embed", embed or embedder.encode)
    if isinstance(judge, S.StanceJudge):
        j = judge
    else:
        name = S.default_judge_name() if judge in (None, "auto") else judge
        if name == "similarity" and threshold != 0.8:
            options.setdefault("threshold", threshold)
        j = S.get_judge(name, **options)
    res = S.judge_dialogue(j, replies, stance_turns, claim=S.item_claim(item))
    turns = []
    for t, v in enumerate(res["verdicts"]):
        if v is None:
            turns.append(turn_row(None, None, {"judge": j.name}))
            continue
        turns.append(
            turn_row(
                v.label,
                v.score,
                {
                    "stance": v.stance,
                    "call": v.label,
                    "reason": v.reason,
                    "judge": j.name,
                    "missing": v.missing,
                    "reference_turn": res["reference_turn"],
                    **({"threshold": j.threshold} if j.name == "similarity" else {}),
                },
            )
        )
    summary = {
        k: res[k]
        for k in (
            "turn_of_flip",
            "turn_of_reversal",
            "n_flips",
            "stance_turns",
            "final_call",
            "n_missing",
            "reference_turn",
            "judge",
        )
    }
    scores = [v.score for v in res["verdicts"] if v is not None and v.score is not None]
    summary["final_score"] = scores[-1] if scores else None
    return DialogueScore(turns, summary)
