"""Dialogues per minute of the protocol runner: arms batched in one Dialogue vs one arm at a time.

    python -m bench.experiments_bench [--items 3] [--seeds 1] [--max-new-tokens 24] [--arm SPEC ...]

Both modes go through `run_protocol` (generation, logging to a scratch SQLite file, scoring), on
the embedded model. 'batched' plays each (item, seed) dialogue to all arms in one batch;
'sequential' runs the same protocol once per arm, one after the other. The two modes alternate
item by item (ABBA order), so a change of load on the machine does not favour one of them. A dialogue here is one
(item, seed) played to every arm, so both rates count the same work. Greedy arms by default, so
both modes generate the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments_bench", description=__doc__.split("\n")[0])
    p.add_argument("--protocol", default="are_you_sure")
    p.add_argument("--arm", action="append", default=None)
    p.add_argument("--items", type=int, default=3)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    arms = args.arm or ["observer", "continuity:linkage=1,gain=0.3"]

    import torch

    from db import Store
    from engine import Dialogue, load_model, parse_arm
    from experiments.runner import resolve_protocol, run_protocol

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lm = load_model(verbose=False)
    Dialogue(lm, [parse_arm(a) for a in arms]).send("Hello", max_new_tokens=2)  # warm-up
    protocol = resolve_protocol(args.protocol)
    items = protocol.items[: args.items]
    n = len(items) * args.seeds
    batched_s = seq_s = 0.0
    batched_tok = seq_tok = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")

        def timed(one_item_protocol, specs):
            t = time.perf_counter()
            eid = run_protocol(store, lm, one_item_protocol, specs, args.seeds, None, args.max_new_tokens)
            tokens = sum(
                t["n_tokens"] or 0
                for s in store.list_sessions(experiment_id=eid)
                for t in store.get_turns(s["id"])
                if t["role"] == "assistant"
            )
            return time.perf_counter() - t, tokens

        # item by item, alternating which mode goes first, so that a load change on the machine
        # does not favour one mode
        for i, item in enumerate(items):
            one = protocol.model_copy(update={"items": [item]})
            for mode in ("batched", "sequential") if i % 2 == 0 else ("sequential", "batched"):
                if mode == "batched":
                    dt, tok = timed(one, arms)
                    batched_s, batched_tok = batched_s + dt, batched_tok + tok
                else:
                    for a in arms:
                        dt, tok = timed(one, [a])
                        seq_s, seq_tok = seq_s + dt, seq_tok + tok
        store.close()
    result = {
        "protocol": args.protocol,
        "arms": arms,
        "items": args.items,
        "seeds": args.seeds,
        "max_new_tokens": args.max_new_tokens,
        "dialogues": n,
        "threads": torch.get_num_threads(),
        "batched_s": round(batched_s, 2),
        "sequential_s": round(seq_s, 2),
        "batched_dialogues_per_min": round(60 * n / batched_s, 2),
        "sequential_dialogues_per_min": round(60 * n / seq_s, 2),
        "batched_tokens_per_s": round(batched_tok / batched_s, 2),
        "sequential_tokens_per_s": round(seq_tok / seq_s, 2),
        "speedup": round(seq_s / batched_s, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.protocol}: {n} dialogues x {len(arms)} arms ({', '.join(arms)}), "
            f"max_new_tokens {args.max_new_tokens}, {result['threads']} threads"
        )
        print(
            f"  batched    {result['batched_dialogues_per_min']:7.2f} dialogues/min  "
            f"({result['batched_s']:.1f} s, {result['batched_tokens_per_s']:.1f} generated tok/s)"
        )
        print(
            f"  sequential {result['sequential_dialogues_per_min']:7.2f} dialogues/min  "
            f"({result['sequential_s']:.1f} s, {result['sequential_tokens_per_s']:.1f} generated tok/s)"
        )
        print(f"  batched / sequential: {result['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
