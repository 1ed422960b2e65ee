"""Does partial attention keep a system-prompt constraint at the end of a long reply? (README
"Positive controls", row "partial attention, constraint task")

    python -m studies.constraint_end [--weights @constraint_palm] [--items 60] [--threads 1]   # ~5 min, 2 cores
    python -m studies.constraint_end --items 60 --window 64 --weights @constraint_palm_window   # ~25 min (row "window 64")

Held-out items (studies/data/constraint_end/test.jsonl): the system prompt's last rule is "End
every reply with the line 'Signed, <name> of <town>.'" with a name never seen in training. Each
arm is teacher-forced the same long reply (~150 tokens of description) and then "Signed,"; at
that point we measure the sign-off name's log-probability, the right-minus-wrong margin against
another item's sign-off, and adherence: whether greedy decoding from there writes the right name
(every name token the arm's top-1, read off the same teacher-forced logits). Arms:

- observer; the untrained branch with the trained arm's settings (cloned projections, zero
  adapters: the layer's own attention restricted to the source, added once more);
- the trained branch (`python -m engine train configs/constraint_palm_tiny_cpu.yaml`);
- other source (negative control): the trained branch reading another item's system prompt
  (`text=...`), the right one still in context;
- noise matched to the trained arm (`noise:match=...`).

95% intervals: item bootstrap; differences paired with the observer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .common import reply_logprob, study_args, test_items
from .constraint_data import OUT as DATA

SETTINGS = "layers=20/24/28,fp=true,fp_dim=32,lang_emb=true,lora_rank=8,lora_alpha=16"


def untrained_settings(weights: str) -> str:
    """The trained file's own settings as a spec (an untrained branch with exactly its settings)."""
    from engine.weights import read_header, resolve_path

    settings = read_header(resolve_path(weights)).settings
    keep = {k: v for k, v in settings.items() if k in _SPEC_KEYS and v is not None}
    return ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else str(v).lower()}" for k, v in keep.items())


_SPEC_KEYS = ("layers", "gain", "fp", "fp_dim", "lang_emb", "lora_rank", "lora_alpha")


def arms_for(weights: str, other_source: str, untrained: str = SETTINGS) -> list[tuple[str, str]]:
    trained = f"partial_attention:linkage=1,weights={weights}"
    other = other_source.replace('"', "'")
    return [
        ("observer", "observer"),
        ("untrained", f"partial_attention:linkage=1,{untrained},label=untrained"),
        ("trained", trained + ",label=trained"),
        ("other source", trained + f',text="{other}",label=other source'),
        ("noise matched", f'noise:match="{trained}",label=noise matched'),
    ]


def _add_args(ap) -> None:
    ap.add_argument("--weights", default="@constraint_palm", help="trained partial-attention weights")
    ap.add_argument(
        "--window",
        type=int,
        default=None,
        help="attention window in tokens (sink + last N): the system prompt falls out of the observer's view",
    )
    ap.add_argument("--chunk", type=int, default=8, help="with --window: the forced reply is fed in passes of C tokens")


def main(argv=None) -> None:
    args = study_args(
        __doc__,
        argv,
        60,
        _add_args,
    )

    from engine import load_model, parse_arm
    from engine.dialogue import Dialogue
    from experiments.stats import bootstrap_ci

    lm = load_model(verbose=False)
    tok = lm.tokenizer
    items = test_items(DATA, args.items)
    untrained = untrained_settings(args.weights)
    print(f"untrained control: partial_attention:linkage=1,{untrained}")
    t0 = time.perf_counter()
    rows = []
    for i, it in enumerate(items):
        other = items[(i + 1) % len(items)]["messages"][0]["content"]
        arms = arms_for(args.weights, other, untrained)
        specs = [parse_arm(s) for _, s in arms]
        system, user = it["messages"][0]["content"], it["messages"][1]["content"]
        prefix = tok(it["body"] + "\n\nSigned,", add_special_tokens=False)["input_ids"]
        right = tok(" " + it["signoff"], add_special_tokens=False)["input_ids"]
        wrong = tok(" " + it["wrong"], add_special_tokens=False)["input_ids"]
        replies = [prefix + right, prefix + wrong]
        d = Dialogue(lm, [s for s in specs for _ in (0, 1)], system=system, window=args.window)
        logits = d.teacher_force(user, replies * len(specs), chunk=args.chunk if args.window else None)
        for k, (name, _) in enumerate(arms):
            out = []
            for j, target in enumerate((right, wrong)):
                lg = logits[2 * k + j][len(prefix) :].float()
                out.append((reply_logprob(lg, target), bool((lg.argmax(-1) == torch.tensor(target)).all())))
            rows.append(
                {
                    "item": it["id"],
                    "arm": name,
                    "logp_right": out[0][0],
                    "logp_wrong": out[1][0],
                    "margin": out[0][0] - out[1][0],
                    "adheres": out[0][1],
                }
            )
    seen = f"window {args.window} (passes of {args.chunk})" if args.window else "full attention"
    print(
        f"{len(items)} items x {len(arms)} arms, reply {len(prefix)}+ tokens, {seen}, in {time.perf_counter() - t0:.0f} s"
    )

    by = {name: [r for r in rows if r["arm"] == name] for name, _ in arms_for("x", "y")}
    obs = by["observer"]
    print(f"\n{len(items)} held-out items; 95% item-bootstrap intervals; differences paired with the observer")
    print(
        f"{'arm':14s} {'adherence':>20s} {'adh. - observer':>22s} {'margin right-wrong':>24s} "
        f"{'margin - observer':>24s}"
    )
    summary = {}
    for name, rs in by.items():
        a = bootstrap_ci(np.array([float(r["adheres"]) for r in rs]))
        da = bootstrap_ci(np.array([float(r["adheres"]) - float(o["adheres"]) for r, o in zip(rs, obs)]))
        m = bootstrap_ci(np.array([r["margin"] for r in rs]))
        dm = bootstrap_ci(np.array([r["margin"] - o["margin"] for r, o in zip(rs, obs)]))
        summary[name] = {"adherence": a, "adherence_minus_observer": da, "margin": m, "margin_minus_observer": dm}
        print(
            f"{name:14s} {a[0]:5.2f} [{a[1]:.2f}, {a[2]:.2f}]   {da[0]:+5.2f} [{da[1]:+.2f}, {da[2]:+.2f}]"
            f"   {m[0]:+6.2f} [{m[1]:+6.2f}, {m[2]:+6.2f}]   {dm[0]:+6.2f} [{dm[1]:+6.2f}, {dm[2]:+6.2f}]"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
