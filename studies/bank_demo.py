"""Does an arm behave as if it had read a document that is not in its context? (memory_bank demo)

README table: "Does a bank make an arm behave as if it had read a document?" (Mechanisms).
Running time: the run itself is not timed in the README; training the bank it reads took 1711 s.

    python -m studies.bank_demo --trained runs/bank_tiny_cpu/bank.safetensors [--items 30]

Arms: observer; a bank distilled from data/facts/document.txt (no training, made here, on
the layers of the trained bank); the bank trained by `python -m engine train
configs/bank_tiny_cpu.yaml` (optional) — each at a few linkages. The shipped protocol
`fictional_facts` asks one question per invented person with no document in context, through the
real runner (SQLite store, answer_match scorer, item-bootstrap 95% intervals and paired McNemar
tests against the observer). Separately, each arm teacher-forces the correct answer after the same
question and the mean log-probability of the answer's tokens is reported (sum over the answer's
tokens, and per token), with an item-bootstrap 95% interval, together with the margin over a
wrong town of the same document (the next person's): a bank that only primes the document's
vocabulary raises both, one that links people to towns raises the margin. Everything measured
is printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import reply_logprob

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "experiments" / "protocols" / "fictional_facts.yaml"
DOCUMENT = ROOT / "data" / "facts" / "document.txt"


def answer_logprobs(lm, spec: str, protocol, items: list[dict], all_items: list[dict]) -> list[tuple]:
    """Per item: (sum of log p(answer tokens), their number, sum of log p(a distractor)) under teacher
    forcing. The distractor is the next person's town: a town of the same document, wrong here."""
    from engine.dialogue import Dialogue
    from engine.spec import parse_arm

    out = []
    index = {it["id"]: i for i, it in enumerate(all_items)}
    for item in items:
        question = protocol.render_turns(item)[0]
        other = all_items[(index[item["id"]] + 1) % len(all_items)]["answer"]
        replies = [lm.tokenizer(str(a), add_special_tokens=False)["input_ids"] for a in (item["answer"], other)]
        d = Dialogue(lm, [parse_arm(spec)] * 2)
        sums = []
        for logits, reply in zip(d.teacher_force(question, replies), replies):
            sums.append(reply_logprob(logits, reply))
        out.append((sums[0], len(replies[0]), sums[1]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trained", default=None, help="weights file of a trained bank (engine train)")
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--linkages", default="0.5/1")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--db", default=None, help="SQLite file for the run (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from db import Store
    from engine import load_model
    from engine.distill import distill
    from engine.weights import read_header
    from experiments.analysis import format_summary, summary
    from experiments.protocol import load_protocol
    from experiments.runner import run_protocol
    from experiments.stats import bootstrap_ci

    lm = load_model(verbose=False)
    protocol = load_protocol(PROTOCOL)
    items = protocol.items[: args.items]
    tmp = Path(tempfile.mkdtemp(prefix="bank_demo_"))
    layers = "8/14/20/26"
    if args.trained:
        layers = "/".join(str(l) for l in read_header(args.trained).settings["layers"])
    t = time.perf_counter()
    distilled = tmp / "distilled.safetensors"
    r = distill(lm, DOCUMENT.read_text(), f"memory_bank:layers={layers},chapters=4,top_k=2", out=distilled)
    print(
        f"distilled {r['tokens']} document tokens into {r['slots']} slots x {r['banks']} banks "
        f"(layers {r['layers']}) in {time.perf_counter() - t:.2f} s"
    )

    linkages = [float(x) for x in args.linkages.split("/")]
    arms = ["observer"]
    arms += [f'memory_bank:linkage={l:g},weights="{distilled}",label=distilled λ={l:g}' for l in linkages]
    if args.trained:
        arms += [f'memory_bank:linkage={l:g},weights="{args.trained}",label=trained λ={l:g}' for l in linkages]

    store = Store(f"sqlite:///{args.db or tmp / 'demo.db'}")
    t = time.perf_counter()
    eid = run_protocol(store, lm, protocol, arms, seeds=1, items=len(items), max_new_tokens=args.max_new_tokens)
    s = summary(store, eid, n_boot=2000)
    print(
        f"\nanswer_match over {len(items)} questions, greedy, max {args.max_new_tokens} new tokens "
        f"({time.perf_counter() - t:.0f} s)"
    )
    print(format_summary(s, all_metrics=False))

    print(
        "\nteacher-forced log-probability (nats) of the correct town after the question (mean over items, 95% "
        "item-bootstrap CI);\nright-minus-wrong: log p(correct town) - log p(another person's town from the same document)"
    )
    rows = []
    base = None
    for spec in arms:
        lps = answer_logprobs(lm, spec, protocol, items, protocol.items)
        total = np.array([a for a, _, _ in lps])
        per_tok = np.array([a / n for a, n, _ in lps])
        margin = np.array([a - x for a, _, x in lps])
        est_m, lo_m, hi_m = bootstrap_ci(margin, n_boot=2000)
        est, lo, hi = bootstrap_ci(total, n_boot=2000)
        est_t, lo_t, hi_t = bootstrap_ci(per_tok, n_boot=2000)
        label = spec.split("label=")[-1] if "label=" in spec else spec
        if base is None:
            base = total
        diff = bootstrap_ci(total - base, n_boot=2000)
        rows.append(
            {
                "arm": label,
                "logp_answer": [est, lo, hi],
                "logp_per_token": [est_t, lo_t, hi_t],
                "diff_vs_observer": list(diff),
                "margin_vs_distractor": [est_m, lo_m, hi_m],
            }
        )
        print(
            f"  {label:16s} sum {est:7.2f} [{lo:7.2f}, {hi:7.2f}]  per token {est_t:6.2f} [{lo_t:6.2f}, {hi_t:6.2f}]"
            f"  vs observer {diff[0]:+6.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]"
            f"  right-minus-wrong town {est_m:+6.2f} [{lo_m:+.2f}, {hi_m:+.2f}]"
        )
    examples = {}
    from experiments.analysis import results_frame

    df = results_frame(store, eid, annotations=False)
    for arm, g in df.groupby("arm"):
        examples[arm] = list(zip(g["item"].head(3), g["text"].head(3)))
    print("\nfirst replies per arm:")
    for arm, ex in examples.items():
        print(f"  {arm}: " + " | ".join(repr(t.strip()[:60]) for _, t in ex))
    if args.out:
        Path(args.out).write_text(json.dumps({"answer_match": s, "logprob": rows}, indent=1, default=str))
    store.close()


if __name__ == "__main__":
    main()
