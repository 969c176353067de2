"""The store's tables (SQLAlchemy Core). Alembic migrations under ``migrations/`` make them in an
existing store; a new store gets them from here directly (:meth:`Store.migrate`), stamped at
:data:`SCHEMA_REVISION`. A change here comes with its migration, and the revision moves with it
(tests/unit/test_schema.py checks both)."""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["SCHEMA_REVISION", "alembic_version", "metadata", "pools", "jobs", "instances", "job_events", "stages",
           "integrations", "users", "secrets",
           "definitions", "schedules", "schedule_events", "quotas", "usage_spans"]

metadata = sa.MetaData()

SCHEMA_REVISION = "0011"  # the newest migration's revision: what a store made from these tables is at

# Alembic's own table (not part of the store's metadata): the revision a store is at.
alembic_version = sa.Table(
    "alembic_version", sa.MetaData(),
    sa.Column("version_num", sa.String(32), nullable=False),
    sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)

pools = sa.Table(
    "pools", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("instance_family", sa.String(64), nullable=False),
    sa.Column("min_nodes", sa.Integer, nullable=False),
    sa.Column("max_nodes", sa.Integer, nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("suspended", sa.Boolean, nullable=False, default=False),
    sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("owner", sa.String(255)),  # None: made before owners were recorded
    sa.Column("provider_options", sa.JSON),  # what the provider needs: a partition, a cluster address
    # how the queue is ordered: "fair" (least recent usage first) or "fifo"; None: fair once the
    # server has users. Priorities come first either way; preemption lets a higher one take
    # instances of lower ones; max_priority: the highest a non-admin may ask for.
    sa.Column("scheduling", sa.String(8)),
    sa.Column("preemption", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Column("max_priority", sa.Integer, nullable=False, default=0, server_default="0"),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("database_name", sa.String(255), nullable=False),
    sa.Column("schema_name", sa.String(255), nullable=False),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("compute_pool", sa.String(255), nullable=False),
    sa.Column("stage_name", sa.String(255), nullable=False),
    sa.Column("target_instances", sa.Integer, nullable=False),
    sa.Column("min_instances", sa.Integer, nullable=False),
    sa.Column("instances_ran", sa.Integer, nullable=False, default=0),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_time", sa.DateTime(timezone=True)),
    sa.Column("completed_time", sa.DateTime(timezone=True)),
    # the client's key for one submission: a retried POST /jobs finds the job it already made
    sa.Column("idempotency_key", sa.String(255)),
    # which run of the job this is: a job whose instance was lost is requeued as its next attempt
    sa.Column("attempt", sa.Integer, nullable=False, default=1, server_default="1"),
    sa.Column("definition_name", sa.String(255)),  # the definition it was called from, if any
    sa.Column("schedule_name", sa.String(255)),  # a scheduled run: its schedule and the tick it is for
    sa.Column("scheduled_tick", sa.DateTime(timezone=True)),
    sa.Column("priority", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("preempted_by", sa.String(64)),  # the job that took its instances (it ends or is requeued)
    sa.Index("ix_jobs_pool_status_owner", "compute_pool", "status", "owner", sa.text("priority DESC"), "created_time",
             "id"),
    sa.Index("ix_jobs_schedule_tick", "owner", "schedule_name", "scheduled_tick", unique=True),
    sa.Index("ix_jobs_pool_status", "compute_pool", "status", "created_time"),
    sa.Index("ix_jobs_created", "created_time"),
    sa.Index("ix_jobs_owner_idempotency", "owner", "idempotency_key", unique=True),
    sa.Index("ix_jobs_owner_created", "owner", "created_time"),
    sa.Index("ix_jobs_status_completed", "status", "completed_time"),
)

instances = sa.Table(
    "instances", metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("instance_id", sa.Integer, primary_key=True),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),  # STARTING, RUNNING, EXITED
    sa.Column("handle", sa.JSON),
    sa.Column("exit_code", sa.Integer),
    sa.Column("started_time", sa.DateTime(timezone=True)),
    sa.Column("ended_time", sa.DateTime(timezone=True)),
    # Resource use, written when the instance ends (mljobs.server.metrics): totals and samples.
    sa.Column("cpu_seconds", sa.Float),
    sa.Column("peak_rss_bytes", sa.BigInteger),
    sa.Column("metrics", sa.JSON),
    # How it ended (InstanceExit.to_record: exit code, cancelled, lost, error, oom, usage, log tail,
    # has_result), written by the UPDATE that marks it EXITED: completion never needs its files again.
    sa.Column("exit_record", sa.JSON),
    sa.Index("ix_instances_status", "status"),
)

job_events = sa.Table(  # every status a job took, when, and why: its timeline
    "job_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False, default="", server_default=""),
    sa.Index("ix_job_events_job", "job_id", "id"),
)

stages = sa.Table(
    "stages", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("owner", sa.String(255)),  # None: shared (made before owners were recorded)
)

integrations = sa.Table(  # external access integrations: named egress policies
    "integrations", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("allowed_hosts", sa.JSON, nullable=False),
    sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
)

users = sa.Table(  # people (and services) with their own tokens; only a SHA-256 of each is kept
    "users", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("admin", sa.Boolean, nullable=False),
    sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("uid", sa.Integer),  # what their sandboxed jobs run as (server as root); given on first use
    sa.UniqueConstraint("uid", name="uq_users_uid"),
)

secrets = sa.Table(  # the server's own keys (the one that signs job tokens)
    "secrets", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

definitions = sa.Table(  # jobs registered once (payload kept on a stage) and called many times
    "definitions", metadata,
    sa.Column("owner", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),  # one more on each overwrite
    sa.Column("stage_name", sa.String(255), nullable=False),
    sa.Column("payload_prefix", sa.String(1024), nullable=False),  # the payload's folder on the stage
    sa.Column("spec", sa.JSON, nullable=False),  # the JobSpec every call starts from
    sa.Column("signature", sa.JSON),  # a function's parameters, so calls are checked before they run
    sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_time", sa.DateTime(timezone=True), nullable=False),
)

schedules = sa.Table(  # a definition called on a clock; the server fires each tick once
    "schedules", metadata,
    sa.Column("owner", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("definition_name", sa.String(255), nullable=False),
    sa.Column("cron", sa.String(255)),  # a 5-field cron expression, or
    sa.Column("every_s", sa.Float),  # an interval in seconds
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("concurrency", sa.String(16), nullable=False),  # forbid, allow, replace
    sa.Column("catchup", sa.Boolean, nullable=False),
    sa.Column("start_at", sa.DateTime(timezone=True)),
    sa.Column("end_at", sa.DateTime(timezone=True)),
    sa.Column("args", sa.JSON),  # a file definition's arguments
    sa.Column("call_payload", sa.LargeBinary),  # a function definition's pickled call (args, kwargs)
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("next_tick", sa.DateTime(timezone=True)),  # None: no tick left (past end_at)
    sa.Column("last_tick", sa.DateTime(timezone=True)),
    sa.Column("last_job_id", sa.String(64)),
    sa.Column("note", sa.Text, nullable=False, default="", server_default=""),  # why runs wait, if they do
    sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_schedules_next_tick", "paused", "next_tick"),
)

schedule_events = sa.Table(  # a schedule's history: ticks fired, skipped, and changes
    "schedule_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("schedule_name", sa.String(255), nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("tick", sa.DateTime(timezone=True)),
    sa.Column("kind", sa.String(16), nullable=False),  # fired, skipped, paused, resumed, replaced
    sa.Column("job_id", sa.String(64)),
    sa.Column("message", sa.Text, nullable=False, default="", server_default=""),
    sa.Index("ix_schedule_events_schedule", "owner", "schedule_name", "id"),
)

quotas = sa.Table(  # per user ('*': everyone's default) and pool ('*': every pool's); None: no limit
    "quotas", metadata,
    sa.Column("owner", sa.String(255), primary_key=True),
    sa.Column("pool", sa.String(255), primary_key=True),
    sa.Column("max_instances", sa.Integer),  # running at once: more wait, their pending reason says so
    sa.Column("max_queued", sa.Integer),  # queued at once: more are refused at submit
    sa.Column("max_instance_hours", sa.Float),  # over the last 24 h: more are refused at submit
)

usage_spans = sa.Table(  # each ended instance's run, kept apart from the job: fair share and daily quotas
    # read it, so that deleting a job or requeueing its attempt (which drop its instance rows) does
    # not give its owner that usage back; rows older than the longest look back are pruned
    "usage_spans", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("compute_pool", sa.String(255), nullable=False),
    sa.Column("instance_family", sa.String(64), nullable=False),
    sa.Column("started_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_time", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_usage_spans_ended", "ended_time"),
)
