"""
python -m db list   [--db URL]
python -m db export [--db URL] --format csv|jsonl|parquet|bundle --out DIR [--session ID] [--experiment ID]
python -m db import [--db URL] BUNDLE.json [--new-id]

--db defaults to $LAB_DB, else sqlite:///lab.db. Errors are one line on stderr and exit status 1.
"""

import argparse
import json
import sys

from .store import Store, StoreError, default_db_url

FORMATS = ("csv", "jsonl", "parquet", "bundle")  # = db.export.FORMATS; db.export loads pandas (slow), so only on use


def cmd_list(args):
    store = Store(args.db, create=False)
    for e in store.list_experiments():
        print(f"experiment {e['id']}  {e['status']:<11} {e['created_at']:%Y-%m-%d %H:%M}  "
              f"{e['n_sessions']:>4} sessions  {e['name']} ({e['protocol_name']})")
    for s in store.list_sessions():
        extra = f"  experiment={s['experiment_id']} item={s['item_key']} seed={s['seed']}" if s["experiment_id"] else ""
        print(f"session    {s['id']}  {s['kind']:<10}  {s['created_at']:%Y-%m-%d %H:%M}  {s['n_arms']} arms "
              f"{s['n_turns']:>4} turns {s['n_annotations']:>4} annotations  {s['title']!r}{extra}")


def cmd_export(args):
    from .export import export
    store = Store(args.db, create=False)
    for path in export(store, args.format, args.out, session_id=args.session, experiment_id=args.experiment):
        print(path)


def cmd_import(args):
    from .export import import_bundle
    try:
        with open(args.bundle, encoding="utf-8") as f:
            bundle = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{args.bundle} is not JSON: {e}") from None
    store = Store(args.db)
    print(import_bundle(store, bundle, new_id=args.new_id))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m db", description="The lab's experiment record.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("list", "list experiments and sessions"), ("export", "export tables or bundles"),
                        ("import", "import a session bundle")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--db", default=default_db_url(), help="SQLAlchemy URL or SQLite file (default $LAB_DB or lab.db)")
        if name == "export":
            c.add_argument("--format", required=True, choices=FORMATS)
            c.add_argument("--out", required=True, help="folder to write into (created if missing)")
            c.add_argument("--session", help="only this session")
            c.add_argument("--experiment", help="only the sessions of this experiment")
        if name == "import":
            c.add_argument("bundle", help="a bundle-<session>.json written by export --format bundle")
            c.add_argument("--new-id", action="store_true", help="import as a copy under a fresh session id")
    args = p.parse_args(argv)
    try:
        {"list": cmd_list, "export": cmd_export, "import": cmd_import}[args.command](args)
    except (StoreError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
