"""
The record's rules, in one place: every value the Store writes and every row a session
bundle imports is checked here (pydantic models of the rows), so there is one validation
for every way into the database.

A problem is one line naming the key path of the first bad value, e.g.
`turns[3].token_ids: expected a list of ints, got 'abc'`.

The rules mirror the schema (db/models.py): String(n) columns take at most n characters,
integers fit SQLite's signed 64-bit INTEGER, floats are finite, JSON columns hold JSON
(settings and identities are JSON objects), timestamps are datetimes, epoch seconds or ISO
strings, ids are short names of letters, digits, '_' and '-' (they end up in file names),
a capture path stays inside the database's folder, and every text is valid Unicode that
UTF-8 can store, without NUL characters (PostgreSQL's text and jsonb refuse them; refusing them on
SQLite too keeps the backends interchangeable).
"""

import base64
import binascii
import json
import math
import operator
import zlib
from datetime import datetime
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from .models import EXPERIMENT_STATUSES, FINISH_REASONS, ROLES, SCHEMA_VERSION, SESSION_KINDS, STANCE_LABELS, to_utc

INT64_MAX = 2**63 - 1  # SQLite INTEGER is a signed 64-bit number
INT64_MIN = -(2**63)
ID_MAX = 32  # String(32) id columns; a uuid4 hex is 32 characters
ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _show(v, limit=60) -> str:
    """A short repr for an error message (a 2 MB title must not become a 2 MB line)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r):,} characters)"


# ------------------------------------------------------------------ checkers

NUL_PROBLEM = "contains a NUL character (\\x00), which PostgreSQL cannot store"


def _text(v, max_len=None, nul_ok=False):
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_show(v)}")
    if max_len is not None and len(v) > max_len:
        raise ValueError(f"at most {max_len:,} characters, got {len(v):,}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start + 1})") from None
    if not nul_ok and "\0" in v:  # refused on every backend, so a record moves between them whole
        raise ValueError(f"{NUL_PROBLEM} (at character {v.index(chr(0)) + 1})")
    return v


def _no_nul(v):
    """JSON strings (keys and values) without NUL: jsonb cannot hold \\u0000."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if "\0" in x:
                raise ValueError(f"a string in it {NUL_PROBLEM}: {_show(x)}")
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


def _int(v, lo=INT64_MIN, hi=INT64_MAX, what="an int"):
    if isinstance(v, bool):
        raise ValueError(f"expected {what}, got {_show(v)}")
    try:
        v = operator.index(v)  # ints and numpy ints; not floats, strings or bools
    except TypeError:
        raise ValueError(f"expected {what}, got {_show(v)}") from None
    if not lo <= v <= hi:
        raise ValueError(f"expected {what} from {lo:,} to {hi:,}, got {_show(v)}")
    return v


def _float(v, lo=None, hi=None):
    if isinstance(v, bool) or (not isinstance(v, (int, float)) and not hasattr(v, "__float__")):
        raise ValueError(f"expected a number, got {_show(v)}")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected a number, got {_show(v)}") from None
    if not math.isfinite(f):
        raise ValueError(f"expected a finite number, got {_show(v)}")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        rng = (
            f"between {lo:g} and {hi:g}"
            if lo is not None and hi is not None
            else f">= {lo:g}"
            if lo is not None
            else f"<= {hi:g}"
        )
        raise ValueError(f"expected a number {rng}, got {_show(v)}")
    return f


def _opt(check):
    return lambda v: None if v is None else check(v)


def _choice(options):
    def check(v):
        if v not in options:
            raise ValueError(f"expected one of {', '.join(map(str, options))}, got {_show(v)}")
        return v

    return check


def _id(v):
    if not isinstance(v, str) or not v or len(v) > ID_MAX or not set(v) <= ID_CHARS:
        raise ValueError(f"expected an id of 1 to {ID_MAX} letters, digits, '_' or '-', got {_show(v)}")
    return v


def _json_value(v):
    try:
        json.dumps(v)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise ValueError(f"must be JSON-serialisable: {e}") from None
    _no_nul(v)
    return v


def _json_object(v):
    if not isinstance(v, dict):
        raise ValueError(f"expected a JSON object, got {_show(v)}")
    return _json_value(v)


def _timestamp(v):
    try:
        return to_utc(v)
    except (TypeError, ValueError, OverflowError, OSError):
        raise ValueError(f"expected a timestamp (ISO 8601 text, epoch seconds or a datetime), got {_show(v)}") from None


def _token_ids(v):
    if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
        raise ValueError(f"expected a list of ints, got {_show(v)}")
    out = []
    for t in v:
        try:
            out.append(_int(t, 0, INT64_MAX))
        except ValueError:
            raise ValueError(f"expected a list of ints from 0 to {INT64_MAX:,}, got {_show(t)} in it") from None
    return out


def _int_list(v):
    if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
        raise ValueError(f"expected a list of ints, got {_show(v)}")
    return [_int(i, 0, INT64_MAX, "an arm index") for i in v]


def _stance(v):
    if v not in STANCE_LABELS:
        raise ValueError(f"unknown stance label {_show(v)}; expected one of: " + ", ".join(map(repr, STANCE_LABELS)))
    return v


def _capture_path(v):
    if v is None:
        return None
    _text(v, 4096, nul_ok=True)
    bad = "\0" in v or not v.strip()
    for p in (PurePosixPath(v), PureWindowsPath(v)):
        bad = bad or p.is_absolute() or bool(p.drive) or ".." in p.parts
    if bad:
        raise ValueError(f"a capture path must be relative to the database folder, without '..', got {_show(v)}")
    return v


def _item_key(v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"expected a string or an int, got {_show(v)}")
    return _text(str(v), 200)


def _flag(v):
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_show(v)}")
    return v


def _annotator(v):
    if not _text(v, 200).strip():
        raise ValueError("expected a non-empty name")
    return v


def Str(n=None):
    return Annotated[str, BeforeValidator(lambda v: _text(v, n))]


def OptStr(n=None):
    return Annotated[Optional[str], BeforeValidator(_opt(lambda v: _text(v, n)))]


Id = Annotated[str, BeforeValidator(_id)]
OptId = Annotated[Optional[str], BeforeValidator(_opt(_id))]
Index = Annotated[int, BeforeValidator(lambda v: _int(v, 0, INT64_MAX, "an int >= 0"))]
OptIndex = Annotated[Optional[int], BeforeValidator(_opt(lambda v: _int(v, 0, INT64_MAX, "an int >= 0")))]
Seed = Annotated[int, BeforeValidator(lambda v: _int(v, 0, INT64_MAX, "a seed"))]
OptSeed = Annotated[Optional[int], BeforeValidator(_opt(lambda v: _int(v, 0, INT64_MAX, "a seed")))]
Seconds = Annotated[Optional[float], BeforeValidator(_opt(lambda v: _float(v, lo=0.0)))]
OptNumber = Annotated[Optional[float], BeforeValidator(_opt(_float))]
Confidence = Annotated[Optional[float], BeforeValidator(_opt(lambda v: _float(v, 0.0, 1.0)))]
Time = Annotated[Optional[datetime], BeforeValidator(_timestamp)]
JsonObject = Annotated[dict, BeforeValidator(lambda v: {} if v is None else _json_object(v))]
JsonValue = Annotated[Any, AfterValidator(lambda v: None if v is None else _json_value(v))]
TokenIds = Annotated[list, BeforeValidator(lambda v: [] if v is None else _token_ids(v))]
Role = Annotated[str, BeforeValidator(_choice(ROLES))]
OptRole = Annotated[Optional[str], BeforeValidator(_opt(_choice(ROLES)))]
FinishReason = Annotated[Optional[str], BeforeValidator(_opt(_choice(FINISH_REASONS)))]
Kind = Annotated[str, BeforeValidator(_choice(SESSION_KINDS))]
Status = Annotated[str, BeforeValidator(_choice(EXPERIMENT_STATUSES))]
Stance = Annotated[str, BeforeValidator(_stance)]
CapturePath = Annotated[Optional[str], BeforeValidator(_capture_path)]
PaneOrder = Annotated[Optional[list], BeforeValidator(_opt(_int_list))]
ItemKey = Annotated[Optional[str], BeforeValidator(_item_key)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Annotator = Annotated[str, BeforeValidator(_annotator)]


# ------------------------------------------------------------------- rows


class Row(BaseModel):
    """A row as the store writes it. Unknown keys are refused; assignment re-validates."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    @classmethod
    def check(cls, **values) -> "Row":
        """Validate a whole row; a problem raises ValueError('<key>: <what is wrong>')."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ValueError(first_problem(e)) from None

    @classmethod
    def check_fields(cls, **values) -> dict:
        """Validate only the given fields (for updates), with the same rules."""
        row = cls.model_construct()
        try:
            for k, v in values.items():
                setattr(row, k, v)
        except ValidationError as e:
            raise ValueError(first_problem(e)) from None
        return {k: getattr(row, k) for k in values}


class ExperimentRow(Row):
    id: Id
    name: Str(200)
    protocol_name: Str(200)
    protocol: JsonObject = {}
    args: JsonObject = {}
    model: JsonObject = {}
    status: Status = "running"
    created_at: Time = None
    finished_at: Time = None


class SessionRow(Row):
    id: Id
    created_at: Time = None
    kind: Kind
    title: Str(500) = ""
    user: OptStr(200) = None
    model: JsonObject = {}
    system_prompt: OptStr() = None
    blind: Flag = False
    pane_order: PaneOrder = None
    experiment_id: OptId = None
    item_key: ItemKey = None
    seed: OptSeed = None
    meta: JsonObject = {}


class ArmRow(Row):
    index: Index
    label: Str(200) = ""
    spec: Str() = ""
    settings: JsonObject = {}
    seed: Seed = 0


class TurnRow(Row):
    arm_index: Index  # which arm (the store looks up its row id)
    turn_index: Index
    role: Role
    text: Str() = ""
    token_ids: TokenIds = []
    started_at: Time = None
    finished_at: Time = None
    ttft_s: Seconds = None
    duration_s: Seconds = None
    n_tokens: OptIndex = None  # None: len(token_ids)
    finish_reason: FinishReason = None
    gen_settings: JsonObject = {}
    error: OptStr() = None
    meta: JsonObject = {}


class TurnKey(Row):
    """Rows of a bundle that belong to one turn name it by (arm_index, turn_index, role)."""

    arm_index: Index
    turn_index: Index
    role: Role


class AnnotationRow(TurnKey):
    annotator: Annotator
    stance_label: Stance
    note: Str() = ""
    confidence: Confidence = None
    created_at: Time = None


class ScoreRow(TurnKey):
    scorer: Str(100)
    label: OptStr(200) = None
    value: OptNumber = None
    data: JsonValue = None
    created_at: Time = None


class ProbeRow(Row):
    arm_index: Index
    turn_index: OptIndex = None  # None: the probe is about the arm, not one turn
    role: OptRole = None
    kind: Str(100)
    metrics: JsonValue = None
    created_at: Time = None


class CaptureRow(TurnKey):
    kind: Str(100)
    path: CapturePath = None
    data: JsonValue = None
    created_at: Time = None


# ----------------------------------------------------------------- bundles

BUNDLE_FORMAT = "memory-linkage-lab/session-bundle"
BUNDLE_VERSION = 1


class Bundle(BaseModel):
    """A session bundle (db.export.export_bundle) as import_bundle accepts it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[BUNDLE_FORMAT]
    version: Literal[BUNDLE_VERSION]
    schema_version: Annotated[int, BeforeValidator(lambda v: _int(v, 1, SCHEMA_VERSION, "a schema version"))]
    session: SessionRow
    experiment: Optional[ExperimentRow] = None
    arms: list[ArmRow]
    turns: list[TurnRow]
    annotations: list[AnnotationRow] = []
    scores: list[ScoreRow] = []
    probes: list[ProbeRow] = []
    captures: list[CaptureRow] = []
    sealed: Optional[str] = None  # an unrevealed blind session: the full bundle (see db.export.export_bundle)


SEAL_LIMIT = 512 << 20  # bytes a sealed bundle may inflate to


def seal(bundle: dict) -> str:
    """A whole bundle, compressed and base64-encoded: not readable at a glance. It is not
    encryption: anyone who decodes it on purpose sees the arms."""
    raw = json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def unseal(text: str) -> dict:
    try:
        z = zlib.decompressobj()
        raw = z.decompress(base64.b64decode(text.encode("ascii"), validate=True), SEAL_LIMIT)
        if z.unconsumed_tail:
            raise ValueError(f"it inflates to more than {SEAL_LIMIT:,} bytes")
        data = json.loads(raw.decode("utf-8"))
    except (binascii.Error, zlib.error, UnicodeError, ValueError, RecursionError) as e:
        raise ValueError(f"sealed: not a sealed bundle ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or "sealed" in data:
        raise ValueError("sealed: not a sealed bundle (expected one bundle without a seal of its own)")
    return data


def _key(r) -> tuple:
    return (r.arm_index, r.turn_index, r.role)


def _where(r) -> str:
    return f"turn {r.turn_index} ({r.role}) of arm {r.arm_index}"


def check_bundle(data) -> Bundle:
    """Validate a bundle whole: every field of every row, then how the rows refer to each other.
    A problem raises ValueError('<key path>: <what is wrong>'), naming the first one found."""
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"not a session bundle (missing format marker {BUNDLE_FORMAT!r})")
    if data.get("version") != BUNDLE_VERSION:
        raise ValueError(
            f"bundle version {_show(data.get('version'))} is not supported (this code reads {BUNDLE_VERSION})"
        )
    try:
        b = Bundle.model_validate(data)
    except ValidationError as e:
        raise ValueError(first_problem(e)) from None
    _check_references(b)
    if b.sealed is None:
        return b
    inner = unseal(b.sealed)
    try:
        full = check_bundle(inner)
    except ValueError as e:
        raise ValueError(f"sealed.{e}") from None
    if full.session.id != b.session.id:
        raise ValueError(f"sealed.session.id: {full.session.id} does not match session.id {b.session.id}")
    return full


def _check_references(b: Bundle) -> None:
    s = b.session
    if b.experiment is not None and b.experiment.id != s.experiment_id:
        raise ValueError(
            f"experiment.id: the bundle carries experiment {b.experiment.id} but the session "
            f"belongs to {s.experiment_id}"
        )
    arms = set()
    for i, a in enumerate(b.arms):
        if a.index in arms:
            raise ValueError(f"arms[{i}].index: arm {a.index} appears twice")
        arms.add(a.index)
    if s.pane_order is not None and (len(set(s.pane_order)) != len(s.pane_order) or not set(s.pane_order) <= arms):
        raise ValueError(f"session.pane_order: {s.pane_order} must list distinct arm indices out of {sorted(arms)}")
    turns = {}
    for i, t in enumerate(b.turns):
        if t.arm_index not in arms:
            raise ValueError(f"turns[{i}].arm_index: the bundle has no arm {t.arm_index}")
        if _key(t) in turns:
            raise ValueError(f"turns[{i}]: {_where(t)} appears twice")
        turns[_key(t)] = t
    for name in ("annotations", "scores", "captures"):
        seen = set()
        for i, r in enumerate(getattr(b, name)):
            if _key(r) not in turns:
                raise ValueError(f"{name}[{i}]: refers to {_where(r)}, which the bundle does not contain")
            if name == "annotations" and r.role != "assistant":
                raise ValueError(f"{name}[{i}].role: only assistant turns are annotated, not {r.role} messages")
            if name != "annotations":
                k = (_key(r), r.scorer if name == "scores" else r.kind)
                if k in seen:
                    raise ValueError(f"{name}[{i}]: a second {k[1]!r} row for {_where(r)}")
                seen.add(k)
    for i, p in enumerate(b.probes):
        if p.arm_index not in arms:
            raise ValueError(f"probes[{i}].arm_index: the bundle has no arm {p.arm_index}")
        if (p.turn_index is None) != (p.role is None):
            raise ValueError(f"probes[{i}]: turn_index and role are both set or both null")
        if p.turn_index is not None and _key(p) not in turns:
            raise ValueError(f"probes[{i}]: refers to {_where(p)}, which the bundle does not contain")


# ------------------------------------------------------------------ errors


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def first_problem(e: ValidationError, prefix=()) -> str:
    """'key.path[3].field: what is wrong' for the first error pydantic found."""
    err = e.errors(include_url=False)[0]
    loc = _path((*prefix, *err["loc"]))
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif kind == "missing":
        msg = "missing"
    elif kind == "extra_forbidden":
        msg = "unknown key"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        msg = f"expected an object, got {_show(err.get('input'))}"
    elif kind == "list_type":
        msg = f"expected a list, got {_show(err.get('input'))}"
    else:
        msg = f"{msg[:1].lower()}{msg[1:]} (got {_show(err.get('input'))})"
    return f"{loc}: {msg}" if loc else msg
