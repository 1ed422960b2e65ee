"""Neural memory speed, as ratios measured in one run on the embedded model (fp32, CPU, greedy).

    python -m bench.neural_memory_bench [--new-tokens 64] [--prefill 1000] [--reps 3]

Decode: exactly N new tokens from the same prompt (end-of-turn ignored), neural memory on its 3
default layers at linkage 1 (linear and MLP memory) vs plain transformers `generate`.
Prefill: one forward pass over `--prefill` tokens (last-position logits) with the neural memory vs
the plain model's forward. Repetitions are interleaved so a slow moment of the shared machine hits
every configuration alike; medians are reported. Targets (issue 10): linear decode >= 0.8x plain
generate (the MLP's is reported); prefill of 1,000 tokens <= 1.5x the plain forward's time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.engine_bench import PROMPT, engine_generate, plain_generate
from engine import Dialogue, load_model, parse_arm
from engine.hooks import MechanismHost
from engine.mechanisms.base import ROLE_CODE

LINEAR = "neural_memory:linkage=1"
MLP = "neural_memory:linkage=1,memory=mlp"


def prefill_ids(lm, n: int) -> list[int]:
    text = " ".join([PROMPT] * 40)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


def plain_prefill(lm, ids: list[int]) -> float:
    MechanismHost.of(lm.model).remove_hooks()
    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        lm.model(input_ids=x, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def engine_prefill(lm, arm: str, ids: list[int]) -> float:
    d = Dialogue(lm, [parse_arm(arm)])
    start = time.perf_counter()
    d._forward([ids], [[ROLE_CODE["user"]] * len(ids)], 0, logits_to_keep=1)
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    n = args.new_tokens
    lm = load_model(verbose=False)
    ids = prefill_ids(lm, args.prefill)
    decode = {
        "plain generate": lambda: plain_generate(lm, n),
        "observer arm": lambda: engine_generate(lm, ["observer"], n),
        "neural linear, 3 layers": lambda: engine_generate(lm, [LINEAR], n),
        "neural MLP, 3 layers": lambda: engine_generate(lm, [MLP], n),
    }
    prefill = {
        "plain forward": lambda: plain_prefill(lm, ids),
        "observer arm": lambda: engine_prefill(lm, "observer", ids),
        "neural linear, 3 layers": lambda: engine_prefill(lm, LINEAR, ids),
        "neural MLP, 3 layers": lambda: engine_prefill(lm, MLP, ids),
    }
    engine_generate(lm, [LINEAR], 4)  # warm-up
    plain_generate(lm, 4)
    rates = {k: [] for k in decode}
    times = {k: [] for k in prefill}
    for _ in range(args.reps):
        for k, fn in decode.items():
            rates[k].append(fn())
        for k, fn in prefill.items():
            times[k].append(fn())
    r = {k: statistics.median(v) for k, v in rates.items()}
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"embedded model, fp32, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"decode, {n} new tokens:")
    for k, v in r.items():
        print(f"  {k:28s} {v:7.2f} tok/s")
    print(f"prefill, {len(ids)} tokens in one forward:")
    for k, v in t.items():
        print(f"  {k:28s} {v:7.3f} s")
    base, fwd = r["plain generate"], t["plain forward"]
    print("ratios (target):")
    print(f"  decode neural linear / plain generate   {r['neural linear, 3 layers'] / base:5.3f}x  (>= 0.8)")
    print(f"  decode neural MLP / plain generate      {r['neural MLP, 3 layers'] / base:5.3f}x  (reported)")
    print(f"  decode observer arm / plain generate    {r['observer arm'] / base:5.3f}x")
    print(f"  prefill neural linear / plain forward   {t['neural linear, 3 layers'] / fwd:5.3f}x time  (<= 1.5)")
    print(f"  prefill neural MLP / plain forward      {t['neural MLP, 3 layers'] / fwd:5.3f}x time  (reported)")
    print(f"  prefill observer arm / plain forward    {t['observer arm'] / fwd:5.3f}x time")


if __name__ == "__main__":
    main()
