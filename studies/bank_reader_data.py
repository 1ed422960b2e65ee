"""Invented documents for the bank reader (README "Positive controls", row "bank reader"). Seconds.

    python -m studies.bank_reader_data      # writes studies/data/bank_reader/{train,dev,test}.jsonl

Each document names three invented people, the town each lives in and the object each keeps
("Orla Vennick lives in Tarrowby. Orla keeps a copper kettle. ..."). Training rows are chat
questions about one person's town or object with the answer as the reply and the document in a
`document` key (`python -m engine train` with `data.documents: true` distils it into the bank
before the row). First names, surnames and towns come from disjoint seeded pools for
train/dev and for test, so the test documents' people and towns never occur in training; dev
(the trainer's held-out loss) is made of train-pool names in new documents, test is never
looked at while training.
"""

from __future__ import annotations

import random
from pathlib import Path

from .common import write_splits

OUT = Path(__file__).resolve().parent / "data" / "bank_reader"
SYSTEM = "Answer in a few words."
ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "t", "th", "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
CODAS = ["l", "n", "r", "s", "th", "m", "nd", "rk", "ll", "v"]
TOWN_ENDS = ["by", "mere", "ford", "holt", "wick", "stead", "moor", "vale", "ton", "bury"]
SUR_ENDS = ["ick", "ey", "ow", "er", "an", "is", "ett"]
MATERIALS = ["copper", "glass", "velvet", "oak", "silver", "clay", "linen", "brass", "stone", "wool"]
THINGS = ["kettle", "compass", "map", "lantern", "flute", "ledger", "mirror", "key", "drum", "basket"]


def _syllable(rng) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _pool(rng, make, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add(make(rng))
    return sorted(out)


def pools(seed: int = 0):
    rng = random.Random(seed)
    first = _pool(rng, lambda r: (_syllable(r) + r.choice(VOWELS + ["a", "o"])).capitalize(), 400)
    last = _pool(rng, lambda r: (_syllable(r) + r.choice(SUR_ENDS)).capitalize(), 400)
    towns = _pool(rng, lambda r: (_syllable(r) + r.choice(TOWN_ENDS)).capitalize(), 400)
    banned = set(first) & set(last) | set(first) & set(towns) | set(last) & set(towns)
    split = {}
    for name, pool in (("first", first), ("last", last), ("towns", towns)):
        pool = [p for p in pool if p not in banned]
        rng.shuffle(pool)
        cut = int(len(pool) * 0.75)
        split[name] = (pool[:cut], pool[cut:])
    return split


def document(rng, first, last, towns, people: int = 3) -> tuple[str, list[dict]]:
    names = rng.sample(first, people)
    sur = rng.sample(last, people)
    where = rng.sample(towns, people)
    objects = [f"a {m} {t}" for m, t in zip(rng.sample(MATERIALS, people), rng.sample(THINGS, people))]
    facts = [{"name": f"{f} {s}", "first": f, "town": w, "object": o} for f, s, w, o in zip(names, sur, where, objects)]
    text = " ".join(f"{p['name']} lives in {p['town']}. {p['first']} keeps {p['object']}." for p in facts)
    return text, facts


def rows_of(doc_id: str, text: str, facts: list[dict], objects: bool) -> list[dict]:
    rows = []
    for i, p in enumerate(facts):
        qa = [("town", f"Where does {p['name']} live?", p["town"])]
        if objects:
            qa.append(("object", f"What does {p['name']} keep?", p["object"]))
        for kind, q, a in qa:
            rows.append(
                {
                    "id": f"{doc_id}-{i}-{kind}",
                    "doc_id": doc_id,
                    "document": text,
                    "kind": kind,
                    "answer": a,
                    "wrong": facts[(i + 1) % len(facts)]["town"] if kind == "town" else None,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ],
                }
            )
    return rows


def make(seed: int = 0, n_train: int = 400, n_dev: int = 4, n_test: int = 40) -> dict[str, list[dict]]:
    split = pools(seed)
    rng = random.Random(seed + 1)
    out = {"train": [], "dev": [], "test": []}
    for part, n, side in (("train", n_train, 0), ("dev", n_dev, 0), ("test", n_test, 1)):
        for d in range(n):
            text, facts = document(rng, split["first"][side], split["last"][side], split["towns"][side])
            out[part] += rows_of(f"{part}{d}", text, facts, objects=part != "test")
    return out


def main() -> None:
    write_splits(OUT, make())


if __name__ == "__main__":
    main()
