"""usage spans: each ended instance's run, kept apart from its job

Fair share and the daily instance-hours quota read them, so that deleting a job or requeueing its
attempt (both drop the job's instance rows) does not give its owner that usage back. Filled from
the instances that ended already.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    spans = op.create_table(
        "usage_spans",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("compute_pool", sa.String(255), nullable=False),
        sa.Column("instance_family", sa.String(64), nullable=False),
        sa.Column("started_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_usage_spans_ended", "usage_spans", ["ended_time"])
    jobs, instances, pools = (sa.table(n, *[sa.column(c) for c in cols]) for n, cols in (
        ("jobs", ("id", "owner", "compute_pool")), ("instances", ("job_id", "status", "started_time", "ended_time")),
        ("pools", ("name", "instance_family"))))
    op.execute(spans.insert().from_select(
        ["owner", "compute_pool", "instance_family", "started_time", "ended_time"],
        sa.select(jobs.c.owner, jobs.c.compute_pool, pools.c.instance_family, instances.c.started_time,
                  instances.c.ended_time)
        .join(jobs, jobs.c.id == instances.c.job_id).join(pools, pools.c.name == jobs.c.compute_pool)
        .where(instances.c.status == "EXITED", instances.c.started_time.is_not(None),
               instances.c.ended_time.is_not(None))))


def downgrade() -> None:
    op.drop_index("ix_usage_spans_ended", "usage_spans")
    op.drop_table("usage_spans")
