"""fair share: pool scheduling options, job priorities and preemption, user quotas

A pool says how its queue is ordered (``scheduling``: fair or fifo; None: fair once the server
has users), whether higher-priority jobs may preempt lower ones, and the highest priority a
non-admin may ask for. A job has a priority and, once preempted, the job that preempted it.
Quotas are per (user or '*', pool or '*').

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("scheduling", sa.String(8)))
        batch.add_column(sa.Column("preemption", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("max_priority", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("preempted_by", sa.String(64)))
    # each user's queue in start order (priority first, then submission): one index seek a user
    op.create_index("ix_jobs_pool_status_owner", "jobs", ["compute_pool", "status", "owner", sa.text("priority DESC"),
                                                          "created_time", "id"])
    # the live instances (a handful) without reading every instance ever recorded
    op.create_index("ix_instances_status", "instances", ["status"])
    op.create_table(
        "quotas",
        sa.Column("owner", sa.String(255), primary_key=True),
        sa.Column("pool", sa.String(255), primary_key=True),
        sa.Column("max_instances", sa.Integer),
        sa.Column("max_queued", sa.Integer),
        sa.Column("max_instance_hours", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("quotas")
    op.drop_index("ix_instances_status", "instances")
    op.drop_index("ix_jobs_pool_status_owner", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preempted_by")
        batch.drop_column("priority")
    with op.batch_alter_table("pools") as batch:
        for col in ("max_priority", "preemption", "scheduling"):
            batch.drop_column(col)
