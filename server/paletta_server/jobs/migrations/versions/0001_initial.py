"""The job store as it was before migrations: jobs, their events and their outputs.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("capability", sa.String(32), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True, unique=True),
        sa.Column("spec", sa.LargeBinary, nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("cancel_on_disconnect", sa.Boolean, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False, index=True),
        sa.Column("started", sa.DateTime, nullable=True),
        sa.Column("ended", sa.DateTime, nullable=True),
        sa.Column("error", sa.LargeBinary, nullable=True),
        sa.Column("last_seq", sa.Integer, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "outputs",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("index", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("approved", sa.Boolean, nullable=False, index=True),
        sa.Column("approved_at", sa.DateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("outputs")
    op.drop_table("events")
    op.drop_table("jobs")
