"""
Store: the one way the lab, the engine and the experiment runner write to and
read from the record.

Every write method is its own short transaction, so a crash loses at most the
write in flight. Methods return plain dicts (never live ORM objects), so any
thread can use what it gets back. On SQLite the file runs in WAL mode with
foreign keys on and a busy timeout; write transactions take the write lock up
front (BEGIN IMMEDIATE) so concurrent writers queue instead of deadlocking.
"""

import functools
import json
import operator
import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from sqlalchemy import case, create_engine, delete, event, exc, func, make_url, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from .models import (EXPERIMENT_STATUSES, FINISH_REASONS, ROLES, SESSION_KINDS, STANCE_LABELS,
                     Annotation, Arm, Capture, Experiment, LabSession, ProbeResult, SchemaError,
                     Score, Turn, as_dict, migrate, new_id, to_utc, utcnow)


class StoreError(Exception):
    """A database problem, said in one line a researcher can act on."""


def default_db_url() -> str:
    """The database the lab uses unless told otherwise: $LAB_DB, else ./lab.db."""
    return os.environ.get("LAB_DB") or "sqlite:///lab.db"


def resolve_url(url_or_path) -> URL:
    """Any SQLAlchemy URL as is; anything else is a file path for SQLite.
    Relative SQLite paths are made absolute now, so a later chdir cannot move the database."""
    s = os.fspath(url_or_path)
    if s == ":memory:":
        s = "sqlite://"
    url = make_url(s) if "://" in s else URL.create("sqlite", database=s)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not url.query.get("uri"):
        url = url.set(database=str(Path(url.database).expanduser().resolve()))
    return url


def _first_line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _guard(fn):
    """Turn driver errors into a StoreError with one readable line (the cause stays chained)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except exc.DBAPIError as e:
            raise StoreError(self._explain(e)) from e
        except exc.SQLAlchemyError as e:
            raise StoreError(f"database error on {self.name}: {_first_line(e)}") from e
    return wrapper


def _json(value, what, default=None):
    """Reject what json cannot store now, with the field's name, not at flush time."""
    if value is None:
        return default
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None
    return value


def _token_ids(token_ids) -> list:
    try:
        return [operator.index(t) for t in (token_ids or [])]  # accepts numpy ints, rejects floats
    except TypeError:
        raise ValueError("token_ids must be a list of ints") from None


def _opt_int(v, what):
    if v is None:
        return None
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{what} must be an int, got {v!r}") from None


def _check_relative(path):
    """A capture path is relative to the database's folder and may not climb out of it."""
    if path is None:
        return None
    for p in (PurePosixPath(path), PureWindowsPath(path)):
        if p.is_absolute() or p.drive or ".." in p.parts:
            raise ValueError(f"capture path must be relative to the database folder, without '..': {path!r}")
    return str(path)


def _pane_order(pane_order, indices) -> list:
    order = [_opt_int(i, "pane_order entry") for i in pane_order]
    if len(set(order)) != len(order) or not set(order) <= set(indices):
        raise ValueError(f"pane_order {order} must list distinct arm indices out of {sorted(indices)}")
    return order


_role_order = case({r: i for i, r in enumerate(ROLES)}, value=Turn.role, else_=len(ROLES))


class Store:
    """The lab's database. Store(url_or_path, busy_timeout=seconds, create=True)."""

    def __init__(self, url_or_path=None, *, busy_timeout: float = 10.0, create: bool = True):
        target = default_db_url() if url_or_path is None else url_or_path
        try:
            self.url = resolve_url(target)
        except (exc.ArgumentError, ValueError, TypeError):
            raise StoreError(f"not a database URL or file path: {target!r}") from None
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.path = None  # the SQLite file, when there is one
        kwargs = {}
        if self.is_sqlite:
            memory = self.url.database in (None, "", ":memory:") or self.url.query.get("mode") == "memory"
            if not memory and not self.url.query.get("uri"):
                self.path = Path(self.url.database)
                if not create and not self.path.is_file():
                    raise StoreError(f"no database at {self.path}")
                if not self.path.parent.is_dir():
                    raise StoreError(f"cannot create the database {self.path}: folder does not exist")
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout}
            if memory:
                kwargs["poolclass"] = StaticPool  # one shared connection: single-threaded tests only
        self.name = str(self.path) if self.path else self.url.render_as_string(hide_password=True)
        try:
            self.engine = create_engine(self.url, **kwargs)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
            raise StoreError(f"cannot use the database URL {self.name}: {_first_line(e)}") from None
        if self.is_sqlite:
            self._setup_sqlite(busy_timeout, wal=self.path is not None)
        self._write_engine = self.engine.execution_options(lab_write=True)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        try:
            self._migrate()
        except StoreError:
            self.engine.dispose()
            raise

    def _setup_sqlite(self, busy_timeout, wal):
        busy_ms = int(busy_timeout * 1000)

        @event.listens_for(self.engine, "connect")
        def on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # the driver must not BEGIN on its own; we do below
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cur.execute("PRAGMA foreign_keys = ON")
            if wal:
                cur.execute("PRAGMA journal_mode = WAL")  # persistent; readers never block the writer
                cur.execute("PRAGMA synchronous = FULL")  # a committed turn survives a power cut too
            cur.close()

        @event.listens_for(self.engine, "begin")
        def on_begin(conn):
            # writers take the lock at BEGIN, where the busy timeout applies, instead of
            # failing mid-transaction when a read lock cannot be upgraded
            write = conn.get_execution_options().get("lab_write")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    @_guard
    def _migrate(self):
        try:
            migrate(self.engine, self._write_engine)
        except SchemaError as e:
            raise StoreError(f"{self.name}: {e}") from None

    def _explain(self, e) -> str:
        msg = str(getattr(e, "orig", e)).lower()
        if "locked" in msg or "busy" in msg:
            return f"the database {self.name} is locked by another process; try again"
        if "unable to open" in msg:
            return f"cannot open the database {self.name}"
        if "not a database" in msg:
            return f"{self.name} is not a database file"
        if "readonly" in msg or "read-only" in msg:
            return f"the database {self.name} is read-only"
        return f"database error on {self.name}: {_first_line(getattr(e, 'orig', e))}"

    @property
    def dir(self):
        """The folder capture files live in (next to the SQLite file), or None for other backends."""
        return self.path.parent if self.path else None

    def close(self):
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @contextmanager
    def _tx(self):
        """One short write transaction: commit on success, roll back everything on any error."""
        with self._write() as s, s.begin():
            yield s

    @contextmanager
    def _ro(self):
        """A read transaction: one consistent snapshot for the queries inside it."""
        with self._read() as s, s.begin():
            yield s

    # ---------------------------------------------------------------- lookups

    def _session_row(self, s, session_id) -> LabSession:
        row = s.get(LabSession, session_id) if isinstance(session_id, str) else None
        if row is None:
            raise StoreError(f"unknown session id {session_id!r} in {self.name}")
        return row

    def _arm_row(self, s, session_id, arm_index) -> Arm:
        arm = s.scalar(select(Arm).where(Arm.session_id == session_id, Arm.index == arm_index))
        if arm is None:
            self._session_row(s, session_id)
            raise StoreError(f"session {session_id} has no arm {arm_index}")
        return arm

    def _turn_row(self, s, turn_id) -> Turn:
        row = s.get(Turn, turn_id) if isinstance(turn_id, int) and not isinstance(turn_id, bool) else None
        if row is None:
            raise StoreError(f"unknown turn id {turn_id!r} in {self.name}")
        return row

    # ------------------------------------------------------------ experiments

    @_guard
    def create_experiment(self, name, protocol_name, protocol=None, args=None, model=None, *,
                          status="running", id=None, created_at=None) -> str:
        if status not in EXPERIMENT_STATUSES:
            raise ValueError(f"experiment status must be one of {EXPERIMENT_STATUSES}, got {status!r}")
        row = Experiment(id=id or new_id(), name=name, protocol_name=protocol_name,
                         protocol=_json(protocol, "protocol", {}), args=_json(args, "args", {}),
                         model=_json(model, "model", {}), status=status,
                         created_at=to_utc(created_at) or utcnow())
        with self._tx() as s:
            if s.get(Experiment, row.id) is not None:
                raise StoreError(f"experiment {row.id} already exists in {self.name}")
            s.add(row)
        return row.id

    @_guard
    def update_experiment(self, experiment_id, *, status=None, finished_at=None) -> None:
        """Setting a final status without finished_at stamps it now."""
        if status is not None and status not in EXPERIMENT_STATUSES:
            raise ValueError(f"experiment status must be one of {EXPERIMENT_STATUSES}, got {status!r}")
        with self._tx() as s:
            row = s.get(Experiment, experiment_id)
            if row is None:
                raise StoreError(f"unknown experiment id {experiment_id!r} in {self.name}")
            if status is not None:
                row.status = status
                if status != "running" and finished_at is None:
                    finished_at = utcnow()
            if finished_at is not None:
                row.finished_at = to_utc(finished_at)

    @_guard
    def get_experiment(self, experiment_id) -> dict:
        with self._ro() as s:
            row = s.get(Experiment, experiment_id)
            if row is None:
                raise StoreError(f"unknown experiment id {experiment_id!r} in {self.name}")
            return as_dict(row)

    @_guard
    def list_experiments(self) -> list:
        """Newest first, each with n_sessions."""
        n = (select(LabSession.experiment_id, func.count().label("n"))
             .group_by(LabSession.experiment_id).subquery())
        q = (select(Experiment, func.coalesce(n.c.n, 0))
             .outerjoin(n, n.c.experiment_id == Experiment.id)
             .order_by(Experiment.created_at.desc(), Experiment.id))
        with self._ro() as s:
            return [as_dict(e) | {"n_sessions": k} for e, k in s.execute(q)]

    # --------------------------------------------------------------- sessions

    @_guard
    def create_session(self, kind, title="", model=None, arms=(), *, system_prompt=None, blind=False,
                       pane_order=None, user=None, experiment_id=None, item_key=None, seed=None,
                       meta=None, id=None, created_at=None) -> str:
        """Session and its arms in one transaction. arms: [{index, label, spec, settings, seed}];
        index defaults to the position in the list. item_key is stored as a string."""
        if kind not in SESSION_KINDS:
            raise ValueError(f"session kind must be one of {SESSION_KINDS}, got {kind!r}")
        arm_rows = []
        for pos, a in enumerate(arms):
            index = _opt_int(a.get("index", pos), "arm index")
            arm_rows.append(Arm(index=index, label=str(a.get("label", "")), spec=str(a.get("spec", "")),
                                settings=_json(a.get("settings"), f"settings of arm {index}", {}),
                                seed=_opt_int(a.get("seed", 0), f"seed of arm {index}")))
        indices = [a.index for a in arm_rows]
        if len(set(indices)) != len(indices):
            raise ValueError(f"arm indices must be unique, got {indices}")
        pane_order = list(indices) if pane_order is None else _pane_order(pane_order, indices)
        row = LabSession(id=id or new_id(), created_at=to_utc(created_at) or utcnow(), kind=kind,
                         title=title or "", user=user, model=_json(model, "model", {}),
                         system_prompt=system_prompt, blind=bool(blind), pane_order=pane_order,
                         experiment_id=experiment_id, item_key=None if item_key is None else str(item_key),
                         seed=_opt_int(seed, "seed"), meta=_json(meta, "meta", {}))
        with self._tx() as s:
            if s.get(LabSession, row.id) is not None:
                raise StoreError(f"session {row.id} already exists in {self.name}")
            if experiment_id is not None and s.get(Experiment, experiment_id) is None:
                raise StoreError(f"unknown experiment id {experiment_id!r} in {self.name}")
            s.add(row)
            s.flush()
            for a in arm_rows:
                a.session_id = row.id
                s.add(a)
        return row.id

    @_guard
    def update_session(self, session_id, **fields) -> None:
        """Change title, user, system_prompt, blind, pane_order or meta (meta is replaced whole)."""
        allowed = {"title", "user", "system_prompt", "blind", "pane_order", "meta"}
        if set(fields) - allowed:
            raise ValueError(f"update_session can change only {sorted(allowed)}, not {sorted(set(fields) - allowed)}")
        with self._tx() as s:
            row = self._session_row(s, session_id)
            if "pane_order" in fields:
                indices = s.scalars(select(Arm.index).where(Arm.session_id == session_id)).all()
                fields["pane_order"] = _pane_order(fields["pane_order"], indices)
            if "meta" in fields:
                fields["meta"] = _json(fields["meta"], "meta", {})
            for k, v in fields.items():
                setattr(row, k, v)

    def _session_dict(self, s, row) -> dict:
        arms = s.scalars(select(Arm).where(Arm.session_id == row.id).order_by(Arm.index))
        return as_dict(row) | {"arms": [as_dict(a) for a in arms]}

    @_guard
    def get_session(self, session_id) -> dict:
        """The session as a dict, with its arms (ordered by index) under 'arms'."""
        with self._ro() as s:
            return self._session_dict(s, self._session_row(s, session_id))

    @_guard
    def list_sessions(self, kind=None, experiment_id=None) -> list:
        """Newest first, each with n_arms, n_turns (turn rows, all arms and roles) and n_annotations."""
        n_arms = select(Arm.session_id, func.count().label("n")).group_by(Arm.session_id).subquery()
        n_turns = select(Turn.session_id, func.count().label("n")).group_by(Turn.session_id).subquery()
        n_ann = (select(Turn.session_id, func.count().label("n"))
                 .join(Annotation, Annotation.turn_id == Turn.id).group_by(Turn.session_id).subquery())
        q = (select(LabSession, func.coalesce(n_arms.c.n, 0), func.coalesce(n_turns.c.n, 0),
                    func.coalesce(n_ann.c.n, 0))
             .outerjoin(n_arms, n_arms.c.session_id == LabSession.id)
             .outerjoin(n_turns, n_turns.c.session_id == LabSession.id)
             .outerjoin(n_ann, n_ann.c.session_id == LabSession.id)
             .order_by(LabSession.created_at.desc(), LabSession.id))
        if kind is not None:
            q = q.where(LabSession.kind == kind)
        if experiment_id is not None:
            q = q.where(LabSession.experiment_id == experiment_id)
        with self._ro() as s:
            return [as_dict(r) | {"n_arms": a, "n_turns": t, "n_annotations": n} for r, a, t, n in s.execute(q)]

    @_guard
    def find_session(self, experiment_id, item_key, seed):
        """The newest session of this experiment for (item_key, seed), with arms, or None: for resume."""
        q = select(LabSession).where(
            LabSession.experiment_id == experiment_id,
            LabSession.item_key.is_(None) if item_key is None else LabSession.item_key == str(item_key),
            LabSession.seed.is_(None) if seed is None else LabSession.seed == seed,
        ).order_by(LabSession.created_at.desc(), LabSession.id).limit(1)
        with self._ro() as s:
            row = s.scalar(q)
            return None if row is None else self._session_dict(s, row)

    # ------------------------------------------------------------------ turns

    @_guard
    def log_turn(self, session_id, arm_index, turn_index, role, text, token_ids=None, started_at=None,
                 finished_at=None, ttft_s=None, duration_s=None, finish_reason=None, gen_settings=None,
                 error=None, meta=None, *, n_tokens=None) -> int:
        """Record one message of one arm. n_tokens defaults to len(token_ids).
        Logging the same (arm, turn_index, role) twice is an error: see delete_turns_from."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if finish_reason is not None and finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, got {finish_reason!r}")
        turn_index = _opt_int(turn_index, "turn_index")
        if turn_index is None or turn_index < 0:
            raise ValueError(f"turn_index must be an int >= 0, got {turn_index!r}")
        ids = _token_ids(token_ids)
        row = Turn(session_id=session_id, turn_index=turn_index, role=role, text=text or "", token_ids=ids,
                   started_at=to_utc(started_at), finished_at=to_utc(finished_at),
                   ttft_s=None if ttft_s is None else float(ttft_s),
                   duration_s=None if duration_s is None else float(duration_s),
                   n_tokens=len(ids) if n_tokens is None else _opt_int(n_tokens, "n_tokens"),
                   finish_reason=finish_reason, gen_settings=_json(gen_settings, "gen_settings", {}),
                   error=error, meta=_json(meta, "meta", {}))
        try:
            with self._tx() as s:
                row.arm_id = self._arm_row(s, session_id, arm_index).id
                s.add(row)
        except exc.IntegrityError as e:
            raise StoreError(f"turn {turn_index} ({role}) of arm {arm_index} in session {session_id} "
                             f"is already logged; delete_turns_from() it first to regenerate") from e
        return row.id

    def _turn_query(self):
        return select(Turn, Arm.index).join(Arm, Turn.arm_id == Arm.id)

    @_guard
    def get_turn(self, turn_id) -> dict:
        with self._ro() as s:
            t = self._turn_row(s, turn_id)
            return as_dict(t) | {"arm_index": s.get(Arm, t.arm_id).index}

    @_guard
    def get_turns(self, session_id, arm_index=None) -> list:
        """Ordered by turn_index, then system/user/assistant, then arm index; each has arm_index."""
        q = self._turn_query().where(Turn.session_id == session_id)
        if arm_index is not None:
            q = q.where(Arm.index == arm_index)
        q = q.order_by(Turn.turn_index, _role_order, Arm.index)
        with self._ro() as s:
            self._session_row(s, session_id)
            return [as_dict(t) | {"arm_index": i} for t, i in s.execute(q)]

    @_guard
    def delete_turns_from(self, session_id, arm_index, turn_index, role=None) -> int:
        """Regenerate policy: the old turns are deleted, not kept. Deletes every turn of the arm
        (all arms if arm_index is None) at or after position (turn_index, role) in conversation
        order, with their annotations, scores, probe results and captures. role=None starts at
        the first role of turn_index; role='assistant' keeps that turn's user message.
        Returns the number of turn rows deleted."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        later_roles = ROLES[ROLES.index(role):] if role else ROLES
        with self._tx() as s:
            q = select(Turn.id).join(Arm, Turn.arm_id == Arm.id).where(
                Turn.session_id == session_id,
                (Turn.turn_index > turn_index) | ((Turn.turn_index == turn_index) & Turn.role.in_(later_roles)))
            if arm_index is None:
                self._session_row(s, session_id)
            else:
                self._arm_row(s, session_id, arm_index)
                q = q.where(Arm.index == arm_index)
            ids = list(s.scalars(q))
            if ids:
                # explicit child deletes: correct even on a backend that does not cascade
                for model in (Annotation, Score, Capture, ProbeResult):
                    s.execute(delete(model).where(model.turn_id.in_(ids)))
                s.execute(delete(Turn).where(Turn.id.in_(ids)))
            return len(ids)

    # ------------------------------------------------------------ annotations

    @_guard
    def annotate(self, turn_id, annotator, stance_label, note="", confidence=None) -> int:
        """A new row every time: re-labelling keeps the history (see latest_annotations)."""
        if stance_label not in STANCE_LABELS:
            raise ValueError(f"unknown stance label {stance_label!r}; expected one of: "
                             + ", ".join(repr(x) for x in STANCE_LABELS))
        if not annotator or not isinstance(annotator, str):
            raise ValueError("annotator must be a non-empty string")
        if confidence is not None:
            confidence = float(confidence)
            if not 0.0 <= confidence <= 1.0:
                raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
        with self._tx() as s:
            turn = self._turn_row(s, turn_id)
            if turn.role != "assistant":
                raise ValueError(f"turn {turn_id} is a {turn.role} message; only assistant turns are annotated")
            row = Annotation(turn_id=turn_id, annotator=annotator, stance_label=stance_label,
                             note=note or "", confidence=confidence, created_at=utcnow())
            s.add(row)
        return row.id

    @_guard
    def get_annotations(self, session_id, latest=False) -> list:
        """All annotations of the session in order (turn, arm, time); each carries session_id,
        arm_index, turn_index and role. latest=True keeps only the newest per (turn, annotator)."""
        q = (select(Annotation, Turn.session_id, Arm.index, Turn.turn_index, Turn.role)
             .join(Turn, Annotation.turn_id == Turn.id).join(Arm, Turn.arm_id == Arm.id)
             .where(Turn.session_id == session_id)
             .order_by(Turn.turn_index, Arm.index, Annotation.created_at, Annotation.id))
        with self._ro() as s:
            self._session_row(s, session_id)
            rows = [as_dict(a) | {"session_id": sid, "arm_index": ai, "turn_index": ti, "role": r}
                    for a, sid, ai, ti, r in s.execute(q)]
        if latest:
            newest = {(r["turn_id"], r["annotator"]): r for r in rows}  # later rows win
            rows = [r for r in rows if newest[(r["turn_id"], r["annotator"])] is r]
        return rows

    def latest_annotations(self, session_id) -> list:
        """The current label of each annotator on each turn."""
        return self.get_annotations(session_id, latest=True)

    def _upsert(self, s, model, turn_id, **key):
        """The row of `model` for this turn and key (e.g. scorer=...), created if missing."""
        self._turn_row(s, turn_id)
        row = s.scalar(select(model).where(model.turn_id == turn_id,
                                           *(getattr(model, k) == v for k, v in key.items())))
        if row is None:
            row = model(turn_id=turn_id, **key)
            s.add(row)
        return row

    # ----------------------------------------------------------------- scores

    @_guard
    def put_score(self, turn_id, scorer, label=None, value=None, data=None) -> int:
        """Insert or replace the score of this scorer on this turn."""
        with self._tx() as s:
            row = self._upsert(s, Score, turn_id, scorer=scorer)
            row.label, row.value = label, None if value is None else float(value)
            row.data, row.created_at = _json(data, "score data", {}), utcnow()
        return row.id

    @_guard
    def get_scores(self, session_id=None, experiment_id=None) -> list:
        """Scores of one session, one experiment, or all; each carries session_id, arm_index,
        turn_index and role of its turn."""
        q = (select(Score, Turn.session_id, Arm.index, Turn.turn_index, Turn.role)
             .join(Turn, Score.turn_id == Turn.id).join(Arm, Turn.arm_id == Arm.id)
             .order_by(Turn.session_id, Turn.turn_index, _role_order, Arm.index, Score.scorer))
        if session_id is not None:
            q = q.where(Turn.session_id == session_id)
        if experiment_id is not None:
            q = q.join(LabSession, Turn.session_id == LabSession.id).where(LabSession.experiment_id == experiment_id)
        with self._ro() as s:
            return [as_dict(sc) | {"session_id": sid, "arm_index": ai, "turn_index": ti, "role": r}
                    for sc, sid, ai, ti, r in s.execute(q)]

    # ------------------------------------------------------ probes & captures

    @_guard
    def add_probe(self, session_id, arm_index, kind, metrics, turn_id=None) -> int:
        with self._tx() as s:
            arm = self._arm_row(s, session_id, arm_index)
            if turn_id is not None and self._turn_row(s, turn_id).arm_id != arm.id:
                raise StoreError(f"turn {turn_id} does not belong to arm {arm_index} of session {session_id}")
            row = ProbeResult(turn_id=turn_id, arm_id=arm.id, kind=kind,
                              metrics=_json(metrics, "probe metrics", {}), created_at=utcnow())
            s.add(row)
        return row.id

    @_guard
    def get_probes(self, session_id) -> list:
        """Each carries arm_index, and turn_index/role of its turn (None when not tied to one)."""
        q = (select(ProbeResult, Arm.index, Turn.turn_index, Turn.role)
             .join(Arm, ProbeResult.arm_id == Arm.id).outerjoin(Turn, ProbeResult.turn_id == Turn.id)
             .where(Arm.session_id == session_id).order_by(ProbeResult.created_at, ProbeResult.id))
        with self._ro() as s:
            self._session_row(s, session_id)
            return [as_dict(p) | {"arm_index": ai, "turn_index": ti, "role": r} for p, ai, ti, r in s.execute(q)]

    @_guard
    def put_capture(self, turn_id, kind, path=None, data=None) -> int:
        """Insert or replace. path is relative to store.dir (the DB's folder)."""
        path = _check_relative(path)
        with self._tx() as s:
            row = self._upsert(s, Capture, turn_id, kind=kind)
            row.path, row.data, row.created_at = path, _json(data, "capture data"), utcnow()
        return row.id

    @_guard
    def get_capture(self, turn_id, kind):
        with self._ro() as s:
            row = s.scalar(select(Capture).where(Capture.turn_id == turn_id, Capture.kind == kind))
            return None if row is None else as_dict(row)

    @_guard
    def get_captures(self, session_id) -> list:
        """Each carries arm_index, turn_index and role of its turn."""
        q = (select(Capture, Arm.index, Turn.turn_index, Turn.role)
             .join(Turn, Capture.turn_id == Turn.id).join(Arm, Turn.arm_id == Arm.id)
             .where(Turn.session_id == session_id)
             .order_by(Turn.turn_index, _role_order, Arm.index, Capture.kind))
        with self._ro() as s:
            self._session_row(s, session_id)
            return [as_dict(c) | {"arm_index": ai, "turn_index": ti, "role": r} for c, ai, ti, r in s.execute(q)]
