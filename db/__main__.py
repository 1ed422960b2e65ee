"""
python -m db list   [--db URL]
python -m db export [--db URL] --format csv|jsonl|parquet|bundle --out DIR [--session ID] [--experiment ID]
python -m db import [--db URL] BUNDLE.json [--new-id]
python -m db upgrade [--db URL]     # run pending schema migrations (Alembic; no alembic.ini needed)

--db defaults to $LAB_DB, else sqlite:///lab.db. Errors are one line on stderr. Exit status:
0 done; 2 a mistake in the command or its input (unknown option, unreadable or invalid bundle,
bad value); 1 a database problem (missing or locked database, unknown id, session already there).
An invalid bundle is refused whole, naming the key path of its first problem; nothing is written.
"""

import argparse
import json
import sys

from .store import Store, StoreError, default_db_url

FORMATS = ("csv", "jsonl", "parquet", "bundle")  # = db.export.FORMATS; db.export loads pandas (slow), so only on use


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line too (and still exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _plural(n, word):
    return f"{n:>4} {word}{'' if n == 1 else 's'}"


def cmd_list(args):
    store = Store(args.db, create=False)
    for e in store.list_experiments():
        print(
            f"experiment {e['id']}  {e['status']:<11} {e['created_at']:%Y-%m-%d %H:%M}  "
            f"{e['n_sessions']:>4} sessions  {e['name']} ({e['protocol_name']})"
        )
    for s in store.list_sessions():
        extra = f"  experiment={s['experiment_id']} item={s['item_key']} seed={s['seed']}" if s["experiment_id"] else ""
        print(
            f"session    {s['id']}  {s['kind']:<10}  {s['created_at']:%Y-%m-%d %H:%M}  {_plural(s['n_arms'], 'arm')} "
            f"{_plural(s['n_turns'], 'turn')} {_plural(s['n_annotations'], 'annotation')}  {s['title']!r}{extra}"
        )


def cmd_export(args):
    from .export import export

    store = Store(args.db, create=False)
    for path in export(store, args.format, args.out, session_id=args.session, experiment_id=args.experiment):
        print(path)


def cmd_import(args):
    from .export import import_bundle
    from .rules import check_bundle

    try:
        with open(args.bundle, encoding="utf-8") as f:
            bundle = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.bundle} is not UTF-8 text: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long numbers, absurd nesting
        raise ValueError(f"{args.bundle} is not JSON: {e}") from None
    try:
        check_bundle(bundle)  # before opening (or creating) the database: a bad file touches nothing
    except ValueError as e:
        raise ValueError(f"invalid session bundle: {e}") from None
    store = Store(args.db)
    print(import_bundle(store, bundle, new_id=args.new_id))


def cmd_upgrade(args):
    from .schema import state

    store = Store(args.db, create=False, upgrade=False)
    with store.engine.connect() as conn:
        revision, legacy, has_tables = state(conn)
    _, after = store.upgrade()
    if revision == after:
        print(f"{store.name}: at schema revision {after}, the newest this code knows; nothing to do")
        return
    was = (
        f"revision {revision}"
        if revision
        else f"the schema before Alembic (version {legacy})"
        if legacy
        else "an empty database"
    )
    print(f"{store.name}: upgraded from {was} to schema revision {after}")


def main(argv=None):
    p = _Parser(prog="python -m db", description="The lab's experiment record.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("list", "list experiments and sessions"),
        ("export", "export tables or bundles"),
        ("import", "import a session bundle"),
        ("upgrade", "run pending schema migrations"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument(
            "--db", default=default_db_url(), help="SQLAlchemy URL or SQLite file (default $LAB_DB or lab.db)"
        )
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
        {"list": cmd_list, "export": cmd_export, "import": cmd_import, "upgrade": cmd_upgrade}[args.command](args)
    except (StoreError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause
        return 1 if isinstance(e, StoreError) and not isinstance(e, ValueError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
