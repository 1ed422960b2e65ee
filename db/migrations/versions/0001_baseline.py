"""Baseline: the schema of the last release with hand-written migrations (schema_info version 1).

A SQLite file made by that release already has these tables; db.schema stamps it with this
revision instead of running it. On PostgreSQL the JSON columns are jsonb and the integers 64-bit.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
INT = sa.Integer().with_variant(sa.BigInteger(), "postgresql")


def upgrade() -> None:
    info = op.create_table(
        "schema_info", sa.Column("id", INT, primary_key=True), sa.Column("schema_version", INT, nullable=False)
    )
    op.bulk_insert(info, [{"id": 1, "schema_version": 1}])
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("protocol_name", sa.String(200), nullable=False),
        sa.Column("protocol", JSON, nullable=False),
        sa.Column("args", JSON, nullable=False),
        sa.Column("model", JSON, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("user", sa.String(200), nullable=True),
        sa.Column("model", JSON, nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("blind", sa.Boolean(), nullable=False),
        sa.Column("pane_order", JSON, nullable=False),
        sa.Column("experiment_id", sa.String(32), sa.ForeignKey("experiments.id"), nullable=True),
        sa.Column("item_key", sa.String(200), nullable=True),
        sa.Column("seed", INT, nullable=True),
        sa.Column("meta", JSON, nullable=False),
    )
    op.create_index("ix_sessions_resume", "sessions", ["experiment_id", "item_key", "seed"])
    op.create_index("ix_sessions_created_at", "sessions", ["created_at"])
    op.create_table(
        "arms",
        sa.Column("id", INT, primary_key=True),
        sa.Column("session_id", sa.String(32), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("arm_index", INT, nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("settings", JSON, nullable=False),
        sa.Column("seed", INT, nullable=False),
        sa.UniqueConstraint("session_id", "arm_index"),
    )
    op.create_table(
        "turns",
        sa.Column("id", INT, primary_key=True),
        sa.Column("session_id", sa.String(32), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("arm_id", INT, sa.ForeignKey("arms.id", ondelete="CASCADE"), nullable=False),
        sa.Column("turn_index", INT, nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", JSON, nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("ttft_s", sa.Float(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("n_tokens", INT, nullable=False),
        sa.Column("finish_reason", sa.String(20), nullable=True),
        sa.Column("gen_settings", JSON, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("meta", JSON, nullable=False),
        sa.UniqueConstraint("arm_id", "turn_index", "role"),
    )
    op.create_index("ix_turns_session_id", "turns", ["session_id"])
    op.create_table(
        "annotations",
        sa.Column("id", INT, primary_key=True),
        sa.Column("turn_id", INT, sa.ForeignKey("turns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("annotator", sa.String(200), nullable=False),
        sa.Column("stance_label", sa.String(100), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_annotations_turn_id", "annotations", ["turn_id"])
    op.create_table(
        "scores",
        sa.Column("id", INT, primary_key=True),
        sa.Column("turn_id", INT, sa.ForeignKey("turns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("scorer", sa.String(100), nullable=False),
        sa.Column("label", sa.String(200), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("data", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("turn_id", "scorer"),
    )
    op.create_table(
        "probe_results",
        sa.Column("id", INT, primary_key=True),
        sa.Column("turn_id", INT, sa.ForeignKey("turns.id", ondelete="CASCADE"), nullable=True),
        sa.Column("arm_id", INT, sa.ForeignKey("arms.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_probe_results_arm_id", "probe_results", ["arm_id"])
    op.create_index("ix_probe_results_turn_id", "probe_results", ["turn_id"])
    op.create_table(
        "captures",
        sa.Column("id", INT, primary_key=True),
        sa.Column("turn_id", INT, sa.ForeignKey("turns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("data", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("turn_id", "kind"),
    )


def downgrade() -> None:
    for table in (
        "captures",
        "probe_results",
        "scores",
        "annotations",
        "turns",
        "arms",
        "sessions",
        "experiments",
        "schema_info",
    ):
        op.drop_table(table)
