"""Context rot: does a long reply stay grounded in its source as it grows? (seed 003's untested claim)

README table: "Context rot: source ablation and the source-attention curve (seed 003)".
Running time: 489 s with one thread for the trained-arm comparison (README); the full 3-condition run longer.

    python -m studies.context_rot [--protocol context_rot] [--items 3] [--max-new-tokens 200]
        [--arms observer "partial_attention:linkage=1"] [--conditions real random none] [--out FILE.json]

For every protocol item and source condition, all arms answer the item's first turn in one batched
dialogue (greedy), and each reply is scored against the *real* source (system prompt + first user
message) with the `source_grounding` scorer: entity precision, and adherence to the item's
checkable instructions at the reply's start vs its end. The source conditions are the seed's
source ablation: `real` (the protocol's system prompt), `random` (random tokens of the same
length in its place), `none` (no system prompt). With the real source, a capture (engine/capture.py,
the Inspect curve) measures each arm's self-attention mass on the source for the rows that generate
the reply's first vs last `--window` tokens, averaged over layers and heads; for a partial-attention
arm, also its branch's share of the attention output norm (read traces).

`summarise(records)` gives means with bootstrap intervals (clustered by item) per arm, and per
non-observer arm the paired difference to the observer; `format_summary` prints them. Reusable:
`ablated_system`, `run_context_rot`, `summarise`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine import Dialogue, LoadedModel, parse_arm
from experiments.protocol import Protocol, get_protocol, load_protocol
from experiments.scoring import score_dialogue
from experiments.stats import bootstrap_ci

CONDITIONS = ("real", "random", "none")
METRICS = (
    "entity_precision",
    "entity_precision_start",
    "entity_precision_end",
    "adherence_start",
    "adherence_end",
    "adherence_drift",
    "source_mass_start",
    "source_mass_end",
    "source_mass_drift",
    "branch_share_start",
    "branch_share_end",
)


def ablated_system(tokenizer, system: Optional[str], condition: str, seed: int = 0) -> Optional[str]:
    """The system prompt under a source condition: the real one, random tokens of the same length, or none."""
    if condition == "real" or system is None:
        return system
    if condition == "none":
        return None
    if condition != "random":
        raise ValueError(f"unknown source condition '{condition}'; use one of {', '.join(CONDITIONS)}")
    n = len(tokenizer(system, add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    ids = [i for i in torch.randint(0, len(tokenizer), (3 * n,), generator=g).tolist() if i not in special][:n]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _window_mean(values: np.ndarray, window: int, end: bool) -> Optional[float]:
    if values is None or values.size == 0:
        return None
    k = min(window, max(1, values.shape[-1] // 2))
    part = values[..., -k:] if end else values[..., :k]
    return float(np.mean(part))


def _branch_share(traces, reply_start: int, n: int, window: int) -> tuple[Optional[float], Optional[float]]:
    """Mean branch share (over layers) of the rows generating the reply's first / last `window` tokens."""
    by_pos: dict[int, list[float]] = {}
    for t in traces:
        if "branch_share" in t.scalars:
            by_pos.setdefault(t.position, []).append(t.scalars["branch_share"])
    rows = [reply_start - 1 + j for j in range(n)]  # the row behind generated token j
    vals = np.array([np.mean(by_pos[r]) if r in by_pos else np.nan for r in rows])
    if np.all(np.isnan(vals)):
        return None, None
    k = min(window, max(1, n // 2))
    return float(np.nanmean(vals[:k])), float(np.nanmean(vals[-k:]))


def run_context_rot(
    lm: LoadedModel,
    protocol: Protocol,
    arms: list[str],
    *,
    items: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    conditions=CONDITIONS,
    window: int = 50,
    n_words: int = 60,
    curves: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    on_records: Optional[Callable[[list[dict]], None]] = None,
) -> list[dict]:
    """One record per (item, condition, arm): the reply's scores against the real source, and with
    the real source the source-attention mass (and branch share) at the reply's start vs end.
    `on_records(records)` is called after every (item, condition) with all records so far."""
    specs = [parse_arm(a) for a in arms]
    labels = [s.display_label for s in specs]
    if len(set(labels)) < len(labels):  # e.g. two gains at λ=1: records are grouped by label, so use the specs
        labels = [s.display_label if s.mechanism is None else s.to_string(False) for s in specs]
    n_tokens = max_new_tokens or protocol.max_new_tokens or 200
    opts = {**protocol.scorer_options("source_grounding"), "n_words": n_words}
    records = []
    chosen = protocol.items[:items] if items else protocol.items
    for k, item in enumerate(chosen):
        item_id = str(item.get("id", k))
        user = protocol.render_turns(item)[0]
        real = protocol.render_system(item)
        for cond in conditions:
            t0 = time.perf_counter()
            system = ablated_system(lm.tokenizer, real, cond, seed=k)
            d = Dialogue(lm, specs, system=system)
            replies = d.send(user, max_new_tokens=n_tokens)
            cap = None
            if curves and cond == "real":
                from engine.capture import capture_turn

                cap = capture_turn(
                    lm, specs, [(user, [r.token_ids for r in replies])], system, attention=False, curves=True
                )
            for i, (spec, reply) in enumerate(zip(specs, replies)):
                data = score_dialogue("source_grounding", item, [reply.text], **opts).turns[0]["data"]
                rec = {
                    "item": item_id,
                    "condition": cond,
                    "arm": labels[i],
                    "spec": spec.to_string(False),
                    "n_tokens": len(reply.token_ids),
                    "text": reply.text,
                    **data,
                }
                if cap is not None and cap.source_curves[i] is not None:
                    curve = cap.source_curves[i].mean(0)  # [n_reply] mass on the source, mean over layers
                    rec["source_mass_start"] = _window_mean(curve, window, end=False)
                    rec["source_mass_end"] = _window_mean(curve, window, end=True)
                    rec["source_mass_drift"] = rec["source_mass_end"] - rec["source_mass_start"]
                    rec["source_curve"] = np.round(curve, 5).tolist()
                    start = cap.arms[i].reply_spans[0][0]
                    rec["branch_share_start"], rec["branch_share_end"] = _branch_share(
                        cap.traces[i][0], start, len(reply.token_ids), window
                    )
                records.append(rec)
            if on_records:
                on_records(records)
            if progress:
                progress(
                    f"item {item_id} ({k + 1}/{len(chosen)}), source {cond}: "
                    f"{n_tokens} tokens x {len(specs)} arms in {time.perf_counter() - t0:.0f} s"
                )
    return records


def _ci(values, clusters) -> Optional[list]:
    pairs = [(v, c) for v, c in zip(values, clusters) if v is not None and not np.isnan(v)]
    if not pairs:
        return None
    est, lo, hi = bootstrap_ci([v for v, _ in pairs], clusters=[c for _, c in pairs], n_boot=2000)
    return [round(est, 4), round(lo, 4), round(hi, 4), len(pairs)]


def summarise(records: list[dict]) -> dict:
    """Per condition and arm: every metric's mean [estimate, low, high, n] (95 % bootstrap over items);
    per non-observer arm, the paired difference arm - observer; per arm, the source sensitivity
    (entity precision with the real source - with random / no source)."""
    out: dict = {"by_arm": {}, "vs_observer": {}, "source_sensitivity": {}}
    conds = sorted({r["condition"] for r in records}, key=lambda c: CONDITIONS.index(c) if c in CONDITIONS else 9)
    arms = list(dict.fromkeys(r["arm"] for r in records))
    for cond in conds:
        for arm in arms:
            rows = [r for r in records if r["condition"] == cond and r["arm"] == arm]
            out["by_arm"][f"{cond} / {arm}"] = {
                m: _ci([r.get(m) for r in rows], [r["item"] for r in rows])
                for m in METRICS
                if any(r.get(m) is not None for r in rows)
            }
        base = {r["item"]: r for r in records if r["condition"] == cond and r["arm"] == "observer"}
        for arm in arms:
            if arm == "observer" or not base:
                continue
            rows = [r for r in records if r["condition"] == cond and r["arm"] == arm and r["item"] in base]
            diffs = {}
            for m in METRICS:
                vals = [
                    None if r.get(m) is None or base[r["item"]].get(m) is None else r[m] - base[r["item"]][m]
                    for r in rows
                ]
                ci = _ci(vals, [r["item"] for r in rows])
                if ci:
                    diffs[m] = ci
            out["vs_observer"][f"{cond} / {arm} - observer"] = diffs
    for arm in arms:
        real = {r["item"]: r for r in records if r["condition"] == "real" and r["arm"] == arm}
        for cond in conds:
            if cond == "real":
                continue
            rows = [r for r in records if r["condition"] == cond and r["arm"] == arm and r["item"] in real]
            vals = [
                None
                if r.get("entity_precision") is None or real[r["item"]].get("entity_precision") is None
                else real[r["item"]]["entity_precision"] - r["entity_precision"]
                for r in rows
            ]
            ci = _ci(vals, [r["item"] for r in rows])
            if ci:
                out["source_sensitivity"][f"{arm}: real - {cond}"] = ci
    return out


def format_summary(summary: dict) -> str:
    lines = ["metric means: estimate [95% bootstrap interval over items] (n)"]
    for key, metrics in summary["by_arm"].items():
        lines.append(f"  {key}")
        for m, (est, lo, hi, n) in metrics.items():
            lines.append(f"    {m:24s} {est:7.3f} [{lo:7.3f}, {hi:7.3f}] ({n})")
    if summary["vs_observer"]:
        lines.append("paired differences, arm - observer (same item, same source condition)")
        for key, metrics in summary["vs_observer"].items():
            lines.append(f"  {key}")
            for m, (est, lo, hi, n) in metrics.items():
                lines.append(f"    {m:24s} {est:+7.3f} [{lo:+7.3f}, {hi:+7.3f}] ({n})")
    if summary["source_sensitivity"]:
        lines.append("source sensitivity: entity precision with the real source minus with the ablated one")
        for key, (est, lo, hi, n) in summary["source_sensitivity"].items():
            lines.append(f"  {key:48s} {est:+7.3f} [{lo:+7.3f}, {hi:+7.3f}] ({n})")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", default="context_rot", help="shipped protocol name or a YAML file")
    ap.add_argument("--arms", nargs="+", default=["observer", "partial_attention:linkage=1"])
    ap.add_argument("--items", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--window", type=int, default=50, help="tokens counted as the reply's start / end")
    ap.add_argument("--out", default=None, help="write records and summary as JSON here")
    args = ap.parse_args(argv)
    from engine import load_model
    from engine.spec import SpecError

    try:
        protocol = (
            load_protocol(args.protocol) if args.protocol.endswith((".yaml", ".yml")) else get_protocol(args.protocol)
        )
        [parse_arm(a) for a in args.arms]
    except (SpecError, ValueError) as e:
        raise SystemExit(f"error: {str(e).splitlines()[0]}")
    lm = load_model(verbose=False)
    t0 = time.perf_counter()

    def save(records):
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"records": records, "summary": summarise(records)}, indent=1))

    records = run_context_rot(
        lm,
        protocol,
        args.arms,
        items=args.items,
        max_new_tokens=args.max_new_tokens,
        conditions=args.conditions,
        window=args.window,
        progress=lambda m: print(m, flush=True),
        on_records=save,
    )
    summary = summarise(records)
    print(
        f"{protocol.name}: {args.items} items x {len(args.conditions)} source conditions x {len(args.arms)} arms, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(format_summary(summary))


if __name__ == "__main__":
    main()
