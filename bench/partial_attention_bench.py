"""Decode speed of partial attention to the source, as ratios measured in one run (embedded model, fp32, CPU).

    python -m bench.partial_attention_bench [--new-tokens 64] [--reps 3] [--weights runs/palm_tiny_cpu/palm.safetensors]

Every configuration generates exactly N new tokens after the same system prompt + question
(end-of-turn ignored, as `generate(min_new_tokens=N)` does); repetitions are interleaved so that a
slow moment of the shared machine hits every configuration alike; medians are reported.
Target (issue 11): partial attention on all layers at linkage 1 >= 0.8x plain `generate`.
`--weights FILE` adds a row for an arm loading a trained weights file (e.g. the LoRA-adapted branch
of `configs/palm_tiny_cpu.yaml`: its adapters are merged into the cloned projections once, at load).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import engine_bench
from engine import load_model
from engine.chat import first_turn

SYSTEM = (
    "You are a careful assistant for a city planning office. Always answer in exactly three numbered points. "
    "Never mention specific brand names. Mention the city of Lyon at least once. Keep every point under "
    "thirty words, use British spelling, and end with a one-line summary that starts with 'In short'."
)
PROMPT = "Should cities ban private cars from their centres? Give your view and the strongest arguments."


def plain_generate(lm, n: int) -> float:
    return engine_bench.plain_generate(lm, n, system=SYSTEM, prompt=PROMPT)


def engine_generate(lm, arms: list[str], n: int) -> float:
    return engine_bench.engine_generate(lm, arms, n, system=SYSTEM, prompt=PROMPT)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weights", default=None, help="also time an arm loading this partial-attention weights file")
    args = ap.parse_args(argv)
    n = args.new_tokens
    lm = load_model(verbose=False)
    configs = {
        "plain generate": lambda: plain_generate(lm, n),
        "observer arm": lambda: engine_generate(lm, ["observer"], n),
        "partial attention, all layers": lambda: engine_generate(lm, ["partial_attention:linkage=1"], n),
        "partial attention, all options": lambda: engine_generate(
            lm, ["partial_attention:linkage=1,fp=true,lang_emb=true,bidirectional=true,spe=true"], n
        ),
        "partial attention, pinned text": lambda: engine_generate(
            lm, [f'partial_attention:linkage=1,text="{SYSTEM.replace(chr(39), "")}"'], n
        ),
    }
    if args.weights:
        trained = f'partial_attention:linkage=1,weights="{args.weights}"'
        configs["partial attention, weights file"] = lambda: engine_generate(lm, [trained], n)
        engine_generate(lm, [trained], 4)  # warm-up: the file is read and its adapters merged once
    engine_generate(lm, ["partial_attention:linkage=1"], 4)  # warm-up: the shared cloned weights are built once
    engine_generate(lm, ["partial_attention:linkage=1,fp=true,lang_emb=true,bidirectional=true,spe=true"], 4)
    plain_generate(lm, 4)
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.reps):
        for name, fn in configs.items():
            rates[name].append(fn())
    med = {k: statistics.median(v) for k, v in rates.items()}
    src = len(first_turn(lm.tokenizer, SYSTEM, PROMPT).token_ids)
    base = med["plain generate"]
    print(
        f"embedded model, fp32, {torch.get_num_threads()} threads, prompt {src} tokens, {n} new tokens, "
        f"median of {args.reps}"
    )
    for k, v in med.items():
        print(f"  {k:34s} {v:6.2f} tok/s   {v / base:5.3f}x plain generate")
    print(
        f"target: partial attention, all layers / plain generate >= 0.8  -> "
        f"{med['partial attention, all layers'] / base:5.3f}x"
    )


if __name__ == "__main__":
    main()
