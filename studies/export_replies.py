"""Write a stored run's replies as unlabelled lines for the labelled splits (GUIDE.md).

README table: the labelled splits behind "Stance judges" (data/stance_labels).
Running time: seconds (reads the database only).

    python -m studies.export_replies RUN_ID --db DB --splits splits.json --out DIR

One line per (dialogue, arm): the arm's replies in order, `labels` all null (the annotator fills
them in by reading, see GUIDE.md), and where it came from (protocol, item, question, arm spec,
model, run id). Each line goes to the split its item is assigned to in splits.json
({protocol: {split: [item ids]}}), so the split is fixed before anyone labels or judges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def export(store, run_id: str, splits: dict) -> dict[str, list[dict]]:
    """{split: [unlabelled line, ...]} for one run (items in no split are left out)."""
    from experiments.analysis import results_frame

    exp = store.get_experiment(run_id)
    protocol = exp["protocol"] or {}
    name = exp["protocol_name"]
    questions = {str(i.get("id")): i.get("question") for i in protocol.get("items", [])}
    split_of = {item: split for split, items in splits.get(name, {}).items() for item in items}
    df = results_frame(store, run_id, annotations=False)
    out: dict[str, list[dict]] = {}
    for (item, arm_index), g in df.sort_values("turn").groupby(["item", "arm_index"], sort=True):
        split = split_of.get(item)
        if split is None:
            continue
        g = g.sort_values("turn")
        out.setdefault(split, []).append(
            {
                "id": f"{name}/{item}/arm{arm_index}",
                "question": questions.get(item),
                "turns": [str(t) for t in g["text"].fillna("")],
                "labels": [None] * len(g),
                "source": {
                    "kind": "run",
                    "protocol": name,
                    "item": item,
                    "arm": g["arm_spec"].iloc[0],
                    "model": (exp.get("model") or {}).get("name"),
                    "run_id": run_id,
                    "max_new_tokens": (exp.get("args") or {}).get("max_new_tokens"),
                },
                "split": split,
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_id")
    p.add_argument("--db", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--out", required=True, help="folder: writes <split>.unlabelled.jsonl (appends)")
    args = p.parse_args(argv)
    from db import Store

    splits = json.loads(Path(args.splits).read_text())
    out = export(Store(args.db, create=False), args.run_id, splits)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for split, lines in out.items():
        with open(Path(args.out) / f"{split}.unlabelled.jsonl", "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
        print(f"{split}: {len(lines)} dialogues")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
