"""A constraint checked at the end of a long reply, for partial attention (README "Positive
controls", row "partial attention, constraint task"). Seconds.

    python -m studies.constraint_data     # writes studies/data/constraint_end/{train,dev,test}.jsonl

The system prompt lists a few rules; the one checked is the last: "End every reply with the line
'Signed, <invented name> of <invented town>.'". The user asks for a description of a topic; the
reply is a long body (10 sentences drawn from a fixed pool, ~150 tokens) and then the sign-off.
Names and towns come from the disjoint pools of `studies.bank_reader_data` (train/dev side and
test side), so the test sign-offs never occur in training. `wrong` is another test item's
sign-off name: the right-minus-wrong margin at the reply's end measures grounding in the source.
"""

from __future__ import annotations

import random
from pathlib import Path

from .bank_reader_data import pools
from .common import write_splits

OUT = Path(__file__).resolve().parent / "data" / "constraint_end"
TOPICS = [
    "a harbour at dawn",
    "an old library",
    "a mountain railway",
    "a winter market",
    "a river ferry",
    "a clock tower",
    "a village bakery",
    "a lighthouse",
    "a desert road",
    "a night train",
    "an orchard",
    "a weaving workshop",
    "a salt marsh",
    "a glass house",
    "a stone bridge",
    "a fishing village",
]
SENTENCES = [
    "The first thing a visitor notices is the light, which changes every hour.",
    "People arrive early, carrying baskets and talking quietly among themselves.",
    "The air smells of wood smoke, wet stone and something sweet from far away.",
    "Along the edges there are benches worn smooth by many years of use.",
    "A narrow path winds between the buildings and disappears behind a wall.",
    "In the afternoon the place grows busy, and the sounds rise and overlap.",
    "Children run ahead while the older people stop to look at every detail.",
    "The colours are mostly grey and brown, with a few bright flags here and there.",
    "Someone is always repairing something, with patient hands and simple tools.",
    "When the wind turns, the whole scene seems to hold its breath for a moment.",
    "There is a small shop that sells maps, candles and jars of honey.",
    "The oldest part was built long ago, and nobody remembers exactly when.",
    "At the centre stands a well, its rim polished by countless hands.",
    "Birds gather on the roofs and leave again as soon as a bell rings.",
    "The evening brings a cooler air and a long, slow quiet over everything.",
    "Lamps are lit one by one, and their light falls softly on the ground.",
    "Travellers often say that the place feels both busy and peaceful.",
    "In spring the slopes around it turn green, and in autumn they turn gold.",
    "A few cats sleep in the sun and ignore everyone who passes by.",
    "The locals have a saying about patience that they repeat with a smile.",
]
RULES = ["Write in plain prose.", "Do not use lists.", "Describe what a visitor would see and hear."]


def item(rng, first, last, towns, i: int, part: str) -> dict:
    name = f"{rng.choice(first)} {rng.choice(last)} of {rng.choice(towns)}"
    topic = rng.choice(TOPICS)
    body = " ".join(rng.sample(SENTENCES, 10))
    system = (
        "You are a travel writer. Rules for every reply: "
        + " ".join(RULES)
        + f" End every reply with the line 'Signed, {name}.'"
    )
    return {
        "id": f"{part}{i}",
        "signoff": name,
        "body": body,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Describe {topic} in detail."},
            {"role": "assistant", "content": f"{body}\n\nSigned, {name}."},
        ],
    }


def make(seed: int = 0, n_train: int = 240, n_dev: int = 8, n_test: int = 60) -> dict[str, list[dict]]:
    split = pools(seed)
    rng = random.Random(seed + 2)
    out = {}
    for part, n, side in (("train", n_train, 0), ("dev", n_dev, 0), ("test", n_test, 1)):
        out[part] = [
            item(rng, split["first"][side], split["last"][side], split["towns"][side], i, part) for i in range(n)
        ]
    for i, it in enumerate(out["test"]):  # the distractor: another test item's sign-off
        it["wrong"] = out["test"][(i + 1) % len(out["test"])]["signoff"]
    return out


def main() -> None:
    write_splits(OUT, make())


if __name__ == "__main__":
    main()
