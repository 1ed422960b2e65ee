"""Capture cost: attention + memory-read capture of a ~1000-token transcript on the embedded model.

    python -m bench.capture_bench [--tokens 1000] [--threads N] [--reps 2]

Builds a 3-turn transcript (long user messages, forced assistant replies) for one continuity arm
(linkage 1), then times `engine.capture.capture_turn` on the last turn (one eager pass over the
whole transcript with every layer's weights reduced on the fly, bucketed to 256 x 256, plus the
arm's read traces) and `memory_read_table`. Target: <= 3 s on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TEXT = (
    "The committee met again on Tuesday to revisit the question of whether the river crossing should be "
    "rebuilt in stone or in steel. Each member restated a position, citing costs, flood records, the "
    "opinions of engineers and the wishes of the villagers who use the bridge every morning. "
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capture_bench")
    p.add_argument("--tokens", type=int, default=1000, help="approximate transcript length")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--arm", default="continuity:linkage=1")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from engine import load_model, parse_arm
    from engine.capture import capture_turn, memory_read_table

    lm = load_model(verbose=False)
    tok = lm.tokenizer
    words = tok(TEXT * 40, add_special_tokens=False)["input_ids"]
    per_turn = args.tokens // 3
    user_len, reply_len = int(per_turn * 0.6), per_turn - int(per_turn * 0.6) - 12
    turns = []
    for k in range(3):
        user = tok.decode(words[k * 50 : k * 50 + user_len])
        reply = words[200 + k * 30 : 200 + k * 30 + reply_len] + [tok.convert_tokens_to_ids("<|im_end|>")]
        turns.append((user, [reply]))
    spec = parse_arm(args.arm)
    print(
        f"model {lm.identity.name} · torch threads {torch.get_num_threads()} · cpu count {os.cpu_count()} · "
        f"arm {spec.to_string()}"
    )
    times = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        cap = capture_turn(lm, [spec], turns, "You are a careful assistant.", focus_arm=0, focus_turn=2)
        t1 = time.perf_counter()
        table = memory_read_table(cap.traces[0][2], cap.focus, 2, tok)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        T = len(cap.focus.token_ids)
        n_slots = max((len(e["slots"]) for e in table["layers"]), default=0)
        print(
            f"rep {rep}: {T} tokens, attention {tuple(cap.attention.shape)} float32 "
            f"({cap.attention.astype('float16').nbytes / 2**20:.1f} MiB as float16), "
            f"{sum(len(t) for t in cap.traces[0])} read traces, {len(table['layers'])} read layers x "
            f"{len(table['tokens'])} reply tokens x {n_slots} slots · capture {t1 - t0:.2f} s + "
            f"memory table {t2 - t1:.2f} s = {t2 - t0:.2f} s"
        )
    best = min(times)
    print(f"capture_seconds_best {best:.2f} (target <= 3.0: {'OK' if best <= 3.0 else 'OVER'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
