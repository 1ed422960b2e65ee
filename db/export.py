"""
Getting the record out: flat tables for analysis, and lossless session bundles
for moving a session from one database to another.

turns_frame: one row per message of one arm (user and assistant rows), columns
in this order (stable; new columns are only ever appended):
    session_id, session_kind, session_title, experiment_id, item_key, seed   -- the session
    arm_index, arm_label, arm_spec                                            -- the arm
    turn_index, role, text, n_tokens, ttft_s, duration_s, finish_reason,
    started_at, finished_at                                                   -- the message
    model_name                  session model identity's "name"
    token_ids                   JSON list of the message's token ids
    settings                    JSON of the arm's full settings
    gen_settings                JSON of the generation settings used for this message
    turn_id, arm_seed, error    database turn id, the arm's seed, generation error text
then, for every scorer that scored any exported turn (sorted by scorer name):
    score_<scorer>_label, score_<scorer>_value

annotations_frame: one row per annotation (re-labels are separate rows; keep
the newest per (turn_id, annotator) for the current label):
    annotation_id, session_id, arm_index, arm_label, turn_index, annotator,
    stance_label, note, confidence, created_at, text (the annotated reply), turn_id

scores_frame: one row per score:
    score_id, session_id, arm_index, arm_label, turn_id, turn_index, role,
    scorer, label, value, data (JSON), created_at

Timestamps are UTC.

Blind sessions: until a blind session is revealed (db.blind.is_blinded), every export
shows its arms only as panes: arm_index is the pane position (0 = Arm A), arm_label the
pane name ("Arm A"), and arm_spec, settings, gen_settings, arm_seed, turn_id and score_id
are empty. A bundle of such a session keeps the real session sealed (see export_bundle).
"""

import json
from datetime import datetime
from pathlib import Path

import pandas as pd
from sqlalchemy import exc, select

from .blind import pane_name, pane_positions
from .models import SCHEMA_VERSION, Annotation, Arm, Capture, Experiment, LabSession, ProbeResult, Score, Turn, utcnow
from .models import new_id as _new_id
from .rules import BUNDLE_FORMAT, BUNDLE_VERSION, check_bundle, seal
from .store import Store, StoreError, _role_order, turn_row

TURN_COLUMNS = [
    "session_id",
    "session_kind",
    "session_title",
    "experiment_id",
    "item_key",
    "seed",
    "arm_index",
    "arm_label",
    "arm_spec",
    "turn_index",
    "role",
    "text",
    "n_tokens",
    "ttft_s",
    "duration_s",
    "finish_reason",
    "started_at",
    "finished_at",
    "model_name",
    "token_ids",
    "settings",
    "gen_settings",
    "turn_id",
    "arm_seed",
    "error",
]
ANNOTATION_COLUMNS = [
    "annotation_id",
    "session_id",
    "arm_index",
    "arm_label",
    "turn_index",
    "annotator",
    "stance_label",
    "note",
    "confidence",
    "created_at",
    "text",
    "turn_id",
]
SCORE_COLUMNS = [
    "score_id",
    "session_id",
    "arm_index",
    "arm_label",
    "turn_id",
    "turn_index",
    "role",
    "scorer",
    "label",
    "value",
    "data",
    "created_at",
]
_INT_COLUMNS = {"seed", "arm_index", "turn_index", "n_tokens", "turn_id", "arm_seed", "annotation_id", "score_id"}
FORMATS = ("csv", "jsonl", "parquet", "bundle")


class _Blinder:
    """Per export: which sessions are blinded, and the pane of each of their arms."""

    def __init__(self):
        self.cache = {}

    def pane(self, ss, arm_index):
        """The pane position of this arm, or None when the session shows its arms."""
        if ss.id not in self.cache:
            self.cache[ss.id] = pane_positions(ss)
        panes = self.cache[ss.id]
        if panes is None:
            return None
        return panes.setdefault(arm_index, len(panes))  # an arm missing from pane_order goes last


def _order_panes(rows, keys):
    """Re-sort blinded rows by pane position within their group (a stable sort keeps the rest)."""
    first = {}
    for r in rows:
        first.setdefault(r["session_id"], len(first))
    return sorted(rows, key=lambda r: (first[r["session_id"]], *(r[k] for k in keys)))


# ----------------------------------------------------------------- frames


def _filtered(store, q, session_id, experiment_id):
    """Apply the session/experiment filter; unknown ids are an error, not an empty table."""
    if session_id is not None:
        store.get_session(session_id)
        q = q.where(LabSession.id == session_id)
    if experiment_id is not None:
        store.get_experiment(experiment_id)
        q = q.where(LabSession.experiment_id == experiment_id)
    return q


def _frame(rows, columns):
    df = pd.DataFrame.from_records(rows, columns=columns)
    for c in columns:
        if c in _INT_COLUMNS:
            df[c] = df[c].astype("Int64")  # nullable ints: a missing seed must not turn 3 into 3.0
    return df


def turns_frame(store: Store, session_id=None, experiment_id=None) -> pd.DataFrame:
    q = (
        select(Turn, Arm, LabSession)
        .join(Arm, Turn.arm_id == Arm.id)
        .join(LabSession, Turn.session_id == LabSession.id)
        .order_by(LabSession.created_at, LabSession.id, Turn.turn_index, _role_order, Arm.index)
    )
    q = _filtered(store, q, session_id, experiment_id)
    rows, hidden, blinder = [], set(), _Blinder()
    with store._ro() as s:
        for t, a, ss in s.execute(q):
            rows.append(
                dict(
                    session_id=ss.id,
                    session_kind=ss.kind,
                    session_title=ss.title,
                    experiment_id=ss.experiment_id,
                    item_key=ss.item_key,
                    seed=ss.seed,
                    arm_index=a.index,
                    arm_label=a.label,
                    arm_spec=a.spec,
                    turn_index=t.turn_index,
                    role=t.role,
                    text=t.text,
                    n_tokens=t.n_tokens,
                    ttft_s=t.ttft_s,
                    duration_s=t.duration_s,
                    finish_reason=t.finish_reason,
                    started_at=t.started_at,
                    finished_at=t.finished_at,
                    model_name=(ss.model or {}).get("name"),
                    token_ids=json.dumps(t.token_ids),
                    settings=json.dumps(a.settings),
                    gen_settings=json.dumps(t.gen_settings),
                    turn_id=t.id,
                    arm_seed=a.seed,
                    error=t.error,
                )
            )
            pos = blinder.pane(ss, a.index)
            if pos is not None:
                hidden.add(t.id)
                rows[-1].update(
                    arm_index=pos,
                    arm_label=pane_name(pos),
                    arm_spec=None,
                    settings=None,
                    gen_settings=None,
                    arm_seed=None,
                )
    if hidden:
        rank = {r: i for i, r in enumerate(("system", "user", "assistant"))}
        first = {}
        for r in rows:
            first.setdefault(r["session_id"], len(first))
        rows.sort(key=lambda r: (first[r["session_id"]], r["turn_index"], rank.get(r["role"], 3), r["arm_index"]))
    df = _frame(rows, TURN_COLUMNS)
    scores = scores_frame(store, session_id, experiment_id, _turn_ids=True)
    for scorer in sorted(scores["scorer"].unique()):
        sc = scores[scores["scorer"] == scorer].set_index("turn_id")
        df[f"score_{scorer}_label"] = df["turn_id"].map(sc["label"])
        df[f"score_{scorer}_value"] = df["turn_id"].map(sc["value"]).astype("Float64")
    if hidden:
        df.loc[df["turn_id"].isin(hidden), "turn_id"] = pd.NA  # ids follow logging order, i.e. arm order
    return df


def annotations_frame(store: Store, session_id=None, experiment_id=None) -> pd.DataFrame:
    q = (
        select(Annotation, Turn, Arm, LabSession)
        .join(Turn, Annotation.turn_id == Turn.id)
        .join(Arm, Turn.arm_id == Arm.id)
        .join(LabSession, Turn.session_id == LabSession.id)
        .order_by(
            LabSession.created_at, LabSession.id, Turn.turn_index, Arm.index, Annotation.created_at, Annotation.id
        )
    )
    q = _filtered(store, q, session_id, experiment_id)
    rows, blinder, blinded = [], _Blinder(), False
    with store._ro() as s:
        for an, t, a, ss in s.execute(q):
            rows.append(
                dict(
                    annotation_id=an.id,
                    session_id=ss.id,
                    arm_index=a.index,
                    arm_label=a.label,
                    turn_index=t.turn_index,
                    annotator=an.annotator,
                    stance_label=an.stance_label,
                    note=an.note,
                    confidence=an.confidence,
                    created_at=an.created_at,
                    text=t.text,
                    turn_id=t.id,
                )
            )
            pos = blinder.pane(ss, a.index)
            if pos is not None:
                blinded = True
                rows[-1].update(arm_index=pos, arm_label=pane_name(pos), turn_id=None)
    if blinded:
        rows = _order_panes(rows, ("turn_index", "arm_index"))
    return _frame(rows, ANNOTATION_COLUMNS)


def scores_frame(store: Store, session_id=None, experiment_id=None, _turn_ids=False) -> pd.DataFrame:
    q = (
        select(Score, Turn, Arm, LabSession)
        .join(Turn, Score.turn_id == Turn.id)
        .join(Arm, Turn.arm_id == Arm.id)
        .join(LabSession, Turn.session_id == LabSession.id)
        .order_by(LabSession.created_at, LabSession.id, Turn.turn_index, _role_order, Arm.index, Score.scorer)
    )
    q = _filtered(store, q, session_id, experiment_id)
    rows, blinder, blinded = [], _Blinder(), False
    with store._ro() as s:
        for sc, t, a, ss in s.execute(q):
            rows.append(
                dict(
                    score_id=sc.id,
                    session_id=ss.id,
                    arm_index=a.index,
                    arm_label=a.label,
                    turn_id=t.id,
                    turn_index=t.turn_index,
                    role=t.role,
                    scorer=sc.scorer,
                    label=sc.label,
                    value=sc.value,
                    data=json.dumps(sc.data),
                    created_at=sc.created_at,
                )
            )
            pos = blinder.pane(ss, a.index)
            if pos is not None:
                blinded = True
                rows[-1].update(arm_index=pos, arm_label=pane_name(pos), score_id=None)
                if not _turn_ids:  # turns_frame needs them to join, and hides them itself
                    rows[-1]["turn_id"] = None
    if blinded:
        rank = {r: i for i, r in enumerate(("system", "user", "assistant"))}
        for r in rows:
            r["_role"] = rank.get(r["role"], 3)
        rows = _order_panes(rows, ("turn_index", "_role", "arm_index"))
    return _frame(rows, SCORE_COLUMNS)


# ------------------------------------------------------------------ files


def safe_path(out_dir, filename) -> Path:
    """out_dir/filename, refusing any name that could land outside out_dir."""
    name = str(filename)
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")) or ".." in name:
        raise ValueError(f"unsafe export file name {name!r}: it may not contain path separators or '..'")
    root = Path(out_dir).expanduser().resolve()
    path = (root / name).resolve()  # follows a symlink planted at the target
    if path.parent != root:
        raise ValueError(f"export file {name!r} would be written outside {root}")
    return path


def _write(df, path, fmt):
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True, date_format="iso", date_unit="us", force_ascii=False)
    elif fmt == "parquet":
        df.to_parquet(path, index=False)


def export(store: Store, fmt, out_dir, session_id=None, experiment_id=None, prefix="") -> list:
    """Write turns/annotations/scores.<fmt> (or one bundle-<session>.json per session for
    fmt='bundle') into out_dir, creating it; returns the written paths."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    root = Path(out_dir).expanduser().resolve()
    if fmt == "bundle":
        if session_id is not None:
            ids = [store.get_session(session_id)["id"]]
        else:
            ids = [x["id"] for x in store.list_sessions(experiment_id=experiment_id)]
            if experiment_id is not None:
                store.get_experiment(experiment_id)
        targets = [(safe_path(root, f"{prefix}bundle-{i}.json"), i) for i in ids]
        root.mkdir(parents=True, exist_ok=True)
        for path, i in targets:
            path.write_text(json.dumps(export_bundle(store, i), indent=1, ensure_ascii=False))
        return [p for p, _ in targets]
    frames = {"turns": turns_frame, "annotations": annotations_frame, "scores": scores_frame}
    paths = {k: safe_path(root, f"{prefix}{k}.{fmt}") for k in frames}  # check every name before writing
    root.mkdir(parents=True, exist_ok=True)
    for k, make in frames.items():
        _write(make(store, session_id, experiment_id), paths[k], fmt)
    return list(paths.values())


# ---------------------------------------------------------------- bundles


def _plain(x):
    """JSON-ready: datetimes become ISO 8601 strings (UTC), everything else is already plain."""
    if isinstance(x, datetime):
        return x.isoformat()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _drop(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


def export_bundle(store: Store, session_id) -> dict:
    """Everything about one session, as JSON-serialisable data. Rows refer to each other by
    natural keys (arm_index; arm_index + turn_index + role), never by database ids, so the
    same session exports identically from any database it was imported into.
    Capture files are not included: only their path and JSON data.

    An unrevealed blind session exports as its pane view (arms named Arm A, Arm B ... in pane
    order, arm_index = pane position, no specs, settings, generation settings, turn metadata,
    probes or captures) plus `sealed`: the full bundle, compressed and base64-encoded, which
    import_bundle restores, so the transfer stays lossless while nothing readable names an arm."""
    full = _full_bundle(store, session_id)
    panes = pane_positions(full["session"])
    if panes is None:
        return full
    return {**_pane_view(full, panes), "sealed": seal(full)}


def _pane_view(full: dict, panes: dict) -> dict:
    for a in full["arms"]:
        panes.setdefault(a["index"], len(panes))
    rank = {r: i for i, r in enumerate(("system", "user", "assistant"))}

    def moved(rows):
        out = [{**r, "arm_index": panes[r["arm_index"]]} for r in rows]
        return sorted(out, key=lambda r: (r.get("turn_index") or 0, rank.get(r.get("role"), 3), r["arm_index"]))

    turns = [{**t, "gen_settings": {}, "meta": {}} for t in moved(full["turns"])]
    arms = sorted(
        (
            {"index": panes[a["index"]], "label": pane_name(panes[a["index"]]), "spec": "", "settings": {}, "seed": 0}
            for a in full["arms"]
        ),
        key=lambda a: a["index"],
    )
    return {
        **full,
        "session": {**full["session"], "pane_order": [a["index"] for a in arms]},
        "experiment": None,
        "arms": arms,
        "turns": turns,
        "annotations": moved(full["annotations"]),
        "scores": moved(full["scores"]),
        "probes": [],
        "captures": [],
    }


def _full_bundle(store: Store, session_id) -> dict:
    session = store.get_session(session_id)
    arms = session.pop("arms")
    experiment = store.get_experiment(session["experiment_id"]) if session["experiment_id"] else None
    return _plain(
        {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "schema_version": SCHEMA_VERSION,
            "session": session,
            "experiment": experiment,
            "arms": [_drop(a, "id", "session_id") for a in arms],
            "turns": [_drop(t, "id", "session_id", "arm_id") for t in store.get_turns(session_id)],
            "annotations": [_drop(a, "id", "turn_id", "session_id") for a in store.get_annotations(session_id)],
            "scores": [_drop(x, "id", "turn_id", "session_id") for x in store.get_scores(session_id=session_id)],
            "probes": [_drop(p, "id", "turn_id", "arm_id") for p in store.get_probes(session_id)],
            "captures": [_drop(c, "id", "turn_id") for c in store.get_captures(session_id)],
        }
    )


class BundleError(StoreError, ValueError):
    """A session bundle that cannot be imported; the message names the key path of the problem."""


def import_bundle(store: Store, bundle, new_id=False) -> str:
    """Add a bundled session to this database, all or nothing. Every field is checked first
    with the store's own rules (db/rules.py); an invalid bundle raises BundleError naming the
    key path of its first problem, and nothing is written. The session keeps its id; if that
    id is taken it is an error, unless new_id=True (import as a copy under a fresh id).
    Its experiment is created when the database lacks it, and left as is when present."""
    try:
        b = check_bundle(bundle)
    except ValueError as e:
        raise BundleError(f"invalid session bundle: {e}") from None
    try:
        return _import(store, b, new_id)
    except exc.DBAPIError as e:
        raise StoreError(store._explain(e)) from e


def _import(store, b, fresh_id):
    sid = _new_id() if fresh_id else b.session.id
    with store._tx() as s:
        if s.get(LabSession, sid) is not None:
            raise StoreError(
                f"session {sid} already exists in {store.name}; import with new_id=True (--new-id) to add a copy"
            )
        exp_id = b.session.experiment_id
        if exp_id is not None and s.get(Experiment, exp_id) is None:
            if b.experiment is None:
                raise BundleError(
                    f"invalid session bundle: experiment: the session belongs to experiment "
                    f"{exp_id}, which is neither in the bundle nor in {store.name}"
                )
            e = b.experiment
            s.add(Experiment(**e.model_dump(exclude={"created_at"}), created_at=e.created_at or utcnow()))
        ss = b.session
        if exp_id is not None:
            taken = s.scalar(
                select(LabSession.id).where(
                    LabSession.experiment_id == exp_id, LabSession.item_key == ss.item_key, LabSession.seed == ss.seed
                )
            )
            if taken is not None:  # the database keeps one dialogue per (experiment, item, seed)
                raise StoreError(
                    f"experiment {exp_id} in {store.name} already has the dialogue of item "
                    f"{ss.item_key!r} seed {ss.seed} (session {taken}); a copy would be a second one"
                )
        s.add(
            LabSession(
                **ss.model_dump(exclude={"id", "created_at", "pane_order"}),
                id=sid,
                created_at=ss.created_at or utcnow(),
                pane_order=[a.index for a in b.arms] if ss.pane_order is None else ss.pane_order,
            )
        )
        s.flush()
        arm_ids = {}
        for a in b.arms:
            arm = Arm(session_id=sid, **a.model_dump())
            s.add(arm)
            s.flush()
            arm_ids[arm.index] = arm.id
        turn_ids = {}
        for t in b.turns:
            turn = turn_row(t, sid)
            turn.arm_id = arm_ids[t.arm_index]
            s.add(turn)
            s.flush()
            turn_ids[(t.arm_index, t.turn_index, t.role)] = turn.id

        def rows(model, items, *keys):
            for r in items:
                d = r.model_dump(exclude={"arm_index", "turn_index", "role"})
                d["created_at"] = d.get("created_at") or utcnow()
                s.add(model(turn_id=turn_ids.get((r.arm_index, r.turn_index, r.role)), **d))

        rows(Annotation, b.annotations)
        rows(Score, b.scores)
        rows(Capture, b.captures)
        for p in b.probes:
            d = p.model_dump(exclude={"arm_index", "turn_index", "role"})
            d["created_at"] = d.get("created_at") or utcnow()
            s.add(
                ProbeResult(
                    arm_id=arm_ids[p.arm_index],
                    **d,
                    turn_id=None if p.turn_index is None else turn_ids[(p.arm_index, p.turn_index, p.role)],
                )
            )
    return sid
