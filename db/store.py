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
import os
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import case, create_engine, delete, event, exc, func, make_url, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from .models import (
    ROLES,
    Annotation,
    Arm,
    Capture,
    Experiment,
    LabSession,
    ProbeResult,
    SchemaError,
    Score,
    Turn,
    as_dict,
    new_id,
    utcnow,
)
from .rules import (
    ID_CHARS,
    ID_MAX,
    AnnotationRow,
    ArmRow,
    CaptureRow,
    ExperimentRow,
    ProbeRow,
    ScoreRow,
    SessionRow,
    TurnRow,
    _show,
)
from .schema import current, migrate


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
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") and not url.query.get("uri"):
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


def pane_order_of(pane_order, indices) -> list:
    """pane_order (already a list of ints) must list distinct arm indices of the session."""
    order = list(pane_order)
    if len(set(order)) != len(order) or not set(order) <= set(indices):
        raise ValueError(f"pane_order: {order} must list distinct arm indices out of {sorted(indices)}")
    return order


def turn_row(v: TurnRow, session_id) -> Turn:
    """The Turn row of a validated TurnRow (arm_id is set by the caller)."""
    row = Turn(session_id=session_id, **v.model_dump(exclude={"arm_index", "n_tokens"}))
    row.n_tokens = len(v.token_ids) if v.n_tokens is None else v.n_tokens
    return row


_role_order = case({r: i for i, r in enumerate(ROLES)}, value=Turn.role, else_=len(ROLES))


class Store:
    """The lab's database. Store(url_or_path, busy_timeout=seconds, create=True, upgrade=True).
    Opening brings the schema up to date (db.schema) unless upgrade=False."""

    def __init__(self, url_or_path=None, *, busy_timeout: float = 10.0, create: bool = True, upgrade: bool = True):
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
        if upgrade:
            try:
                self.upgrade()
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
    def upgrade(self, target: str = "head") -> tuple:
        """Run the pending migrations; returns (revision before, revision after)."""
        try:
            before = current(self.engine)
            return before, migrate(self.engine, self._write_engine, target)
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
        if "connection failed" in msg or "could not connect" in msg or "connection refused" in msg:
            return f"cannot connect to the database {self.name}: {_first_line(getattr(e, 'orig', e))}"
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
        # what cannot be an id (a lone surrogate, a 2 MB string, '../x') is unknown without a query
        is_id = isinstance(session_id, str) and 0 < len(session_id) <= ID_MAX and set(session_id) <= ID_CHARS
        row = s.get(LabSession, session_id) if is_id else None
        if row is None:
            raise StoreError(f"unknown session id {_show(session_id)} in {self.name}")
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
    def create_experiment(
        self, name, protocol_name, protocol=None, args=None, model=None, *, status="running", id=None, created_at=None
    ) -> str:
        v = ExperimentRow.check(
            id=id or new_id(),
            name=name,
            protocol_name=protocol_name,
            protocol=protocol,
            args=args,
            model=model,
            status=status,
            created_at=created_at,
        )
        row = Experiment(**v.model_dump(exclude={"created_at"}), created_at=v.created_at or utcnow())
        with self._tx() as s:
            if s.get(Experiment, row.id) is not None:
                raise StoreError(f"experiment {row.id} already exists in {self.name}")
            s.add(row)
        return row.id

    @_guard
    def update_experiment(self, experiment_id, *, status=None, finished_at=None) -> None:
        """Setting a final status without finished_at stamps it now."""
        if status is not None:
            status = ExperimentRow.check_fields(status=status)["status"]
        finished_at = ExperimentRow.check_fields(finished_at=finished_at)["finished_at"]
        with self._tx() as s:
            row = s.get(Experiment, experiment_id)
            if row is None:
                raise StoreError(f"unknown experiment id {experiment_id!r} in {self.name}")
            if status is not None:
                row.status = status
                if status != "running" and finished_at is None:
                    finished_at = utcnow()
            if finished_at is not None:
                row.finished_at = finished_at

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
        n = select(LabSession.experiment_id, func.count().label("n")).group_by(LabSession.experiment_id).subquery()
        q = (
            select(Experiment, func.coalesce(n.c.n, 0))
            .outerjoin(n, n.c.experiment_id == Experiment.id)
            .order_by(Experiment.created_at.desc(), Experiment.id)
        )
        with self._ro() as s:
            return [as_dict(e) | {"n_sessions": k} for e, k in s.execute(q)]

    # --------------------------------------------------------------- sessions

    @_guard
    def create_session(
        self,
        kind,
        title="",
        model=None,
        arms=(),
        *,
        system_prompt=None,
        blind=False,
        pane_order=None,
        user=None,
        experiment_id=None,
        item_key=None,
        seed=None,
        meta=None,
        id=None,
        created_at=None,
    ) -> str:
        """Session and its arms in one transaction. arms: [{index, label, spec, settings, seed}];
        index defaults to the position in the list. item_key is stored as a string."""
        arm_rows = []
        for pos, a in enumerate(arms):
            if not isinstance(a, dict):
                raise ValueError(f"arms[{pos}]: expected an object, got {type(a).__name__}")
            try:
                v = ArmRow.check(**{"index": pos, **a})
            except ValueError as e:
                raise ValueError(f"arms[{pos}].{e}") from None
            arm_rows.append(Arm(**v.model_dump()))
        indices = [a.index for a in arm_rows]
        if len(set(indices)) != len(indices):
            raise ValueError(f"arm indices must be unique, got {indices}")
        v = SessionRow.check(
            id=id or new_id(),
            created_at=created_at,
            kind=kind,
            title=title or "",
            user=user,
            model=model,
            system_prompt=system_prompt,
            blind=blind,
            pane_order=pane_order,
            experiment_id=experiment_id,
            item_key=item_key,
            seed=seed,
            meta=meta,
        )
        row = LabSession(
            **v.model_dump(exclude={"created_at", "pane_order"}),
            created_at=v.created_at or utcnow(),
            pane_order=list(indices) if v.pane_order is None else pane_order_of(v.pane_order, indices),
        )
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
        if fields.get("pane_order", 0) is None:
            raise ValueError("pane_order: expected a list of arm indices, got None")
        fields = SessionRow.check_fields(**fields)
        with self._tx() as s:
            row = self._session_row(s, session_id)
            if "pane_order" in fields:
                indices = s.scalars(select(Arm.index).where(Arm.session_id == session_id)).all()
                fields["pane_order"] = pane_order_of(fields["pane_order"], indices)
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
        """Newest first, each with n_arms, n_turns (exchanges: distinct turn indices, as the lab counts
        them; a 1-turn session of 2 arms has 1), n_messages (message rows, all arms and roles) and
        n_annotations."""
        n_arms = select(Arm.session_id, func.count().label("n")).group_by(Arm.session_id).subquery()
        n_turns = (
            select(Turn.session_id, func.count(Turn.turn_index.distinct()).label("n"), func.count().label("m"))
            .group_by(Turn.session_id)
            .subquery()
        )
        n_ann = (
            select(Turn.session_id, func.count().label("n"))
            .join(Annotation, Annotation.turn_id == Turn.id)
            .group_by(Turn.session_id)
            .subquery()
        )
        q = (
            select(
                LabSession,
                func.coalesce(n_arms.c.n, 0),
                func.coalesce(n_turns.c.n, 0),
                func.coalesce(n_turns.c.m, 0),
                func.coalesce(n_ann.c.n, 0),
            )
            .outerjoin(n_arms, n_arms.c.session_id == LabSession.id)
            .outerjoin(n_turns, n_turns.c.session_id == LabSession.id)
            .outerjoin(n_ann, n_ann.c.session_id == LabSession.id)
            .order_by(LabSession.created_at.desc(), LabSession.id)
        )
        if kind is not None:
            q = q.where(LabSession.kind == kind)
        if experiment_id is not None:
            q = q.where(LabSession.experiment_id == experiment_id)
        with self._ro() as s:
            return [
                as_dict(r) | {"n_arms": a, "n_turns": t, "n_messages": m, "n_annotations": n}
                for r, a, t, m, n in s.execute(q)
            ]

    @_guard
    def find_session(self, experiment_id, item_key, seed):
        """The newest session of this experiment for (item_key, seed), with arms, or None: for resume."""
        q = (
            select(LabSession)
            .where(
                LabSession.experiment_id == experiment_id,
                LabSession.item_key.is_(None) if item_key is None else LabSession.item_key == str(item_key),
                LabSession.seed.is_(None) if seed is None else LabSession.seed == seed,
            )
            .order_by(LabSession.created_at.desc(), LabSession.id)
            .limit(1)
        )
        with self._ro() as s:
            row = s.scalar(q)
            return None if row is None else self._session_dict(s, row)

    @_guard
    def log_dialogue(
        self,
        experiment_id,
        item_key,
        seed,
        *,
        title="",
        model=None,
        arms=(),
        system_prompt=None,
        meta=None,
        turns=(),
        scores=(),
    ) -> tuple:
        """One whole experiment dialogue in one transaction: its session, arms, every message
        (`turns`: log_turn keyword dicts with arm_index) and scores (`scores`: dicts of arm_index,
        turn_index, scorer, label, value, data on assistant messages). Returns (session_id, written).

        Exactly once per (experiment, item_key, seed): if the experiment already holds that
        dialogue complete (meta.complete), nothing is written and written is False; this is how
        a retried or duplicated delivery (Ray is at-least-once) or a second runner is absorbed,
        and the unique index on the key settles a race between two writers. An incomplete one
        (a single-process run interrupted mid-dialogue) is replaced, keeping its id."""
        arm_rows = []
        for pos, a in enumerate(arms):
            try:
                arm_rows.append(ArmRow.check(**{"index": pos, **a}))
            except ValueError as e:
                raise ValueError(f"arms[{pos}].{e}") from None
        session = SessionRow.check(
            id=new_id(),
            kind="experiment",
            title=title or "",
            model=model,
            system_prompt=system_prompt,
            experiment_id=experiment_id,
            item_key=item_key,
            seed=seed,
            meta=meta,
        )
        if session.experiment_id is None:
            raise ValueError("experiment_id: a dialogue belongs to an experiment")
        turn_rows = []
        for pos, t in enumerate(turns):
            try:
                turn_rows.append(TurnRow.check(**t))
            except ValueError as e:
                raise ValueError(f"turns[{pos}].{e}") from None
        score_rows = []
        for pos, x in enumerate(scores):
            try:
                score_rows.append(ScoreRow.check(role="assistant", **x))
            except ValueError as e:
                raise ValueError(f"scores[{pos}].{e}") from None
        key = (
            LabSession.experiment_id == session.experiment_id,
            LabSession.item_key == session.item_key,
            LabSession.seed.is_(None) if session.seed is None else LabSession.seed == session.seed,
        )
        try:
            with self._tx() as s:
                if s.get(Experiment, session.experiment_id) is None:
                    raise StoreError(f"unknown experiment id {session.experiment_id!r} in {self.name}")
                old = s.scalar(select(LabSession).where(*key).with_for_update())
                if old is not None and (old.meta or {}).get("complete") is True:
                    return old.id, False
                created_at = utcnow()
                if old is not None:  # an interrupted dialogue: replaced whole, same id
                    session.id, created_at = old.id, old.created_at
                    self._delete_session_rows(s, old.id)
                    s.expunge(old)
                row = LabSession(
                    **session.model_dump(exclude={"created_at", "pane_order"}),
                    created_at=created_at,
                    pane_order=[a.index for a in arm_rows],
                )
                s.add(row)
                s.flush()
                arm_ids = {}
                for a in arm_rows:
                    arm = Arm(session_id=row.id, **a.model_dump())
                    s.add(arm)
                    s.flush()
                    arm_ids[a.index] = arm.id
                turn_ids = {}
                for pos, t in enumerate(turn_rows):
                    if t.arm_index not in arm_ids:
                        raise ValueError(f"turns[{pos}].arm_index: the dialogue has no arm {t.arm_index}")
                    turn = turn_row(t, row.id)
                    turn.arm_id = arm_ids[t.arm_index]
                    s.add(turn)
                    s.flush()
                    turn_ids[(t.arm_index, t.turn_index, t.role)] = turn.id
                for pos, x in enumerate(score_rows):
                    tid = turn_ids.get((x.arm_index, x.turn_index, "assistant"))
                    if tid is None:
                        raise ValueError(
                            f"scores[{pos}]: the dialogue has no reply {x.turn_index} of arm {x.arm_index}"
                        )
                    s.add(
                        Score(
                            turn_id=tid,
                            scorer=x.scorer,
                            label=x.label,
                            value=x.value,
                            data={} if x.data is None else x.data,
                            created_at=utcnow(),
                        )
                    )
                return row.id, True
        except exc.IntegrityError:
            with self._ro() as s:  # another writer stored this dialogue first: ours is the duplicate
                other = s.scalar(select(LabSession.id).where(*key))
            if other is None:
                raise
            return other, False

    def _delete_session_rows(self, s, session_id) -> None:
        """Every row of a session, children first (correct even where deletes do not cascade)."""
        arm_ids = select(Arm.id).where(Arm.session_id == session_id).scalar_subquery()
        turn_ids = list(s.scalars(select(Turn.id).where(Turn.session_id == session_id)))
        if turn_ids:
            for model in (Annotation, Score, Capture):
                s.execute(delete(model).where(model.turn_id.in_(turn_ids)))
        s.execute(delete(ProbeResult).where(ProbeResult.arm_id.in_(arm_ids)))
        s.execute(delete(Turn).where(Turn.session_id == session_id))
        s.execute(delete(Arm).where(Arm.session_id == session_id))
        s.execute(delete(LabSession).where(LabSession.id == session_id))
        s.flush()

    # ------------------------------------------------------------------ turns

    @_guard
    def log_turn(
        self,
        session_id,
        arm_index,
        turn_index,
        role,
        text,
        token_ids=None,
        started_at=None,
        finished_at=None,
        ttft_s=None,
        duration_s=None,
        finish_reason=None,
        gen_settings=None,
        error=None,
        meta=None,
        *,
        n_tokens=None,
    ) -> int:
        """Record one message of one arm. n_tokens defaults to len(token_ids).
        Logging the same (arm, turn_index, role) twice is an error: see delete_turns_from."""
        v = TurnRow.check(
            arm_index=arm_index,
            turn_index=turn_index,
            role=role,
            text=text or "",
            token_ids=token_ids,
            started_at=started_at,
            finished_at=finished_at,
            ttft_s=ttft_s,
            duration_s=duration_s,
            n_tokens=n_tokens,
            finish_reason=finish_reason,
            gen_settings=gen_settings,
            error=error,
            meta=meta,
        )
        row = turn_row(v, session_id)
        try:
            with self._tx() as s:
                row.arm_id = self._arm_row(s, session_id, arm_index).id
                s.add(row)
        except exc.IntegrityError as e:
            raise StoreError(
                f"turn {turn_index} ({role}) of arm {arm_index} in session {session_id} "
                f"is already logged; delete_turns_from() it first to regenerate"
            ) from e
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
        later_roles = ROLES[ROLES.index(role) :] if role else ROLES
        with self._tx() as s:
            q = (
                select(Turn.id)
                .join(Arm, Turn.arm_id == Arm.id)
                .where(
                    Turn.session_id == session_id,
                    (Turn.turn_index > turn_index) | ((Turn.turn_index == turn_index) & Turn.role.in_(later_roles)),
                )
            )
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
        v = AnnotationRow.check_fields(
            annotator=annotator, stance_label=stance_label, note=note or "", confidence=confidence
        )
        with self._tx() as s:
            turn = self._turn_row(s, turn_id)
            if turn.role != "assistant":
                raise ValueError(f"turn {turn_id} is a {turn.role} message; only assistant turns are annotated")
            row = Annotation(turn_id=turn_id, **v, created_at=utcnow())
            s.add(row)
        return row.id

    @_guard
    def get_annotations(self, session_id, latest=False) -> list:
        """All annotations of the session in order (turn, arm, time); each carries session_id,
        arm_index, turn_index and role. latest=True keeps only the newest per (turn, annotator)."""
        q = (
            select(Annotation, Turn.session_id, Arm.index, Turn.turn_index, Turn.role)
            .join(Turn, Annotation.turn_id == Turn.id)
            .join(Arm, Turn.arm_id == Arm.id)
            .where(Turn.session_id == session_id)
            .order_by(Turn.turn_index, Arm.index, Annotation.created_at, Annotation.id)
        )
        with self._ro() as s:
            self._session_row(s, session_id)
            rows = [
                as_dict(a) | {"session_id": sid, "arm_index": ai, "turn_index": ti, "role": r}
                for a, sid, ai, ti, r in s.execute(q)
            ]
        if latest:
            newest = {(r["turn_id"], r["annotator"]): r for r in rows}  # later rows win
            rows = [r for r in rows if newest[(r["turn_id"], r["annotator"])] is r]
        return rows

    @_guard
    def label_counts(self, session_ids=None) -> dict:
        """How far labelling got, per session: {session_id: {"replies": M, "labelled": {annotator: N}}}
        with M the assistant replies logged and N how many of them the annotator has labelled. The
        numbers behind every "N of M labelled" in the lab (Arena and Sessions). `session_ids`: only
        these (default every session)."""
        replies = select(Turn.session_id, func.count()).where(Turn.role == "assistant").group_by(Turn.session_id)
        done = (
            select(Turn.session_id, Annotation.annotator, func.count(Annotation.turn_id.distinct()))
            .join(Turn, Annotation.turn_id == Turn.id)
            .where(Turn.role == "assistant")
            .group_by(Turn.session_id, Annotation.annotator)
        )
        if session_ids is not None:
            ids = [str(i) for i in session_ids]
            replies, done = replies.where(Turn.session_id.in_(ids)), done.where(Turn.session_id.in_(ids))
        out: dict = {}
        with self._ro() as s:
            for sid, m in s.execute(replies):
                out[sid] = {"replies": int(m), "labelled": {}}
            for sid, who, n in s.execute(done):
                out.setdefault(sid, {"replies": 0, "labelled": {}})["labelled"][who] = int(n)
        return out

    def latest_annotations(self, session_id) -> list:
        """The current label of each annotator on each turn."""
        return self.get_annotations(session_id, latest=True)

    def _upsert(self, s, model, turn_id, **key):
        """The row of `model` for this turn and key (e.g. scorer=...), created if missing."""
        self._turn_row(s, turn_id)
        row = s.scalar(select(model).where(model.turn_id == turn_id, *(getattr(model, k) == v for k, v in key.items())))
        if row is None:
            row = model(turn_id=turn_id, **key)
            s.add(row)
        return row

    # ----------------------------------------------------------------- scores

    @_guard
    def put_score(self, turn_id, scorer, label=None, value=None, data=None) -> int:
        """Insert or replace the score of this scorer on this turn."""
        v = ScoreRow.check_fields(scorer=scorer, label=label, value=value, data={} if data is None else data)
        with self._tx() as s:
            row = self._upsert(s, Score, turn_id, scorer=v["scorer"])
            row.label, row.value, row.data, row.created_at = v["label"], v["value"], v["data"], utcnow()
        return row.id

    @_guard
    def get_scores(self, session_id=None, experiment_id=None) -> list:
        """Scores of one session, one experiment, or all; each carries session_id, arm_index,
        turn_index and role of its turn."""
        q = (
            select(Score, Turn.session_id, Arm.index, Turn.turn_index, Turn.role)
            .join(Turn, Score.turn_id == Turn.id)
            .join(Arm, Turn.arm_id == Arm.id)
            .order_by(Turn.session_id, Turn.turn_index, _role_order, Arm.index, Score.scorer)
        )
        if session_id is not None:
            q = q.where(Turn.session_id == session_id)
        if experiment_id is not None:
            q = q.join(LabSession, Turn.session_id == LabSession.id).where(LabSession.experiment_id == experiment_id)
        with self._ro() as s:
            return [
                as_dict(sc) | {"session_id": sid, "arm_index": ai, "turn_index": ti, "role": r}
                for sc, sid, ai, ti, r in s.execute(q)
            ]

    # ------------------------------------------------------ probes & captures

    @_guard
    def add_probe(self, session_id, arm_index, kind, metrics, turn_id=None) -> int:
        v = ProbeRow.check_fields(kind=kind, metrics={} if metrics is None else metrics)
        with self._tx() as s:
            arm = self._arm_row(s, session_id, arm_index)
            if turn_id is not None and self._turn_row(s, turn_id).arm_id != arm.id:
                raise StoreError(f"turn {turn_id} does not belong to arm {arm_index} of session {session_id}")
            row = ProbeResult(turn_id=turn_id, arm_id=arm.id, **v, created_at=utcnow())
            s.add(row)
        return row.id

    @_guard
    def get_probes(self, session_id) -> list:
        """Each carries arm_index, and turn_index/role of its turn (None when not tied to one)."""
        q = (
            select(ProbeResult, Arm.index, Turn.turn_index, Turn.role)
            .join(Arm, ProbeResult.arm_id == Arm.id)
            .outerjoin(Turn, ProbeResult.turn_id == Turn.id)
            .where(Arm.session_id == session_id)
            .order_by(ProbeResult.created_at, ProbeResult.id)
        )
        with self._ro() as s:
            self._session_row(s, session_id)
            return [as_dict(p) | {"arm_index": ai, "turn_index": ti, "role": r} for p, ai, ti, r in s.execute(q)]

    @_guard
    def put_capture(self, turn_id, kind, path=None, data=None) -> int:
        """Insert or replace. path is relative to store.dir (the DB's folder)."""
        v = CaptureRow.check_fields(kind=kind, path=path, data=data)
        with self._tx() as s:
            row = self._upsert(s, Capture, turn_id, kind=v["kind"])
            row.path, row.data, row.created_at = v["path"], v["data"], utcnow()
        return row.id

    @_guard
    def get_capture(self, turn_id, kind):
        with self._ro() as s:
            row = s.scalar(select(Capture).where(Capture.turn_id == turn_id, Capture.kind == kind))
            return None if row is None else as_dict(row)

    @_guard
    def get_captures(self, session_id) -> list:
        """Each carries arm_index, turn_index and role of its turn."""
        q = (
            select(Capture, Arm.index, Turn.turn_index, Turn.role)
            .join(Turn, Capture.turn_id == Turn.id)
            .join(Arm, Turn.arm_id == Arm.id)
            .where(Turn.session_id == session_id)
            .order_by(Turn.turn_index, _role_order, Arm.index, Capture.kind)
        )
        with self._ro() as s:
            self._session_row(s, session_id)
            return [as_dict(c) | {"arm_index": ai, "turn_index": ti, "role": r} for c, ai, ti, r in s.execute(q)]
