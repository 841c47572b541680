"""Scale-out (issue 13): the store is the queue. A claimed job names its worker and holds a lease;
a cancel is a flag the worker polls; aging (skips) is kept with the job; previews are stripped a
while after the end, once every front end has followed them.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("worker", sa.String(64), nullable=True))
        jobs.add_column(sa.Column("lease_until", sa.DateTime, nullable=True))
        jobs.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()))
        jobs.add_column(sa.Column("skips", sa.Integer, nullable=False, server_default="0"))
        jobs.add_column(sa.Column("previews_stripped", sa.Boolean, nullable=False, server_default=sa.false()))
        jobs.create_index("ix_jobs_state_lease", ["state", "lease_until"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ix_jobs_state_lease")
        for column in ("previews_stripped", "skips", "cancel_requested", "lease_until", "worker"):
            jobs.drop_column(column)
