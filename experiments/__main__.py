"""Command line: `python -m experiments {run,list,summary,protocols}`.

    python -m experiments run are_you_sure --arm observer --arm continuity:linkage=1,gain=0.3 \
        --seeds 3 --items 10 [--db lab.db] [--model embedded] [--max-new-tokens 64] [--json]
    python -m experiments run are_you_sure --arm observer --items 10 --ray [ADDRESS] [--actors N]   # on Ray actors
    python -m experiments run --resume RUN_ID            # or the same command again plus --resume RUN_ID
    (the same run command again resumes its unfinished run, or skips a finished one; --new forces a fresh run)
    python -m experiments list [--db URL] [--json]
    python -m experiments summary RUN_ID [--all] [--json] [--judge NAME]
    python -m experiments protocols                      # the shipped protocols
    python -m experiments score SCORER FILE.jsonl [--judge NAME] [--json]   # agreement with labels
    python -m experiments judge-audit FILE.jsonl [FILE ...] [--judge NAME] [--json]  # judge-bias checks
    python -m experiments fit-ensemble DEV.jsonl [DEV ...] [--out FILE]   # fit the ensemble judge on dev splits
    python -m experiments fit-presence FILE.jsonl [...] [--out FILE]    # fit claim_nli's stance-presence veto
    python -m experiments rescore RUN_ID --judge NAME    # stance rows of another judge, side by side
    python -m experiments figures RUN_ID [--out DIR] [--judge NAME] [--format html|png|svg]

Exit status: 0 done; 2 a mistake in the command (malformed protocol, bad arm spec, missing
model, resume with other settings); 1 a database problem (e.g. locked; rows already written
stay); 130 interrupted by Ctrl-C, 143 by SIGTERM (either way the run is marked 'interrupted' and the
resume command is printed).
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
    from experiments.scoring import judge_names, stance_scorer_names

    JUDGES = " | ".join(judge_names())  # noqa: N806 - the registry's names, for the help texts
    p = _Parser(prog="python -m experiments", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) a protocol against arms")
    r.add_argument("protocol", nargs="?", help="protocol YAML path or shipped name (are_you_sure, ...)")
    r.add_argument("--arm", action="append", default=[], help="observer | NAME:key=value,... (repeatable)")
    r.add_argument("--seeds", type=int, default=None, help="seeds per item (default 1)")
    r.add_argument("--items", type=int, default=None, help="first K items (default all)")
    r.add_argument("--max-new-tokens", type=int, default=None, help="default: the protocol's")
    r.add_argument(
        "--window",
        type=int,
        default=None,
        help="attention window in tokens: every arm sees the first few plus the last N (default: the "
        "protocol's, else full attention)",
    )
    r.add_argument("--db", default=None, help="database URL or SQLite path (default $LAB_DB or lab.db)")
    r.add_argument("--model", default=None, help="'embedded' (default), a local folder, or a cached HF id")
    r.add_argument("--dtype", default=None)
    r.add_argument("--name", default=None, help="a name for the run")
    r.add_argument("--resume", default=None, metavar="RUN_ID", help="continue an interrupted run")
    r.add_argument(
        "--new",
        action="store_true",
        help="start a fresh run even if the same command already has a run in the database",
    )
    r.add_argument("--json", action="store_true", help="print the final summary as JSON")
    r.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="play the dialogues on Ray actors: on the cluster at ADDRESS (e.g. auto, ray://host:10001), "
        "or without one on a local instance started for the run",
    )
    r.add_argument(
        "--actors",
        type=int,
        default=None,
        help="with --ray: how many actors, each with the model loaded (default: one per GPU, else per CPU)",
    )

    ls = sub.add_parser("list", help="runs in the database with status and progress")
    ls.add_argument("--db", default=None)
    ls.add_argument("--json", action="store_true")

    s = sub.add_parser("summary", help="per-arm results of a run")
    s.add_argument("run_id")
    s.add_argument("--db", default=None)
    s.add_argument("--all", action="store_true", help="every metric, not only the headline ones")
    s.add_argument("--json", action="store_true")
    s.add_argument("--judge", default=None, help="stance rows of this judge (default: the run's own)")

    sc = sub.add_parser("score", help="score a JSONL of dialogues and print agreement with its labels")
    sc.add_argument("scorer", help=" or ".join(stance_scorer_names()))
    sc.add_argument("file", help='JSONL: one {"turns": [reply, ...], "labels": [label|null, ...]} per line')
    sc.add_argument("--judge", default=None, help=f"stance judge: {JUDGES} (default: nli where installed)")
    sc.add_argument("--judge-model", default=None, help="llm judge: a local model folder (default: embedded)")
    sc.add_argument("--json", action="store_true", help="one summary object (agreement, reversals_caught, ...)")

    ja = sub.add_parser(
        "judge-audit",
        help="judge-bias checks on labelled replies: length, order, paraphrase, "
        "no stance, each beside the overall agreement",
    )
    ja.add_argument("file", nargs="+", help="labelled JSONL file(s) (data/stance_labels format)")
    ja.add_argument("--judge", default=None, help=f"stance judge: {JUDGES} (default: nli where installed)")
    ja.add_argument("--judge-model", default=None, help="llm judge: a local model folder (default: embedded)")
    ja.add_argument("--json", action="store_true", help="one object with every group")

    fe = sub.add_parser("fit-ensemble", help="fit the ensemble stance judge on labelled dev files (never test/holdout)")
    fe.add_argument("file", nargs="+", help="labelled dev JSONL file(s)")
    fe.add_argument("--out", default=None, help="weights JSON (default: data/stance_labels/ensemble.json)")

    fp = sub.add_parser(
        "fit-presence",
        help="fit claim_nli's stance-presence veto on the labelled files splits.json allows (never a blind holdout)",
    )
    fp.add_argument("file", nargs="+", help="labelled real-reply JSONL file(s) named in splits.json 'may_fit'")
    fp.add_argument("--out", default=None, help="weights JSON (default: data/stance_labels/presence.json)")

    rs = sub.add_parser("rescore", help="score a run's stored dialogues again with another stance judge")
    rs.add_argument("run_id")
    rs.add_argument("--judge", required=True, help=JUDGES)
    rs.add_argument("--judge-model", default=None, help="llm judge: a local model folder (default: embedded)")
    rs.add_argument("--db", default=None)
    rs.add_argument("--json", action="store_true")

    fg = sub.add_parser("figures", help="write a run's figures: one HTML page (plotly.js once), PNG and SVG")
    fg.add_argument("run_id")
    fg.add_argument("--out", default=None, help="folder (default: figures-RUN_ID)")
    fg.add_argument("--judge", default=None, help="stance rows of this judge (default: the run's own)")
    fg.add_argument(
        "--format",
        action="append",
        choices=["html", "png", "svg"],
        default=None,
        help="repeatable; default: html, png and svg",
    )
    fg.add_argument("--db", default=None)

    sub.add_parser("protocols", help="list the shipped protocols")
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _open_store(url, create=True):
    from db import Store

    return Store(url, create=create) if url else Store(create=create)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from db.store import StoreError

    try:
        if args.command == "protocols":
            from experiments.protocol import list_protocols

            for p in list_protocols():
                print(f"{p.name:20s} {len(p.items):3d} items  {p.n_turns} turns  scoring: {', '.join(p.scoring)}")
            return 0
        if args.command == "list":
            return _cmd_list(args)
        if args.command == "summary":
            return _cmd_summary(args)
        if args.command == "score":
            return _cmd_score(args)
        if args.command == "rescore":
            return _cmd_rescore(args)
        if args.command == "judge-audit":
            return _cmd_judge_audit(args)
        if args.command == "fit-ensemble":
            return _cmd_fit_ensemble(args)
        if args.command == "fit-presence":
            return _cmd_fit_presence(args)
        if args.command == "figures":
            return _cmd_figures(args)
        return _cmd_run(args)
    except StoreError as e:
        return _fail(str(e), 1)


def _cmd_list(args) -> int:
    from experiments.analysis import list_runs

    store = _open_store(args.db, create=False)
    runs = list_runs(store)
    if args.json:
        print(json.dumps(runs, default=str))
        return 0
    if not runs:
        print("no runs in", store.name)
    for r in runs:
        planned = "?" if r["planned"] is None else r["planned"]
        print(
            f"{r['id']}  {str(r['created_at'])[:19]}  {r['status']:11s} {r['done']}/{planned} dialogues  "
            f"{r['protocol']}  arms: {' | '.join(r['arms'])}"
        )
    return 0


def _cmd_summary(args) -> int:
    from experiments.analysis import format_summary, summary

    store = _open_store(args.db, create=False)
    try:
        s = summary(store, args.run_id, judge=args.judge)
    except ValueError as e:
        return _fail(str(e))
    print(json.dumps(s) if args.json else format_summary(s, all_metrics=args.all))
    return 0


def _cmd_figures(args) -> int:
    from experiments.analysis import export_figures, run_figures

    store = _open_store(args.db, create=False)
    try:
        figs = run_figures(store, args.run_id, judge=args.judge)
    except ValueError as e:
        return _fail(str(e))
    written, problems = export_figures(
        figs,
        args.out or f"figures-{args.run_id[:12]}",
        stem=args.run_id[:12],
        formats=tuple(args.format or ("html", "png", "svg")),
    )
    for path in written:
        print(path)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return 0


def _judge_options(args) -> dict:
    return {"model_path": args.judge_model} if getattr(args, "judge_model", None) and args.judge == "llm" else {}


def _build_judge(args):
    """The judge asked for, loaded now so that a missing package is one line, not a traceback."""
    from experiments.scoring.stance import JudgeUnavailable, get_judge

    try:
        judge = get_judge(args.judge, **_judge_options(args))
        judge.warm()
        return judge
    except KeyError as e:
        raise _CliError(str(e.args[0]))
    except JudgeUnavailable as e:
        raise _CliError(str(e))


class _CliError(Exception):
    pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it is marked 'interrupted' like Ctrl-C."""


def _cmd_score(args) -> int:
    from experiments.scoring import stance_calls, stance_scorer_names
    from experiments.scoring.stance import agreement_counts, item_claim, read_labelled

    if args.scorer not in stance_scorer_names():
        return _fail(f"scorer {args.scorer!r} makes no stance calls; use one of: {', '.join(stance_scorer_names())}")
    if args.judge is not None and args.scorer != "stance_drift":
        return _fail("--judge applies to the stance_drift scorer only")
    try:
        rows = read_labelled(args.file)
        judge = _build_judge(args) if args.scorer == "stance_drift" else None
    except (ValueError, _CliError) as e:
        return _fail(str(e))
    from tqdm import tqdm

    pairs, per_dialogue = [], []
    for row in tqdm(
        rows,
        desc=f"{args.scorer}" + (f" [{judge.name}]" if judge else ""),
        unit="dialogue",
        file=sys.stderr,
        disable=args.json or len(rows) < 20,
    ):
        calls = stance_calls(args.scorer, row["turns"], judge=judge, claim=item_claim(row))
        labels = row["labels"] or [None] * len(calls)
        pairs += [(h, c["label"]) for h, c in zip(labels, calls)]
        per_dialogue.append({"id": row.get("id", f"line {row['line']}"), "calls": calls, "labels": labels})
    result = {
        "scorer": args.scorer,
        "judge": judge.name if judge else None,
        "file": args.file,
        "n_dialogues": len(rows),
        **agreement_counts(pairs),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    for d in per_dialogue:
        for t, (c, h) in enumerate(zip(d["calls"], d["labels"])):
            if h is not None and h != c["label"]:
                print(f"  {d['id']} turn {t + 1}: label {h!r}, judged {c['label']!r} ({c['reason']})")
    name = args.scorer + (f" judge={judge.name}" if judge else "")
    if result["n_labelled"] == 0:
        print(f"{name}: {len(rows)} dialogues scored; the file has no labels to compare with")
        return 0
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(
        f"{name}: agreement {pct(result['agreement'])} ({result['n_agree']}/{result['n_labelled']} labelled replies), "
        f"reversals caught {pct(result['reversals_caught'])} ({result['n_reversed_caught']}/{result['n_reversed']}), "
        f"missing {result['n_missing']}"
    )
    return 0


def _cmd_judge_audit(args) -> int:
    from experiments.judge_audit import audit, format_audit
    from experiments.scoring.stance import read_labelled

    try:
        rows = [row for path in args.file for row in read_labelled(path)]
        judge = _build_judge(args)
        result = audit(rows, judge)
    except (ValueError, _CliError) as e:
        return _fail(str(e))
    result["files"] = list(args.file)
    print(json.dumps(result) if args.json else format_audit(result, args.file))
    return 0


def _cmd_fit_presence(args) -> int:
    import json
    from pathlib import Path

    from experiments.scoring.stance import PRESENCE_FILE, JudgeUnavailable, fit_presence

    splits = PRESENCE_FILE.parent / "splits.json"
    try:
        allowed = set(json.loads(splits.read_text())["may_fit"])
    except (OSError, ValueError, KeyError) as exc:
        return _fail(f"cannot read the list of files judges may be fitted on ({splits}: {exc})")
    refused = [f for f in args.file if Path(f).name not in allowed]
    if refused:
        return _fail(
            f"{refused[0]} is not a split judges may be fitted on (splits.json 'may_fit': {', '.join(sorted(allowed))})"
        )
    try:
        w = fit_presence(args.file, args.out)
    except (ValueError, JudgeUnavailable) as e:
        return _fail(str(e))
    print(
        f"stance presence fitted on {w['n_replies']} sided replies ({w['n_with_stance']} with a stance to a reader) "
        f"of {', '.join(w['fitted_on'])}; weights in {args.out or PRESENCE_FILE}"
    )
    return 0


def _cmd_fit_ensemble(args) -> int:
    from pathlib import Path

    from experiments.scoring.stance import JudgeUnavailable, fit_ensemble

    held_out = [f for f in args.file if any(w in Path(f).name for w in ("test", "holdout"))]
    if held_out:
        return _fail(f"{held_out[0]} looks like a test or holdout split; the ensemble is fitted on dev files only")
    try:
        w = fit_ensemble(args.file, args.out)
    except (ValueError, JudgeUnavailable) as e:
        return _fail(str(e))
    print(
        f"ensemble fitted on {w['n_pairs']} stance pairs of {', '.join(w['fitted_on'])}; classes "
        f"{', '.join(w['classes'])}; weights in {args.out or 'data/stance_labels/ensemble.json'}"
    )
    return 0


def _cmd_rescore(args) -> int:
    from experiments.analysis import rescore_run

    store = _open_store(args.db, create=False)
    store.get_experiment(args.run_id)  # an unknown id: one line (StoreError), before any model loads
    try:
        judge = _build_judge(args)
    except _CliError as e:
        return _fail(str(e))
    from tqdm import tqdm

    bar = tqdm(unit="dialogue", desc=f"rescore [{judge.name}]", file=sys.stderr, disable=args.json)
    out = rescore_run(
        store, args.run_id, judge, progress=lambda done, total: (setattr(bar, "total", total), bar.update(1))
    )
    bar.close()
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"run {args.run_id}: {out['n_rows']} stance rows of judge {judge.name} written as scorer "
            f"{out['scorer']} over {out['n_dialogues']} dialogues ({out['n_missing']} missing calls); "
            f"see them with: python -m experiments summary {args.run_id} --judge {judge.name}"
        )
    return 0


def _cmd_run(args) -> int:
    from engine import DialogueError, ModelLoadError, SpecError
    from experiments.protocol import ProtocolError
    from experiments.runner import RunConfig, RunConfigError, load_run, parse_arms, resolve_protocol, run_protocol

    # 1. everything that needs no model: protocol, arms, numbers
    try:
        for flag in ("seeds", "items", "max_new_tokens", "window"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise RunConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        if args.protocol is None and args.resume is None:
            raise RunConfigError("give a protocol (path or shipped name), or --resume RUN_ID")
        protocol = resolve_protocol(args.protocol) if args.protocol else None
        specs = parse_arms(args.arm) if args.arm else None
        if args.resume is None and specs is None:
            raise SpecError("give at least one --arm, e.g. --arm observer --arm continuity:linkage=1")
    except (ProtocolError, SpecError, RunConfigError) as e:
        return _fail(str(e))

    store = _open_store(args.db)
    if args.resume is not None:
        try:
            stored = load_run(store, args.resume)
        except (ProtocolError, SpecError) as e:
            return _fail(f"run {args.resume} cannot be resumed: {e}")
        config = RunConfig(
            protocol or stored.protocol,
            specs or stored.specs,
            args.seeds if args.seeds is not None else stored.seeds,
            args.items if args.items is not None else stored.items,
            args.max_new_tokens if args.max_new_tokens is not None else stored.max_new_tokens,
            args.window if args.window is not None else stored.window,
        )
    else:
        config = RunConfig(protocol, specs, args.seeds or 1, args.items, args.max_new_tokens, args.window)

    if args.actors is not None and (args.actors < 1 or args.ray is None):
        return _fail("--actors must be at least 1" if args.actors < 1 else "--actors needs --ray")

    # 2. the model (with --ray each actor loads its own; the driver loads none)
    from engine import load_model

    lm = None
    if args.ray is None:
        try:
            lm = load_model(args.model, dtype=args.dtype, verbose=not args.json)
        except ModelLoadError as e:
            return _fail(str(e))
    from engine.__main__ import warn_caveats

    warn_caveats(config.specs)

    # 3. the same command again: resume its unfinished run, or skip a finished one
    if args.resume is None and not args.new:
        from experiments.runner import find_matching_run

        match = find_matching_run(store, config, lm.identity.weights_hash if lm else None)
        if match is not None and match["status"] == "finished":
            from experiments.analysis import format_summary, summary

            print(
                f"run {match['id']} with these settings has already finished; showing it (add --new to run it again)",
                file=sys.stderr,
            )
            s = summary(store, match["id"])
            print(json.dumps(s) if args.json else format_summary(s))
            return 0
        if match is not None:
            print(
                f"resuming run {match['id']} ({match['status']}) started with these settings "
                f"(add --new for a fresh run)",
                file=sys.stderr,
            )
            args.resume = match["id"]

    # 4. the run
    from tqdm import tqdm

    bar = None
    state = {"id": args.resume}

    def progress(done, total, info):
        nonlocal bar
        state["id"] = info.get("experiment_id", state["id"])
        if info.get("event") == "start":
            bar = tqdm(
                total=total,
                initial=done,
                unit="dialogue",
                desc=f"run {state['id']}",
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        elif bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"last: item {info.get('item')} seed {info.get('seed')}", refresh=False)

    import signal

    def on_term(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (a notebook, the lab): leave signals alone
        previous = None
    try:
        if args.ray is None:
            eid = run_protocol(
                store,
                lm,
                config.protocol,
                config.specs,
                config.seeds,
                config.items,
                config.max_new_tokens,
                experiment_id=args.resume,
                progress=progress,
                name=args.name,
                window=config.window,
            )
        else:
            from experiments.distributed import run_protocol_ray

            eid = run_protocol_ray(
                store,
                config.protocol,
                config.specs,
                config.seeds,
                config.items,
                config.max_new_tokens,
                experiment_id=args.resume,
                progress=progress,
                name=args.name,
                window=config.window,
                model=args.model,
                dtype=args.dtype,
                address=args.ray or None,
                actors=args.actors,
            )
    except KeyboardInterrupt as e:
        if bar is not None:
            bar.close()
        cmd = f"python -m experiments run --resume {state['id']}" + (f" --db {args.db}" if args.db else "")
        how = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        print(f"\n{how}; run {state['id']} is marked 'interrupted'. Resume with:\n  {cmd}", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except (SpecError, RunConfigError, ProtocolError, DialogueError, ModelLoadError) as e:
        return _fail(str(e))
    except Exception as e:  # StoreError included: say how to continue
        from db.store import StoreError
        from experiments.distributed import RayUnavailable

        if bar is not None:
            bar.close()
        if isinstance(e, RayUnavailable):  # raised before anything was written
            return _fail(str(e))
        if isinstance(e, StoreError) and state["id"]:
            print(
                f"error: {e}\nrows already written are kept; resume with: "
                f"python -m experiments run --resume {state['id']}",
                file=sys.stderr,
            )
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()

    from experiments.analysis import format_summary, summary

    s = summary(store, eid)
    print(json.dumps(s) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
