"""One session per (experiment, item, seed), and schema_info version 2.

The resume index becomes unique, so a dialogue written twice (a Ray retry, two runners on one
database) is refused by the database itself. schema_info goes to 2 so that releases from before
Alembic, which know only version 1, refuse this database instead of writing to it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    dup = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT experiment_id, item_key, seed, COUNT(*) FROM sessions WHERE experiment_id IS NOT NULL "
                "GROUP BY experiment_id, item_key, seed HAVING COUNT(*) > 1"
            )
        )
        .first()
    )
    if dup is not None:
        raise RuntimeError(
            f"experiment {dup[0]} has {dup[3]} sessions for item {dup[1]!r} seed {dup[2]}; "
            f"delete all but one before upgrading"
        )
    with op.batch_alter_table("sessions") as batch:
        batch.drop_index("ix_sessions_resume")
        batch.create_index("uq_sessions_dialogue", ["experiment_id", "item_key", "seed"], unique=True)
    op.execute("UPDATE schema_info SET schema_version = 2 WHERE id = 1")


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_index("uq_sessions_dialogue")
        batch.create_index("ix_sessions_resume", ["experiment_id", "item_key", "seed"])
    op.execute("UPDATE schema_info SET schema_version = 1 WHERE id = 1")
