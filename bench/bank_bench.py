"""Memory bank speed, measured in one run on the embedded model (fp32, CPU, greedy).

    python -m bench.bank_bench [--new-tokens 64] [--reps 3] [--threads 1]

- Decode: tok/s of a bank on 4 layers (1024 slots, 16 chapters, top-4, prefix-mean routing) at
  linkage 1 against plain transformers `generate` on the unhooked model, and the same bank at
  linkage 0 (target: bank / plain >= 0.85x); and the shipped bank reader (`@bank_reader_match_long`:
  LoRA read, similarity match, 12-token query window) over a bank distilled from data/facts'
  document on its layers, the positive control's arm. Repetitions are interleaved; medians reported.
- Training: median optimizer-step time of `engine.train` (batch 8, sequences of <= 48 tokens of
  the fact set, the 4-layer bank of configs/bank_tiny_cpu.yaml), and the plain forward+backward of
  the frozen model on the same batch for reference.
- Distill: a 2,000-token document into a per-layer bank on 4 layers (target <= 3 s).
The shared 2-core machine runs faster on one intra-op thread (--threads 1, the default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.engine_bench import engine_generate, plain_generate

BANK = "memory_bank:linkage=1,layers=8/14/20/26,slots=1024,chapters=16,top_k=4,routing=prefix_mean"
FACTS = Path(__file__).resolve().parents[1] / "data" / "facts"
READER = Path(__file__).resolve().parents[1] / "weights" / "bank_reader_match_long.safetensors"


def reader_arm(lm) -> str:
    """The positive control's arm: data/facts' document distilled on the reader's layers (to a
    temporary file), read through the shipped reader; both files named by path in the spec."""
    from engine.distill import distill
    from engine.weights import read_header

    doc = Path(tempfile.mkdtemp(prefix="bank_bench_reader_")) / "facts.safetensors"
    layers = "/".join(str(layer) for layer in read_header(READER).settings["layers"])
    distill(lm, (FACTS / "document.txt").read_text(), f"memory_bank:layers={layers}", out=doc)
    return f'memory_bank:linkage=1,weights="{doc}",reader="{READER}"'


def train_step_time(lm, steps: int) -> float:
    from engine.train import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="bank_bench_"))
    cfg = TrainConfig(
        mechanism={
            "name": "memory_bank",
            "settings": {"layers": [8, 14, 20, 26], "slots": 128, "chapters": 4, "top_k": 2, "gate_init": 0.0},
        },
        data={"train": str(FACTS / "train.jsonl"), "eval": str(FACTS / "heldout.jsonl"), "max_length": 48},
        train={
            "max_steps": steps,
            "batch_size": 8,
            "eval_every": 10_000,
            "lr": 0.01,
            "threads": torch.get_num_threads(),
        },
        output={"dir": str(tmp)},
    )
    return train(cfg, progress=False, log=lambda *_: None, lm=lm)["median_step_s"]


def distill_time(lm, n_tokens: int = 2000) -> tuple[int, float, float, float]:
    """(tokens, distill wall s, of which the model's read s, a plain full forward of the same tokens s)."""
    from engine.distill import distill

    text = (FACTS / "document.txt").read_text()
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    doc = lm.tokenizer.decode((ids * (n_tokens // len(ids) + 1))[:n_tokens])
    out = Path(tempfile.mkdtemp(prefix="bank_bench_")) / "d.safetensors"
    t = time.perf_counter()
    r = distill(lm, doc, "memory_bank:layers=8/14/20/26,chapters=16,top_k=4", out=out)
    total = time.perf_counter() - t
    ids = lm.tokenizer(doc, add_special_tokens=False)["input_ids"]
    t = time.perf_counter()
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    return r["tokens"], total, r["read_s"], time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--only", choices=["decode", "distill", "train"], default=None, help="run one part")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from engine import load_model

    lm = load_model(verbose=False)
    n = args.new_tokens
    configs = {
        "plain generate": lambda: plain_generate(lm, n),
        "bank linkage 1 (4 layers)": lambda: engine_generate(lm, [BANK], n),
        "bank linkage 0": lambda: engine_generate(lm, [BANK.replace("linkage=1", "linkage=0")], n),
    }
    if args.only in (None, "decode"):
        reader = reader_arm(lm)
        configs["distilled bank + reader"] = lambda: engine_generate(lm, [reader], n)
    result: dict = {}
    print(f"embedded model, fp32, {torch.get_num_threads()} thread(s)")
    if args.only in (None, "decode"):
        engine_generate(lm, [BANK], 4)  # warm-up (builds the bank, fills its K/V cache)
        engine_generate(lm, [reader], 4)
        plain_generate(lm, 4)
        rates: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(args.reps):
            for name, fn in configs.items():
                rates[name].append(fn())
        med = result["tok_s"] = {k: statistics.median(v) for k, v in rates.items()}
        print(f"decode, {n} new tokens, median of {args.reps}:")
        for k, v in med.items():
            print(f"  {k:30s} {v:6.2f} tok/s")
        print(
            f"  bank 4 layers / plain generate   {med['bank linkage 1 (4 layers)'] / med['plain generate']:5.3f}x  "
            f"(>= 0.85)   [{BANK.split(':', 1)[1]}]"
        )
        print(f"  bank linkage 0 / plain generate  {med['bank linkage 0'] / med['plain generate']:5.3f}x")
        print(
            f"  bank + reader / plain generate   {med['distilled bank + reader'] / med['plain generate']:5.3f}x  "
            f"[data/facts' document distilled, reader={READER.name}]"
        )
    if args.only in (None, "distill"):
        tokens, total, read, plain = result["distill"] = distill_time(lm)
        print(
            f"  distill {tokens} tokens, 4 layers  {total:5.2f} s   (<= 3); of which the model's read to layer 26 "
            f"{read:5.2f} s; a plain 30-layer forward of the same tokens {plain:5.2f} s"
        )
    if args.only in (None, "train"):
        step_s = result["train_step_s"] = train_step_time(lm, args.train_steps)
        print(f"  train step (batch 8, <=48 tok)   {step_s:5.2f} s   median of {args.train_steps} steps")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
