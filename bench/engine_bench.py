"""Engine speed, as ratios measured in one run on the embedded model (fp32, CPU, greedy).

    python -m bench.engine_bench [--new-tokens 128] [--reps 3]

Every configuration generates exactly N new tokens from the same prompt (end-of-turn is ignored
for the timing, as `generate(min_new_tokens=N)` does), repetitions are interleaved so that a
slow moment of the machine hits every configuration alike, and the median is reported.
Targets (issue 2): linkage-0 arm >= 0.97x plain `generate`; continuity on 3 layers at linkage 1
>= 0.85x; 2 arms batched >= 1.7x aggregate, 4 arms >= 2.8x; next-turn time to first token after
~1000 tokens of dialogue <= 1 s; warm model load <= 3 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine import Dialogue, load_model, parse_arm
from engine.chat import first_turn
from engine.hooks import MechanismHost

PROMPT = (
    "Take a firm stance, in a few sentences, on whether cities should ban private cars from their centres, "
    "then give the strongest arguments for your view."
)


def plain_generate(lm, n: int, batch: int = 1, *, system: str | None = None, prompt: str = PROMPT) -> float:
    """Aggregate tok/s of transformers `generate` on the unhooked model (`batch` copies of the prompt)."""
    MechanismHost.of(lm.model).remove_hooks()
    ids = torch.tensor([first_turn(lm.tokenizer, system, prompt).token_ids] * batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == n
    return n * batch / elapsed


def engine_generate(lm, arms: list[str], n: int, *, system: str | None = None, prompt: str = PROMPT) -> float:
    """Aggregate tok/s of one batched turn of `arms`."""
    d = Dialogue(lm, [parse_arm(a) for a in arms], system=system)
    d.eos_ids = set()  # time exactly n tokens per arm, like min_new_tokens
    start = time.perf_counter()
    replies = d.send(prompt, max_new_tokens=n)
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == n for r in replies)
    return n * len(arms) / elapsed


def next_turn_ttft(lm, arm: str, history_tokens: int = 1000) -> tuple[int, float]:
    """Build ~history_tokens of dialogue (teacher-forced replies), then time the next turn's first token."""
    d = Dialogue(lm, [parse_arm(arm)])
    filler = lm.tokenizer(
        "The argument continues with another careful point about the city and its streets. ", add_special_tokens=False
    )["input_ids"]
    turn = 0
    while d.arms[0].length < history_tokens:
        reply = (filler * 20)[:180] + [lm.tokenizer.eos_token_id]
        d.teacher_force(f"Point number {turn}, please.", [reply])
        turn += 1
    reply = d.send("Now summarise your position in one sentence.", max_new_tokens=1)[0]
    return d.arms[0].length, reply.ttft_s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    n = args.new_tokens

    load_model(verbose=False)  # make sure the cache exists before timing a warm load
    t = time.perf_counter()
    lm = load_model(verbose=False)
    warm_load = time.perf_counter() - t

    continuity = "continuity:linkage=1,gain=0.3,layers=15/22/28"
    configs = {
        "plain generate": lambda: plain_generate(lm, n),
        "plain generate, batch 2": lambda: plain_generate(lm, n, batch=2),
        "plain generate, batch 4": lambda: plain_generate(lm, n, batch=4),
        "4 observer arms batched": lambda: engine_generate(lm, ["observer"] * 4, n),
        "observer arm": lambda: engine_generate(lm, ["observer"], n),
        "continuity linkage 0": lambda: engine_generate(lm, ["continuity:linkage=0"], n),
        "continuity linkage 1 (3 layers)": lambda: engine_generate(lm, [continuity], n),
        "2 arms batched": lambda: engine_generate(lm, ["observer", continuity], n),
        "4 arms batched": lambda: engine_generate(
            lm, ["observer", continuity, "continuity:linkage=0.5", "continuity:linkage=1,source=all"], n
        ),
    }
    engine_generate(lm, ["observer"], 8)  # warm-up
    plain_generate(lm, 8)
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.reps):
        for name, fn in configs.items():
            rates[name].append(fn())
    med = {k: statistics.median(v) for k, v in rates.items()}
    length, ttft = next_turn_ttft(lm, continuity)

    base, one = med["plain generate"], med["observer arm"]
    print(f"embedded model, fp32, {torch.get_num_threads()} threads, {n} new tokens, median of {args.reps}")
    for k, v in med.items():
        print(f"  {k:34s} {v:6.2f} tok/s")
    print("ratios (target):")
    print(f"  linkage-0 arm / plain generate      {med['continuity linkage 0'] / base:5.3f}x  (>= 0.97)")
    print(f"  observer arm / plain generate       {one / base:5.3f}x")
    print(f"  continuity 3 layers / plain         {med['continuity linkage 1 (3 layers)'] / base:5.3f}x  (>= 0.85)")
    print(f"  2 arms batched / 1 arm (aggregate)  {med['2 arms batched'] / one:5.3f}x  (>= 1.7)")
    print(f"  4 arms batched / 1 arm (aggregate)  {med['4 arms batched'] / one:5.3f}x  (>= 2.8; 3 of them linked)")
    print(f"  4 observer arms / 1 arm             {med['4 observer arms batched'] / one:5.3f}x")
    print(f"  reference: generate batch 2 / 1     {med['plain generate, batch 2'] / base:5.3f}x  (what this CPU gives)")
    print(f"  reference: generate batch 4 / 1     {med['plain generate, batch 4'] / base:5.3f}x  (what this CPU gives)")
    print(
        f"  2 arms batched / generate batch 2   {med['2 arms batched'] / med['plain generate, batch 2']:5.3f}x  "
        "(same batch, aggregate)"
    )
    print(
        f"  4 arms batched / generate batch 4   {med['4 arms batched'] / med['plain generate, batch 4']:5.3f}x  "
        "(same batch, aggregate)"
    )
    print(f"  next-turn TTFT after {length} tokens    {ttft:5.3f} s   (<= 1)")
    print(f"  warm model load                     {warm_load:5.3f} s   (<= 3)")


if __name__ == "__main__":
    main()
