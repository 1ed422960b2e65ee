"""What the held-out studies share: their command line, their test items, their split files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional


def study_args(
    doc: Optional[str], argv, items: int, add: Callable[[argparse.ArgumentParser], None]
) -> argparse.Namespace:
    """Parse a study's arguments: its own (`add`) plus --items, --threads and --out; sets torch's threads."""
    import torch

    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    add(ap)
    ap.add_argument("--items", type=int, default=items)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write per-item results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def reply_logprob(logits, ids: list[int]) -> float:
    """log p of a teacher-forced reply: its tokens' log-probabilities summed (logits [len(ids), V])."""
    import torch

    return float(torch.log_softmax(logits.float(), -1)[torch.arange(len(ids)), torch.tensor(ids)].sum())


def test_items(data: Path, n: int, split: str = "test") -> list[dict]:
    """The first `n` held-out items of a study's data folder (its test.jsonl, or another split's file)."""
    lines = (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:n]


def write_splits(out: Path, parts: dict[str, list[dict]]) -> None:
    """One JSONL file per split (train / dev / test) under `out`, a row a line."""
    out.mkdir(parents=True, exist_ok=True)
    for part, rows in parts.items():
        with open(out / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{out / part}.jsonl: {len(rows)} rows")


# Fixed assistant replies for the fact and distractor turns (teacher-forced, so every arm reads the
# same transcript and only the attention window and the memory differ; --generate lets arms answer).
FIXED_REPLIES = [
    "Noted, I will remember that.",
    "An alarm at seven, a shower, toast and coffee, then the bus to work.",
    "Water when the soil is dry, give bright indirect light, and dust the leaves.",
    "Air scatters blue light more than red, so blue comes from every direction.",
]
