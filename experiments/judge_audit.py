"""Judge-bias checks: where a stance judge's agreement with hand labels departs from its overall figure.

LLM judges are known to favour the longer answer or the first of two, and to change their call
when the two sides swap (FastChat's judge studies). A stance judge can carry the same biases, so
`audit` measures, next to the overall agreement, each of these on a labelled file (the format of
data/stance_labels, see GUIDE.md there):

- **length**: agreement in the shortest, middle and longest third of the labelled replies (words);
- **order**: each (first stance, reply) pair judged again with the sides swapped (the reply as
  the first stance). The human label of a swapped pair is the same (a reversal is a reversal both
  ways; a qualification read backwards is still a partial change). Reported: agreement as labelled,
  agreement swapped, and how often the call changes with the order;
- **paraphrase**: replies labelled `maintained` that say it in other words (they share under a
  third of their content words with the first stance, or the line's category is `paraphrase`);
- **no stance**: replies labelled `no stance` (does the judge see a stance where a person saw none?),
  and the converse: stance-bearing replies the judge called `no stance`.

Every figure is a proportion with a Wilson 95% interval (scipy), so a small group reads as the
uncertain estimate it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from experiments.scoring import stance_calls
from experiments.scoring.stance import MAINTAINED, NO_STANCE, PARTIAL, REVERSED, StanceJudge, content_words, item_claim

PARAPHRASE_OVERLAP = 1 / 3  # below this share of shared content words a kept stance is "in other words"


@dataclass
class Rate:
    """k of n, with its Wilson 95% interval."""

    k: int
    n: int

    @property
    def value(self) -> Optional[float]:
        return self.k / self.n if self.n else None

    def interval(self) -> tuple[Optional[float], Optional[float]]:
        if not self.n:
            return None, None
        from scipy.stats import binomtest

        ci = binomtest(self.k, self.n).proportion_ci(confidence_level=0.95, method="wilson")
        return float(ci.low), float(ci.high)

    def to_dict(self) -> dict:
        low, high = self.interval()
        return {"k": self.k, "n": self.n, "value": self.value, "ci_low": low, "ci_high": high}


def _rate(flags: Sequence[bool]) -> Rate:
    return Rate(int(sum(flags)), len(flags))


def _overlap(a: str, b: str) -> float:
    wa, wb = content_words(a), content_words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


def labelled_replies(rows: Sequence[dict], judge: StanceJudge) -> list[dict]:
    """One record per labelled reply: its text, the human label, the judge's call in the dialogue,
    and the human reference (the first unlabelled turn before it: the first stance as labelled)."""
    out = []
    for row in rows:
        labels = row["labels"] or [None] * len(row["turns"])
        calls = stance_calls("stance_drift", row["turns"], judge=judge, claim=item_claim(row))
        reference = next((t for t, h in enumerate(labels) if h is None), None)
        for t, (text, human, call) in enumerate(zip(row["turns"], labels, calls)):
            if human is None:
                continue
            out.append(
                {
                    "id": row.get("id", f"line {row['line']}"),
                    "turn": t,
                    "text": text,
                    "human": human,
                    "call": call["label"],
                    "reason": call["reason"],
                    "category": row.get("category"),
                    "reference": row["turns"][reference] if reference is not None and reference < t else None,
                    "words": len(text.split()),
                    "claim": item_claim(row),
                }
            )
    return out


def audit(rows: Sequence[dict], judge: StanceJudge) -> dict:
    """The bias checks on labelled dialogues (`stance.read_labelled` rows); JSON-able."""
    replies = labelled_replies(rows, judge)
    if not replies:
        raise ValueError("the file has no labelled replies to audit")
    groups: dict[str, dict] = {}

    def add(name: str, flags: Sequence[bool], note: str = "") -> None:
        groups[name] = {**_rate(flags).to_dict(), "note": note}

    add("overall", [r["human"] == r["call"] for r in replies])
    reversed_ = [r for r in replies if r["human"] == REVERSED]
    add("reversals caught", [r["call"] == REVERSED for r in reversed_])

    ordered = sorted(replies, key=lambda r: r["words"])
    n = len(ordered)
    cuts = [0, n // 3, (2 * n) // 3, n]
    for name, (a, b) in zip(("short", "middle", "long"), zip(cuts, cuts[1:])):
        part = ordered[a:b]
        span = f"{part[0]['words']}-{part[-1]['words']} words" if part else "none"
        add(f"length: {name} third", [r["human"] == r["call"] for r in part], span)

    pairs = [r for r in replies if r["reference"] is not None and r["human"] in (MAINTAINED, PARTIAL, REVERSED)]
    as_labelled, swapped, changed = [], [], []
    for r in pairs:
        bound = judge.for_claim(r["claim"])
        forward = bound.judge(r["reference"], r["text"]).label
        backward = bound.judge(r["text"], r["reference"]).label
        as_labelled.append(forward == r["human"])
        swapped.append(backward == r["human"])
        changed.append(forward != backward)
    add("order: as labelled (pair alone)", as_labelled, "first stance, then the reply")
    add("order: swapped", swapped, "the reply judged as the first stance")
    add("order: call changes when swapped", changed, "lower is better")

    para = [
        r
        for r in replies
        if r["human"] == MAINTAINED
        and r["reference"] is not None
        and (r["category"] == "paraphrase" or _overlap(r["reference"], r["text"]) < PARAPHRASE_OVERLAP)
    ]
    add(
        "paraphrase (kept, other words)",
        [r["call"] == MAINTAINED for r in para],
        f"maintained with < {PARAPHRASE_OVERLAP:.2f} shared content words",
    )
    add("no stance (human)", [r["call"] == NO_STANCE for r in replies if r["human"] == NO_STANCE])
    stance_bearing = [r for r in replies if r["human"] in (MAINTAINED, PARTIAL, REVERSED)]
    add("stance replies called no stance", [r["call"] == NO_STANCE for r in stance_bearing], "lower is better")
    return {"judge": judge.name, "n_dialogues": len(rows), "n_labelled": len(replies), "groups": groups}


def format_audit(result: dict, files: Sequence[str] = ()) -> str:
    """The audit as a plain-text table, every group beside the overall figure."""
    pct = lambda x: "   –  " if x is None else f"{100 * x:5.1f}%"  # noqa: E731
    overall = result["groups"]["overall"]
    head = (
        f"judge-audit judge={result['judge']}"
        + (f" file={', '.join(files)}" if files else "")
        + f": {result['n_labelled']} labelled replies in {result['n_dialogues']} dialogues"
    )
    lines = [head, f"{'check':36s} {'n':>4s}  {'rate':>6s}  {'95% CI':15s}  {'vs overall':>10s}  note"]
    for name, g in result["groups"].items():
        ci = "" if g["ci_low"] is None else f"[{100 * g['ci_low']:.0f}, {100 * g['ci_high']:.0f}]%"
        diff = ""
        if (
            g["value"] is not None
            and name not in ("overall", "reversals caught")
            and "lower is better" not in g["note"]
        ):
            diff = f"{100 * (g['value'] - overall['value']):+.1f} pts"
        lines.append(f"{name:36s} {g['n']:4d}  {pct(g['value'])}  {ci:15s}  {diff:>10s}  {g['note']}")
    return "\n".join(lines)
