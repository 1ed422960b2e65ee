"""Ceiling check for the bank reader (README "Positive controls", "Bank reader"): can the plain
embedded model bind person -> town with the document *in context*? Dev items only.

    python -m studies.bank_reader_context        # 12 dev town questions x 3 placements, ~15 min on 2 busy cores

For each town question of studies/data/bank_reader/dev.jsonl (no reader, no bank: the observer),
the document is put in the system prompt, before the question in the user turn, or nowhere; measured
are log p(right town), the right-minus-wrong margin (the other person's town of the same document,
both teacher-forced as the reply) and whether the greedy reply (8 tokens) contains the right town.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .bank_reader_data import OUT as DATA
from .bank_reader_data import SYSTEM
from .common import reply_logprob


def main() -> None:
    from engine import load_model, parse_arm
    from engine.dialogue import Dialogue

    torch.set_num_threads(2)
    lm = load_model(verbose=False)
    tok = lm.tokenizer
    rows = [json.loads(line) for line in (DATA / "dev.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("wrong")]
    obs = parse_arm("observer")
    res: dict[str, list] = {"system": [], "user": [], "none": []}
    for r in rows:
        q = r["messages"][1]["content"]
        right, wrong = (tok(a, add_special_tokens=False)["input_ids"] for a in (r["answer"], r["wrong"]))
        for where, out in res.items():
            system = SYSTEM + ("\n" + r["document"] if where == "system" else "")
            user = (r["document"] + "\n" + q) if where == "user" else q
            logits = Dialogue(lm, [obs, obs], system=system).teacher_force(user, [right, wrong])
            lp = [reply_logprob(x, t) for x, t in zip(logits, [right, wrong])]
            reply = Dialogue(lm, [obs], system=system).send(user, max_new_tokens=8)[0].text
            out.append((lp[0], lp[1], lp[0] - lp[1], r["answer"].lower() in reply.lower(), reply))
    for where, v in res.items():
        m = np.array([x[2] for x in v])
        print(
            f"{where:7s} n={len(v)} logp_right {np.mean([x[0] for x in v]):+.2f} margin mean {m.mean():+.2f} "
            f"(min {m.min():+.2f}, >0: {(m > 0).sum()}/{len(m)}) greedy contains answer "
            f"{sum(x[3] for x in v)}/{len(v)}  e.g. {[x[4] for x in v[:3]]}"
        )


if __name__ == "__main__":
    main()
