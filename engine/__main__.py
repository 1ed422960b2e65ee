"""Command line: `python -m engine {prepare,generate,probe,mechanisms,train,distill}`.

    python -m engine generate --prompt "Is it ever right to lie?" --arm observer \
        --arm continuity:linkage=1,gain=0.3,layers=15/22/28 --max-new-tokens 64 --greedy --json
    python -m engine probe --prompt "..." --arm continuity:linkage=1 --json

Mistakes (unknown mechanism, linkage 7, layer 99 on a 30-layer model, a bad key, a missing
model) exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line too (and still exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="convert the embedded model once (make setup runs this)")
    sub.add_parser("mechanisms", help="list mechanisms and their settings")

    def common(sp):
        sp.add_argument("--prompt", required=True, help="one user message (chat template applied)")
        sp.add_argument("--system", default=None, help="system prompt")
        sp.add_argument("--model", default=None, help="'embedded' (default), a local folder, or a cached HF id")
        sp.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
        sp.add_argument("--load-in-4bit", action="store_true", help="quantise with bitsandbytes nf4")
        sp.add_argument("--max-new-tokens", type=int, default=None)
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    g = sub.add_parser("generate", help="one message to several arms, batched")
    common(g)
    g.add_argument("--arm", action="append", required=True, help="observer | NAME:key=value,... (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed for every arm (overrides spec seeds)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding for every arm")
    g.add_argument("--traces", action="store_true", help="include read traces in --json output")
    g.add_argument(
        "--window",
        type=int,
        default=None,
        help="attention window in tokens: every arm sees the first few (sink) plus the last N",
    )

    pr = sub.add_parser("probe", help="logit-delta probe of an arm against the observer")
    common(pr)
    pr.add_argument("--arm", required=True)
    pr.add_argument(
        "--mode",
        choices=["teacher-forced", "seed"],
        default="teacher-forced",
        help="teacher-forced: over the arm's reply, chat template, cached (default); seed: the seed's "
        "probe - raw prompt, last position, one uncached pass, the seed's gain 0.3 unless set",
    )

    t = sub.add_parser("train", help="train a mechanism's weights from a YAML config (see engine/train.py)")
    t.add_argument("config", help="YAML config")
    t.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'auto'")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    di = sub.add_parser("distill", help="a memory bank from a document, no training (see engine/distill.py)")
    di.add_argument("document", help="UTF-8 text file")
    di.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    di.add_argument("--model", default=None, help="'embedded' (default), a local folder, or a cached HF id")
    di.add_argument(
        "--arm",
        default=None,
        help="memory_bank settings, e.g. 'memory_bank:layers=8/20,chapters=4' (default memory_bank:sharing=per_layer)",
    )
    di.add_argument(
        "--method",
        default="tokens",
        choices=["tokens", "chunks", "kmeans"],
        help="slots = the tokens' x̂ (default), chunk means, or k-means centroids per chapter",
    )
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def warn_caveats(specs) -> None:
    """One `warning:` line on stderr per arm that must not be read as memory (`ArmSpec.caveat`)."""
    for s in specs:
        if s.caveat:
            print(f"warning: arm {s.to_string(False)}: {s.caveat}", file=sys.stderr)


def _list_mechanisms() -> int:
    from .mechanisms import MECHANISMS

    for name, cls in MECHANISMS.items():
        print(name)
        for key, f in cls.Settings.model_fields.items():
            print(f"  {key:12s} default={f.default!r:12s} {f.description or ''}")
    return 0


def _arm_specs(args) -> list:
    """The arms of `generate` / `probe`, checked (with the prompt) before the model loads, so a
    mistake costs nothing; SpecError or DialogueError with one line."""
    from .dialogue import check_message
    from .spec import SpecError, parse_arm

    specs = [parse_arm(a) for a in (args.arm if isinstance(args.arm, list) else [args.arm])]
    if args.command == "generate":
        specs = [
            s.with_sampling(
                **({"greedy": True} if args.greedy else {}), **({"seed": args.seed} if args.seed is not None else {})
            )
            for s in specs
        ]
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SpecError("--max-new-tokens must be at least 1")
    if getattr(args, "window", None) is not None and args.window < 1:
        raise SpecError("--window must be at least 1 token")
    check_message(args.prompt, "--prompt")
    if args.system is not None:
        check_message(args.system, "--system", limit=None, allow_empty=True)
    return specs


def _probe(lm, spec, args) -> int:
    """`probe`: the seed's probe (raw prompt, last position) or the teacher-forced logit-delta probe."""
    from .probes import logit_delta_probe, seed_probe

    if args.mode == "seed":
        result = seed_probe(lm, spec, args.prompt)
        if args.json:
            print(json.dumps({"model": lm.identity.to_dict(), **result}))
        else:
            print(
                f"seed probe: arm {result['arm']} vs observer, last position of the raw prompt "
                f"({result['n_prompt_tokens']} tokens, uncached)"
            )
            for key in ("max_abs_dlogit", "mean_abs_dlogit", "kl"):
                print(f"  {key:16s} {result[key]:.4f}")
            print(f"  on-path calls    {result['on_path_calls']}")
        return 0
    result = logit_delta_probe(lm, spec, args.prompt, args.system, max_new_tokens=args.max_new_tokens or 48)
    if args.json:
        print(json.dumps({"model": lm.identity.to_dict(), **result}))
    else:
        print(f"arm {result['arm']} vs observer over {result['n_positions']} reply tokens")
        for key in ("max_abs_dlogit", "mean_abs_dlogit", "kl_mean", "kl_max", "top1_agreement"):
            print(f"  {key:16s} {result[key]:.4f}")
        print(f"  on-path calls    {result['on_path_calls']}")
    return 0


def _print_replies(args, lm, specs, d, replies) -> None:
    """`generate`'s output: one JSON object, or each arm's reply under a header line."""
    if args.json:
        arms = []
        for spec, arm, r in zip(specs, d.arms, replies):
            item = {
                "spec": spec.to_string(),
                "label": spec.display_label,
                "text": r.text,
                "token_ids": r.token_ids,
                "finish_reason": r.finish_reason,
                "duration_s": round(r.duration_s, 4),
                "on_path_calls": {} if arm.mechanism is None else dict(arm.mechanism.call_counts),
            }
            if args.traces:
                item["traces"] = [t.to_dict() for t in r.traces]
            arms.append(item)
        print(json.dumps({"model": lm.identity.to_dict(), "arms": arms}))
    else:
        for spec, r in zip(specs, replies):
            print(f"== {spec.display_label}  [{spec.to_string()}]  ({len(r.token_ids)} tokens, {r.finish_reason})")
            print(r.text.strip() + "\n")


def main(argv: list[str] | None = None) -> int:
    """Dispatch one subcommand."""
    args = _parser().parse_args(argv)
    if args.command == "train":
        from .train import main as train_main

        return train_main(args)
    if args.command == "distill":
        from .distill import main as distill_main

        return distill_main(args)
    if args.command == "mechanisms":
        return _list_mechanisms()
    if args.command == "prepare":
        from .model import ensure_embedded_cache

        print(f"embedded model ready at {ensure_embedded_cache()}")
        return 0
    from .dialogue import Dialogue, DialogueError
    from .model import ModelLoadError, load_model
    from .spec import SpecError

    try:
        specs = _arm_specs(args)
    except (SpecError, DialogueError) as e:
        return _fail(str(e))
    try:
        lm = load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit, verbose=not args.json)
        for s in specs:
            s.validate_for(lm.config.num_hidden_layers)
        warn_caveats(specs)
        if args.command == "probe":
            return _probe(lm, specs[0], args)
        d = Dialogue(lm, specs, system=args.system, record_traces=args.traces, window=args.window)
        replies = d.send(args.prompt, max_new_tokens=args.max_new_tokens)
    except (SpecError, DialogueError, ModelLoadError) as e:
        return _fail(str(e))
    _print_replies(args, lm, specs, d, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
