"""initial schema: pools, jobs, instances, stages

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
        "pools",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("instance_family", sa.String(64), nullable=False),
        sa.Column("min_nodes", sa.Integer, nullable=False),
        sa.Column("max_nodes", sa.Integer, nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("suspended", sa.Boolean, nullable=False),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("database_name", sa.String(255), nullable=False),
        sa.Column("schema_name", sa.String(255), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("compute_pool", sa.String(255), nullable=False),
        sa.Column("stage_name", sa.String(255), nullable=False),
        sa.Column("target_instances", sa.Integer, nullable=False),
        sa.Column("min_instances", sa.Integer, nullable=False),
        sa.Column("instances_ran", sa.Integer, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_time", sa.DateTime(timezone=True)),
        sa.Column("completed_time", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_jobs_pool_status", "jobs", ["compute_pool", "status", "created_time"])
    op.create_index("ix_jobs_created", "jobs", ["created_time"])
    op.create_table(
        "instances",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("instance_id", sa.Integer, primary_key=True),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("handle", sa.JSON),
        sa.Column("exit_code", sa.Integer),
        sa.Column("started_time", sa.DateTime(timezone=True)),
        sa.Column("ended_time", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "stages",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("stages", "instances", "jobs", "pools"):
        op.drop_table(table)
