"""Recall beyond the attention window: observer vs neural memory vs continuity.

README tables: "Recall beyond the window" (both) and "Positive controls".
Running time: 125 s (4 arms, window 64, 12 items, 2 threads); 55 s with --shuffle-facts (README).

    python -m studies.window_recall --windows 32,none --items 12 --json out.json

Plays the shipped `window_recall` protocol (a fact planted in turn 1, three distractor turns, the
question last) to every arm at once, per item and window, greedy. The fact and distractor turns get
fixed assistant replies (teacher-forced: one transcript for every arm; `--generate` lets the arms
answer instead). Per arm it reports

* recall: answer_match on the generated answer to the question (share of items, bootstrap 95% CI);
* log p(answer): the summed log-probability of the gold answer's tokens as the reply to the
  question (teacher-forced after rolling the generated answer back), mean over items with a
  bootstrap 95% CI, and the paired difference to the observer (bootstrap 95% CI over items).

`--shuffle-facts` is the control: each item gets the next item's fact planted (its own question and
answer kept), so what an arm still gains on log p(answer) is a prior over answers, not recall.

`--items-file FILE` plays other items through the protocol's turns (JSONL lines {id, fact,
question, answer}), e.g. `data/window_values/test.jsonl`: the training attributes of
`studies.window_data` with values no training or held-out dialogue plants and no protocol item
answers (checked), for recall of unseen values of the kinds of fact a memory was trained on.

Everything measured is printed, whatever it shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .common import FIXED_REPLIES  # the fact and distractor turns' fixed replies (studies/common.py)

DEFAULT_ARMS = [
    "observer",
    "neural_memory:linkage=0.5,label=neural λ=0.5",
    "neural_memory:linkage=1,label=neural λ=1",
    "continuity:linkage=0.5,source=all,label=continuity λ=0.5",
    "continuity:linkage=1,source=all,label=continuity λ=1",
]


def run_item(lm, specs, protocol, item, window, max_new_tokens, answer_tokens, generate=False):
    from engine import Dialogue
    from experiments.scoring import answer_match

    d = Dialogue(lm, specs, system=protocol.render_system(item), window=window)
    turns = protocol.render_turns(item)
    eos = lm.tokenizer.eos_token_id
    for k, user in enumerate(turns[:-1]):
        if generate:
            d.send(user, max_new_tokens=max_new_tokens)
        else:
            reply = answer_tokens(FIXED_REPLIES[k % len(FIXED_REPLIES)]) + [eos]
            d.teacher_force(user, [reply] * len(specs), keep_logits=False)
    replies = d.send(turns[-1], max_new_tokens=10)
    recall = [bool(answer_match(r.text, item["answer"])["matched"]) for r in replies]
    d.rollback()
    ids = answer_tokens(str(item["answer"]))
    logits = d.teacher_force(turns[-1], [ids] * len(specs))
    logp = []
    for lg in logits:
        lp = lg.float().log_softmax(-1)
        logp.append(float(lp[range(len(ids)), ids].sum()))
    return recall, logp, [r.text for r in replies], [a.length for a in d.arms]


def summarise(rows: list[dict], labels: list[str]) -> list[dict]:
    from experiments.stats import bootstrap_ci

    out = []
    windows = sorted({r["window"] for r in rows}, key=lambda w: (w is not None, w or 0))
    for w in windows:
        sub = [r for r in rows if r["window"] == w]
        base = np.array([r["logp"][0] for r in sub])
        for a, label in enumerate(labels):
            rec = np.array([float(r["recall"][a]) for r in sub])
            lp = np.array([r["logp"][a] for r in sub])
            ci_r, ci_l = bootstrap_ci(rec), bootstrap_ci(lp)
            ci_d = bootstrap_ci(lp - base) if a else (0.0, 0.0, 0.0)
            out.append(
                {
                    "window": w,
                    "arm": label,
                    "n": len(sub),
                    "recall": ci_r[0],
                    "recall_ci": list(ci_r[1:]),
                    "logp": ci_l[0],
                    "logp_ci": list(ci_l[1:]),
                    "dlogp_vs_observer": ci_d[0],
                    "dlogp_ci": list(ci_d[1:]),
                }
            )
    return out


def load_items(path: str, protocol) -> list[dict]:
    """Items from a JSONL file, each with id, fact, question and answer; none may share its value with
    a training or held-out dialogue of its attribute (studies.window_data) or be a protocol item."""
    from experiments.jsonl import jsonl_lines
    from studies.window_data import ATTRS, check_disjoint

    with open(path, encoding="utf-8") as f:
        lines = list(jsonl_lines(f.read()))
    items = []
    for k, it in lines:
        if not isinstance(it, dict):
            raise SystemExit(f"error: {path} line {k}: not a JSON object ({it})")
        items.append(it)
        missing = [key for key in ("id", "fact", "question", "answer") if key not in it]
        if missing:
            raise SystemExit(f"error: {path} line {k}: missing {', '.join(missing)}")
        for template, question, values in ATTRS:
            if question == it["question"] and str(it["answer"]) in values:
                raise SystemExit(f"error: {path} line {k}: {it['answer']!r} is a value the training data plants")
    try:
        check_disjoint(items, protocol)
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.window_recall", description=__doc__.split("\n")[0])
    p.add_argument("--arm", action="append", default=None, help="arm spec (repeatable; default: the README's arms)")
    p.add_argument("--windows", default="32,none", help="comma-separated windows; 'none' = full attention")
    p.add_argument("--items", type=int, default=None, help="first K items (default all)")
    p.add_argument(
        "--generate",
        action="store_true",
        help="arms generate the fact/distractor replies "
        "(default: the fixed replies are teacher-forced, the same transcript for every arm)",
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="with --generate: reply length of those turns")
    p.add_argument(
        "--shuffle-facts",
        action="store_true",
        help="control: plant the next item's fact instead of the item's own (answers kept)",
    )
    p.add_argument(
        "--items-file",
        default=None,
        help="JSONL of {id, fact, question, answer} items played instead of the protocol's own",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a crowded machine)")
    p.add_argument("--json", default=None, help="write rows and summary to this file (after every dialogue)")
    p.add_argument("--summarise", default=None, metavar="JSON", help="only print the summary of a (partial) run's file")
    args = p.parse_args(argv)
    if args.summarise:
        with open(args.summarise) as f:
            data = json.load(f)
        report(data["rows"], data["labels"], data["setup"])
        return 0

    import torch

    from engine import load_model, parse_arm
    from experiments.protocol import get_protocol

    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.spec import SpecError

    try:
        specs = [parse_arm(a).with_sampling(greedy=True) for a in (args.arm or DEFAULT_ARMS)]
    except (SpecError, ValueError) as e:
        raise SystemExit(f"error: {str(e).splitlines()[0]}") from None
    labels = [s.display_label for s in specs]
    windows = [None if w.strip().lower() == "none" else int(w) for w in args.windows.split(",") if w.strip()]
    protocol = get_protocol("window_recall")
    items = load_items(args.items_file, protocol) if args.items_file else protocol.items
    items = items[: args.items] if args.items else items
    if args.shuffle_facts:
        items = [{**it, "fact": items[(k + 1) % len(items)]["fact"]} for k, it in enumerate(items)]
    lm = load_model(verbose=False)

    def answer_tokens(text):
        return lm.tokenizer(text, add_special_tokens=False).input_ids

    rows = []
    t0 = time.perf_counter()
    setup = "fixed, teacher-forced" if not args.generate else f"generated (<= {args.max_new_tokens} tokens)"
    if args.shuffle_facts:
        setup += "; CONTROL: each item's fact replaced by the next item's"
    for item in items:  # item-major: a partial run still compares every window on the same items
        for w in windows:
            recall, logp, texts, lengths = run_item(
                lm, specs, protocol, item, w, args.max_new_tokens, answer_tokens, args.generate
            )
            rows.append(
                {"window": w, "item": item["id"], "recall": recall, "logp": logp, "answers": texts, "lengths": lengths}
            )
            print(
                f"[{time.perf_counter() - t0:6.0f}s] window={w} {item['id']}: recall={recall} "
                f"logp={[round(x, 2) for x in logp]}",
                file=sys.stderr,
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(
                        {"arms": [s.to_string() for s in specs], "labels": labels, "setup": setup, "rows": rows},
                        f,
                        indent=1,
                    )
    summary = report(rows, labels, setup)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "arms": [s.to_string() for s in specs],
                    "labels": labels,
                    "setup": setup,
                    "rows": rows,
                    "summary": summary,
                },
                f,
                indent=1,
            )
    return 0


def report(rows: list[dict], labels: list[str], setup: str) -> list[dict]:
    summary = summarise(rows, labels)
    n_items = len({r["item"] for r in rows})
    print(
        f"window_recall: {n_items} items, arms batched, greedy, fact/distractor replies {setup}, "
        f"dialogue length {min(min(r['lengths']) for r in rows)}-{max(max(r['lengths']) for r in rows)} "
        f"tokens; 95% bootstrap CIs over items"
    )
    print(
        f"{'window':>7} {'arm':28s} {'recall':>6} {'[95% CI]':>14} {'log p(answer)':>13} {'[95% CI]':>17} "
        f"{'Δ vs observer':>13} {'[95% CI]':>17}"
    )
    for s in summary:
        print(
            f"{str(s['window']):>7} {s['arm'][:28]:28s} {s['recall']:6.2f} [{s['recall_ci'][0]:4.2f}, "
            f"{s['recall_ci'][1]:4.2f}] {s['logp']:13.2f} [{s['logp_ci'][0]:7.2f}, {s['logp_ci'][1]:7.2f}] "
            f"{s['dlogp_vs_observer']:13.2f} [{s['dlogp_ci'][0]:7.2f}, {s['dlogp_ci'][1]:7.2f}]"
        )
    return summary


if __name__ == "__main__":
    sys.exit(main())
