"""Training data for recall beyond an attention window: `python -m studies.window_data`.

README table: the data behind "Positive controls" (neural memory, outer loop).
Running time: a second or two (pure Python, no model).

Writes `experiments/window_data/{train,heldout}.jsonl`: chat dialogues of the `window_recall`
protocol's shape (a fact planted in turn 1, the protocol's three distractor turns with the fixed
replies of studies/window_recall.py, the question, the answer as the last reply), for
`python -m engine train` with `loss_on: last` and `train.window`. The attributes, names and values
are invented here and share none of the protocol's 12 facts, questions or answers (checked below),
so the protocol's items stay a held-out test set. `heldout.jsonl` holds one value of every
attribute (for early stopping); `heldout_shuffled.jsonl` the same dialogues with another value of
the same attribute planted (the answer kept), the control for a better prior over answers;
`{train,heldout}_negatives.jsonl` the same dialogues each with a `wrong` answer (another training value of
the attribute) for the trainer's margin term (`data.negatives`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from studies.persistent_window import ATTRS as BASE_ATTRS
from studies.persistent_window import dialogue_messages

MORE_ATTRS = [
    (
        "My grandmother was born in {v}.",
        "Where was my grandmother born?",
        ["Tallinn", "Bergen", "Nantes", "Bologna", "Graz", "Utrecht", "Cork", "Malmo"],
    ),
    (
        "The spare key is under the {v}.",
        "Where is the spare key?",
        ["doormat", "flowerpot", "bench", "statue", "birdbath", "lantern", "boot", "rock"],
    ),
    (
        "My cousin is studying {v}.",
        "What is my cousin studying?",
        ["geology", "law", "nursing", "architecture", "physics", "history", "music", "economics"],
    ),
    (
        "Our hamster is called {v}.",
        "What is our hamster called?",
        ["Waffles", "Dumpling", "Comet", "Pickle", "Marble", "Peanut", "Bramble", "Twix"],
    ),
    (
        "My best friend works as a {v}.",
        "What does my best friend work as?",
        ["pilot", "plumber", "baker", "surgeon", "librarian", "carpenter", "chemist", "florist"],
    ),
    ("The conference is in hall {v}.", "Which hall is the conference in?", ["C", "E", "F", "H", "K", "M", "P", "R"]),
    (
        "My boss is called Ms {v}.",
        "What is my boss called?",
        ["Ferreira", "Novak", "Albright", "Sato", "Quinn", "Delacroix", "Petrov", "Achebe"],
    ),
    (
        "The train leaves from platform {v}.",
        "Which platform does the train leave from?",
        ["6", "9", "11", "14", "3", "8", "15", "2"],
    ),
    (
        "My gym locker is number {v}.",
        "What is my gym locker number?",
        ["381", "642", "905", "216", "734", "158", "497", "820"],
    ),
    (
        "My daughter's teddy bear is called {v}.",
        "What is my daughter's teddy bear called?",
        ["Barnaby", "Clementine", "Humphrey", "Mabel", "Rupert", "Winnie", "Ollie", "Hazel"],
    ),
    (
        "My uncle drives a {v} van.",
        "What colour is my uncle's van?",
        ["blue", "white", "black", "red", "grey", "brown", "pink", "gold"],
    ),
    (
        "My yoga class is on {v}.",
        "On which day is my yoga class?",
        ["Monday", "Tuesday", "Wednesday", "Friday", "Saturday", "Sunday"],
    ),
    ("My lucky number is {v}.", "What is my lucky number?", ["17", "23", "38", "41", "56", "64", "89", "92"]),
    (
        "The museum we visited was in {v}.",
        "In which city was the museum we visited?",
        ["Zurich", "Antwerp", "Leipzig", "Marseille", "Gdansk", "Turin", "Bilbao", "Aarhus"],
    ),
]
ATTRS = [(f, q, list(v)) for f, q, v in BASE_ATTRS] + MORE_ATTRS


def make_items(seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, held-out with another value of the same attribute planted)."""
    rng = random.Random(seed)
    train, held, shuffled = [], [], []
    for fact, question, values in ATTRS:
        vals = list(values)
        rng.shuffle(vals)
        held.append({"fact": fact.format(v=vals[0]), "question": question, "answer": vals[0]})
        shuffled.append({"fact": fact.format(v=vals[1]), "question": question, "answer": vals[0]})
        train += [{"fact": fact.format(v=v), "question": question, "answer": v} for v in vals[1:]]
    rng.shuffle(train)
    return train, held, shuffled


def with_wrong(items: list[dict], seed: int = 0) -> list[dict]:
    """The rows with a `wrong` answer for `data.negatives`: another training value of the same
    attribute (never the held-out value, never a protocol answer), so the trainer's margin term asks
    the memory for the planted value over the attribute's other values, not for a likelier answer."""
    rng = random.Random(seed + 1)
    values = {question: vals for _, question, vals in ATTRS}
    held_out = {it["question"]: it["answer"] for it in make_items(seed)[1]}
    out = []
    for it in items:
        others = [v for v in values[it["question"]] if v not in (it["answer"], held_out[it["question"]])]
        out.append({**it, "wrong": rng.choice(others)})
    return out


def check_disjoint(items: list[dict], protocol) -> None:
    """No training fact, question or answer is one of the protocol's (the evaluation set)."""
    theirs = {str(it[k]).lower() for it in protocol.items for k in ("fact", "question", "answer")}
    for it in items:
        for k in ("fact", "question", "answer"):
            if str(it[k]).lower() in theirs:
                raise ValueError(f"training {k} {it[k]!r} is one of the window_recall protocol's items")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.window_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "experiments" / "window_data"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from experiments.protocol import get_protocol

    protocol = get_protocol("window_recall")
    train, held, shuffled = make_items(args.seed)
    check_disjoint(train + held, protocol)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in (("train", train), ("heldout", held), ("heldout_shuffled", shuffled)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps({"messages": dialogue_messages(protocol, it)}) + "\n")
    for name, items in (("train_negatives", train), ("heldout_negatives", held)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for it in with_wrong(items, args.seed):
                f.write(json.dumps({"messages": dialogue_messages(protocol, it), "wrong": it["wrong"]}) + "\n")
    print(f"{len(train)} train, {len(held)} held-out dialogues in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
