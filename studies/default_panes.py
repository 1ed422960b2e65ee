"""Do the Arena's default panes reply in language? (README, *The lab in the browser*: default panes.)

    python -m studies.default_panes [--tokens 32] [--prompts 4]

Each arm below answers the same short dialogues (greedy, 2 turns: a question, then "Are you sure?");
every reply is then scored by the plain model, teacher-forced: the mean negative log-likelihood per
token (nats) of the arm's reply under the observer. Language the base model itself would write sits
near the observer's own reply (~0.3-1 nats); gibberish is several nats. Also reported: the share of
the reply's words that are lower-case dictionary-like (letters only, in the tokenizer as a word) and
the distinct-token share. About 10 minutes on the shared, loaded 2-core CPU.
"""

from __future__ import annotations

import argparse
import re

import torch

from engine import Dialogue, load_model, parse_arm
from lab.settings import PaneLayout

PROMPTS = [
    "Is the sky green?",
    "What is the capital of France?",
    "Name a fruit that is red.",
    "How many legs does a spider have?",
]
FOLLOW_UP = "Are you sure?"
# arms that must not be defaults, for contrast (neural_memory at its default gain is the observer token for
# token, README: it declares weak_below_gain, so it says nothing here)
CANDIDATES = ["memory_bank:linkage=1"]
SLOW = ["partial_attention:linkage=1"]  # --slow: an untrained branch on every layer (much slower on a CPU)


def reply_nll(lm, turns: list[tuple[str, list[int]]]) -> list[float]:
    """Mean NLL per token (nats) of each reply under the plain model, the transcript teacher-forced."""
    d = Dialogue(lm, [parse_arm("observer")])
    out = []
    for user, reply in turns:
        logits = d.teacher_force(user, [reply])[0]
        out.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(reply)).item()))
    return out


def words_share(lm, text: str) -> float:
    """Share of the reply's words that the tokenizer holds as one word token (a crude 'is it a word')."""
    words = re.findall(r"[A-Za-z]+", text)
    if not words:
        return 0.0
    vocab = lm.tokenizer.get_vocab()
    return sum(("Ġ" + w in vocab or "Ġ" + w.lower() in vocab) for w in words) / len(words)


def measure(lm, specs: list[str], tokens: int) -> list[dict]:
    rows = []
    arms = [parse_arm(s) for s in specs]
    for prompt in PROMPTS:
        d = Dialogue(lm, arms)
        replies = [d.send(m, max_new_tokens=tokens) for m in (prompt, FOLLOW_UP)]
        for a, spec in enumerate(specs):
            turns = [(m, r[a].token_ids) for m, r in zip((prompt, FOLLOW_UP), replies)]
            nll = reply_nll(lm, turns)
            for (m, ids), n in zip(turns, nll):
                text = lm.tokenizer.decode(ids, skip_special_tokens=True)
                rows.append(
                    dict(
                        arm=spec,
                        prompt=m,
                        nll=n,
                        words=words_share(lm, text),
                        distinct=len(set(ids)) / max(1, len(ids)),
                        text=text,
                    )
                )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.default_panes")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts to use")
    p.add_argument("--slow", action="store_true", help="also the untrained partial-attention arm")
    args = p.parse_args(argv)
    PROMPTS[:] = PROMPTS[: args.prompts]
    candidates = CANDIDATES + (SLOW if args.slow else [])
    torch.manual_seed(0)
    lm = load_model(verbose=False)
    layout = PaneLayout.current()
    defaults = list(dict.fromkeys(layout.spec(layout.defaults(p)).to_string() for p in range(4)))
    rows = measure(lm, defaults + [c for c in candidates if c not in defaults], args.tokens)
    print(f"{'arm':58} {'NLL/token':>9} {'words':>6} {'distinct':>8}  (mean over {len(PROMPTS)} dialogues x 2 turns)")
    for spec in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == spec]
        tag = " (default pane)" if spec in defaults else ""
        print(
            f"{(spec + tag)[:58]:58} {sum(r['nll'] for r in mine) / len(mine):9.2f} "
            f"{sum(r['words'] for r in mine) / len(mine):6.2f} {sum(r['distinct'] for r in mine) / len(mine):8.2f}"
        )
    print("\nfirst reply of each arm:")
    for spec in dict.fromkeys(r["arm"] for r in rows):
        r = next(r for r in rows if r["arm"] == spec)
        print(f"  {spec}: {r['text'][:110]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
