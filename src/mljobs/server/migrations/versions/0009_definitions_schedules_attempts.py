"""definitions, schedules and attempts: jobs registered once and called many times, fired on a
clock, and requeued as their next attempt when an instance is lost

A job row says which attempt it is on (1 for the first), which definition it was called from,
and for a scheduled run its schedule and tick; one job per (owner, schedule, tick) at most, so a
tick can never make two jobs, whichever server fires it.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("definition_name", sa.String(255)))
        batch.add_column(sa.Column("schedule_name", sa.String(255)))
        batch.add_column(sa.Column("scheduled_tick", sa.DateTime(timezone=True)))
    op.create_index("ix_jobs_schedule_tick", "jobs", ["owner", "schedule_name", "scheduled_tick"], unique=True)
    op.create_table(
        "definitions",
        sa.Column("owner", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("stage_name", sa.String(255), nullable=False),
        sa.Column("payload_prefix", sa.String(1024), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("signature", sa.JSON),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "schedules",
        sa.Column("owner", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("definition_name", sa.String(255), nullable=False),
        sa.Column("cron", sa.String(255)),
        sa.Column("every_s", sa.Float),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("concurrency", sa.String(16), nullable=False),
        sa.Column("catchup", sa.Boolean, nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True)),
        sa.Column("end_at", sa.DateTime(timezone=True)),
        sa.Column("args", sa.JSON),
        sa.Column("call_payload", sa.LargeBinary),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("next_tick", sa.DateTime(timezone=True)),
        sa.Column("last_tick", sa.DateTime(timezone=True)),
        sa.Column("last_job_id", sa.String(64)),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_schedules_next_tick", "schedules", ["paused", "next_tick"])
    op.create_table(
        "schedule_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("schedule_name", sa.String(255), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tick", sa.DateTime(timezone=True)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(64)),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_schedule_events_schedule", "schedule_events", ["owner", "schedule_name", "id"])


def downgrade() -> None:
    op.drop_index("ix_schedule_events_schedule", "schedule_events")
    op.drop_table("schedule_events")
    op.drop_index("ix_schedules_next_tick", "schedules")
    op.drop_table("schedules")
    op.drop_table("definitions")
    op.drop_index("ix_jobs_schedule_tick", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for col in ("scheduled_tick", "schedule_name", "definition_name", "attempt"):
            batch.drop_column(col)
