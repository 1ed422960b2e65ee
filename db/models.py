"""
The schema of the lab's record: one row per experiment, session, arm, turn,
annotation, score, probe result and capture.

The tables hold what callers hand them (settings, model identity, token ids,
metadata) as JSON, so db/ never needs to know what an arm's mechanism is.
Timestamps are stored as UTC and always come back timezone-aware.
"""

import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    inspect,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# schema_info.schema_version: 1 was the last release with hand-written migrations; from 2 on
# Alembic (db/migrations) keeps the schema, and the number only makes those older releases
# refuse a database they could no longer keep (they refuse any version above 1).
SCHEMA_VERSION = 2

# jsonb on PostgreSQL: its plain json type has no equality, so DISTINCT / GROUP BY / = fail.
JSONData = JSON().with_variant(JSONB(), "postgresql")
# SQLite's INTEGER is 64-bit; PostgreSQL's is 32-bit, and seeds (db/rules.py) go up to 2**63 - 1.
Int64 = Integer().with_variant(BigInteger(), "postgresql")

STANCE_LABELS = [
    "initial stance",
    "maintained",
    "partially revised",
    "fully revised",
    "contradiction acknowledged",
    "off-topic / incoherent",
]
ROLES = ("system", "user", "assistant")  # also the order of roles within one turn index
FINISH_REASONS = ("eos", "length", "stopped", "error")
SESSION_KINDS = ("lab", "experiment")
EXPERIMENT_STATUSES = ("running", "finished", "interrupted", "failed")


class SchemaError(RuntimeError):
    """The database cannot be brought to this code's schema (e.g. a newer version wrote it)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def to_utc(value) -> Optional[datetime]:
    """Accept an aware/naive datetime, epoch seconds (time.time()) or an ISO string.
    Naive datetimes follow Python's convention: they are local time."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    return value.astimezone(timezone.utc)


class UTCDateTime(TypeDecorator):
    """DateTime that stores UTC and returns aware datetimes, also on SQLite (which drops tzinfo)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        value = to_utc(value)
        return None if value is None else value.replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, int: Int64}


def new_id() -> str:
    return uuid.uuid4().hex


class SchemaInfo(Base):
    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(primary_key=True)
    schema_version: Mapped[int] = mapped_column(Int64)


class Experiment(Base):
    __tablename__ = "experiments"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    protocol_name: Mapped[str] = mapped_column(String(200))
    protocol: Mapped[Any] = mapped_column(JSONData)  # the validated protocol content
    args: Mapped[Any] = mapped_column(JSONData)  # CLI args: arms, seeds, items, max_new_tokens...
    model: Mapped[Any] = mapped_column(JSONData)  # model identity
    status: Mapped[str] = mapped_column(String(20), default="running")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[datetime]]


class LabSession(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(20))  # 'lab' | 'experiment'
    title: Mapped[str] = mapped_column(String(500), default="")
    user: Mapped[Optional[str]] = mapped_column(String(200))
    model: Mapped[Any] = mapped_column(JSONData)  # name, weights_hash, dtype, quantization...
    system_prompt: Mapped[Optional[str]] = mapped_column(Text)
    blind: Mapped[bool] = mapped_column(Boolean, default=False)
    pane_order: Mapped[Any] = mapped_column(JSONData)  # arm indices in display order
    experiment_id: Mapped[Optional[str]] = mapped_column(ForeignKey("experiments.id"))
    item_key: Mapped[Optional[str]] = mapped_column(String(200))
    seed: Mapped[Optional[int]]
    meta: Mapped[Any] = mapped_column(JSONData)
    # one dialogue per (experiment, item, seed): a retried or duplicated write cannot add a second
    # (lab sessions have no experiment, and NULLs never collide)
    __table_args__ = (Index("uq_sessions_dialogue", "experiment_id", "item_key", "seed", unique=True),)


class Arm(Base):
    __tablename__ = "arms"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column("arm_index", Int64)  # position in the session's arm list
    label: Mapped[str] = mapped_column(String(200))  # "observer", "continuity λ=1"
    spec: Mapped[str] = mapped_column(Text)  # "continuity:linkage=1,gain=0.3,..."
    settings: Mapped[Any] = mapped_column(JSONData)  # full mechanism + sampling settings
    seed: Mapped[int]
    __table_args__ = (UniqueConstraint("session_id", "arm_index"),)


class Turn(Base):
    __tablename__ = "turns"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    arm_id: Mapped[int] = mapped_column(ForeignKey("arms.id", ondelete="CASCADE"))
    turn_index: Mapped[int]  # 0-based user/assistant exchange number
    role: Mapped[str] = mapped_column(String(20))
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[Any] = mapped_column(JSONData)  # exactly this message's tokens, list[int]
    started_at: Mapped[Optional[datetime]]
    finished_at: Mapped[Optional[datetime]]
    ttft_s: Mapped[Optional[float]] = mapped_column(Float)
    duration_s: Mapped[Optional[float]] = mapped_column(Float)
    n_tokens: Mapped[int]
    finish_reason: Mapped[Optional[str]] = mapped_column(String(20))
    gen_settings: Mapped[Any] = mapped_column(JSONData)  # settings actually used, incl. per-turn seed
    error: Mapped[Optional[str]] = mapped_column(Text)
    meta: Mapped[Any] = mapped_column(JSONData)
    __table_args__ = (UniqueConstraint("arm_id", "turn_index", "role"),)


class Annotation(Base):
    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    annotator: Mapped[str] = mapped_column(String(200))
    stance_label: Mapped[str] = mapped_column(String(100))
    note: Mapped[str] = mapped_column(Text, default="")
    confidence: Mapped[Optional[float]] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Score(Base):
    __tablename__ = "scores"
    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"))
    scorer: Mapped[str] = mapped_column(String(100))
    label: Mapped[Optional[str]] = mapped_column(String(200))
    value: Mapped[Optional[float]] = mapped_column(Float)
    data: Mapped[Any] = mapped_column(JSONData)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (UniqueConstraint("turn_id", "scorer"),)


class ProbeResult(Base):
    __tablename__ = "probe_results"
    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[Optional[int]] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    arm_id: Mapped[int] = mapped_column(ForeignKey("arms.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(100))
    metrics: Mapped[Any] = mapped_column(JSONData)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Capture(Base):
    __tablename__ = "captures"
    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(100))  # 'attention', 'reads', 'divergence'
    path: Mapped[Optional[str]] = mapped_column(Text)  # a file next to the DB, relative to its folder
    data: Mapped[Any] = mapped_column(JSONData, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (UniqueConstraint("turn_id", "kind"),)


def as_dict(row) -> dict:
    """A detached plain copy of an ORM row, safe to hand to other threads."""
    return {a.key: getattr(row, a.key) for a in inspect(row).mapper.column_attrs}
