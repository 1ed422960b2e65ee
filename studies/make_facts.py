"""Build the fictional fact set (deterministic): 30 invented people, each with a town and a trade.

README table: the data behind "Does a bank make an arm behave as if it had read a document?".
Running time: under a second (pure Python, deterministic).

    python -m studies.make_facts      # rewrites data/facts/

Files: `document.txt` (the facts as prose: what `python -m engine distill` reads),
`items.jsonl` (one question per person, the answer is the town; used by the protocol
`experiments/protocols/fictional_facts.yaml`), `train.jsonl` / `heldout.jsonl` (text statements
of the same facts in other wordings, for `python -m engine train`; the held-out file uses a
wording the training file never does). Names and towns are invented, so a model cannot know them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "data" / "facts"  # the files this script writes
FIRST = [
    "Velmira",
    "Orsik",
    "Talwen",
    "Brisca",
    "Hendal",
    "Quorra",
    "Feyan",
    "Lusko",
    "Marebeth",
    "Dorvin",
    "Iselka",
    "Pobrin",
    "Zennor",
    "Caddoc",
    "Yseult",
    "Armeth",
    "Tibald",
    "Nerys",
    "Gorlan",
    "Wessa",
    "Ulfrin",
    "Saphie",
    "Kelmet",
    "Rhosyn",
    "Drabo",
    "Elowen",
    "Fintar",
    "Maelis",
    "Corvan",
    "Ottilie",
]
LAST = [
    "Oskant",
    "Thrume",
    "Vallory",
    "Pennick",
    "Marsk",
    "Dulwyn",
    "Crabbe",
    "Essling",
    "Morrow",
    "Quaile",
    "Trevask",
    "Haddow",
    "Ambry",
    "Folkes",
    "Grevil",
    "Inchbald",
    "Juster",
    "Kettleby",
    "Lanyon",
    "Mabbot",
    "Nethercott",
    "Pargeter",
    "Rudge",
    "Scadding",
    "Tozer",
    "Upcott",
    "Vosper",
    "Witheridge",
    "Yelland",
    "Zeal",
]
TOWNS = [
    "Tarnholm",
    "Briskwater",
    "Quellmoor",
    "Ostrevin",
    "Hallowick",
    "Dunmarrow",
    "Fennick",
    "Caldreth",
    "Wyndle",
    "Perrigal",
    "Morsby",
    "Glenvarra",
    "Ashcombe Tor",
    "Ulverstrand",
    "Kestlemere",
    "Brannock",
    "Sallowfen",
    "Drevington",
    "Yarrowby",
    "Coldharbour Rise",
    "Emberlee",
    "Gullane Cross",
    "Thistlecombe",
    "Vantry",
    "Orrin Bay",
    "Lathmoor",
    "Skelwith",
    "Rookhaven",
    "Imberly",
    "Nantgarrow",
]
TRADES = [
    "glassblower",
    "beekeeper",
    "clockmaker",
    "cartographer",
    "boatwright",
    "tanner",
    "lamplighter",
    "cooper",
    "bookbinder",
    "falconer",
    "potter",
    "rope maker",
    "chandler",
    "stonemason",
    "weaver",
    "locksmith",
    "brewer",
    "saddler",
    "bellfounder",
    "thatcher",
    "wheelwright",
    "dyer",
    "miller",
    "fletcher",
    "tinsmith",
    "herbalist",
    "shipwright",
    "farrier",
    "papermaker",
    "organ builder",
]

TRAIN_WORDINGS = [
    "{name} lives in {town}.",
    "The home town of {name} is {town}.",
    "In {town} there lives a {trade} called {name}.",
    "{name} works as a {trade} in {town}.",
]
HELDOUT_WORDING = "If you ask where {name} lives, the answer is {town}."


def people() -> list[dict]:
    rng = random.Random(1)
    towns, trades = TOWNS[:], TRADES[:]
    rng.shuffle(towns)
    rng.shuffle(trades)
    return [
        {"id": f"p{i:02d}", "name": f"{f} {l}", "town": t, "trade": tr}
        for i, (f, l, t, tr) in enumerate(zip(FIRST, LAST, towns, trades))
    ]


def main() -> None:
    ps = people()
    doc = ["The Register of the Nine Valleys", ""]
    for p in ps:
        doc.append(f"{p['name']} lives in the town of {p['town']} and works as a {p['trade']}.")
    (HERE / "document.txt").write_text("\n".join(doc) + "\n", encoding="utf-8")
    with open(HERE / "items.jsonl", "w", encoding="utf-8") as f:
        for p in ps:
            f.write(json.dumps({"id": p["id"], "name": p["name"], "answer": p["town"], "trade": p["trade"]}) + "\n")
    with open(HERE / "train.jsonl", "w", encoding="utf-8") as f:
        for p in ps:
            for w in TRAIN_WORDINGS:
                f.write(json.dumps({"text": w.format(**p)}) + "\n")
    with open(HERE / "heldout.jsonl", "w", encoding="utf-8") as f:
        for p in ps:
            f.write(json.dumps({"text": HELDOUT_WORDING.format(**p)}) + "\n")


if __name__ == "__main__":
    main()
