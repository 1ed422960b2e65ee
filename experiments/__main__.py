"""Command line: `python -m experiments {run,list,summary,protocols}`.

    python -m experiments run are_you_sure --arm observer --arm continuity:linkage=1,gain=0.3 \
        --seeds 3 --items 10 [--db lab.db] [--model embedded] [--max-new-tokens 64] [--json]
    python -m experiments run --resume RUN_ID            # or the same command again plus --resume RUN_ID
    python -m experiments list [--db URL] [--json]
    python -m experiments summary RUN_ID [--all] [--json]
    python -m experiments protocols                      # the shipped protocols

Exit status: 0 done; 2 a mistake in the command (malformed protocol, bad arm spec, missing
model, resume with other settings); 1 a database problem (e.g. locked; rows already written
stay); 130 interrupted by Ctrl-C (the run is marked 'interrupted'; the resume command is printed).
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) a protocol against arms")
    r.add_argument("protocol", nargs="?", help="protocol YAML path or shipped name (are_you_sure, ...)")
    r.add_argument("--arm", action="append", default=[], help="observer | NAME:key=value,... (repeatable)")
    r.add_argument("--seeds", type=int, default=None, help="seeds per item (default 1)")
    r.add_argument("--items", type=int, default=None, help="first K items (default all)")
    r.add_argument("--max-new-tokens", type=int, default=None, help="default: the protocol's")
    r.add_argument("--window", type=int, default=None,
                   help="attention window in tokens: every arm sees the first few plus the last N (default: the "
                        "protocol's, else full attention)")
    r.add_argument("--db", default=None, help="database URL or SQLite path (default $LAB_DB or lab.db)")
    r.add_argument("--model", default=None, help="'embedded' (default), a local folder, or a cached HF id")
    r.add_argument("--dtype", default=None)
    r.add_argument("--name", default=None, help="a name for the run")
    r.add_argument("--resume", default=None, metavar="RUN_ID", help="continue an interrupted run")
    r.add_argument("--json", action="store_true", help="print the final summary as JSON")

    ls = sub.add_parser("list", help="runs in the database with status and progress")
    ls.add_argument("--db", default=None)
    ls.add_argument("--json", action="store_true")

    s = sub.add_parser("summary", help="per-arm results of a run")
    s.add_argument("run_id")
    s.add_argument("--db", default=None)
    s.add_argument("--all", action="store_true", help="every metric, not only the headline ones")
    s.add_argument("--json", action="store_true")

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
        print(f"{r['id']}  {str(r['created_at'])[:19]}  {r['status']:11s} {r['done']}/{planned} dialogues  "
              f"{r['protocol']}  arms: {' | '.join(r['arms'])}")
    return 0


def _cmd_summary(args) -> int:
    from experiments.analysis import format_summary, summary

    store = _open_store(args.db, create=False)
    s = summary(store, args.run_id)
    print(json.dumps(s) if args.json else format_summary(s, all_metrics=args.all))
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
        config = RunConfig(protocol or stored.protocol, specs or stored.specs,
                           args.seeds if args.seeds is not None else stored.seeds,
                           args.items if args.items is not None else stored.items,
                           args.max_new_tokens if args.max_new_tokens is not None else stored.max_new_tokens,
                           args.window if args.window is not None else stored.window)
    else:
        config = RunConfig(protocol, specs, args.seeds or 1, args.items, args.max_new_tokens, args.window)

    # 2. the model
    from engine import load_model

    try:
        lm = load_model(args.model, dtype=args.dtype, verbose=not args.json)
    except ModelLoadError as e:
        return _fail(str(e))

    # 3. the run
    from tqdm import tqdm

    bar = None
    state = {"id": args.resume}

    def progress(done, total, info):
        nonlocal bar
        state["id"] = info.get("experiment_id", state["id"])
        if info.get("event") == "start":
            bar = tqdm(total=total, initial=done, unit="dialogue", desc=f"run {state['id']}", file=sys.stderr,
                       dynamic_ncols=True, smoothing=0.1)
        elif bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"last: item {info.get('item')} seed {info.get('seed')}", refresh=False)

    try:
        eid = run_protocol(store, lm, config.protocol, config.specs, config.seeds, config.items,
                           config.max_new_tokens, experiment_id=args.resume, progress=progress, name=args.name,
                           window=config.window)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        cmd = f"python -m experiments run --resume {state['id']}" + (f" --db {args.db}" if args.db else "")
        print(f"\ninterrupted; run {state['id']} is marked 'interrupted'. Resume with:\n  {cmd}", file=sys.stderr)
        return 130
    except (SpecError, RunConfigError, ProtocolError, DialogueError) as e:
        return _fail(str(e))
    except Exception as e:  # StoreError included: say how to continue
        from db.store import StoreError

        if bar is not None:
            bar.close()
        if isinstance(e, StoreError) and state["id"]:
            print(f"error: {e}\nrows already written are kept; resume with: "
                  f"python -m experiments run --resume {state['id']}", file=sys.stderr)
            return 1
        raise
    finally:
        if bar is not None:
            bar.close()

    from experiments.analysis import format_summary, summary

    s = summary(store, eid)
    print(json.dumps(s) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
