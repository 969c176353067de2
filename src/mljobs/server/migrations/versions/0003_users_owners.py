"""users with hashed tokens, owners of pools and stages, idempotent submit, server secrets

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    with op.batch_alter_table("pools") as b:
        b.add_column(sa.Column("owner", sa.String(255), nullable=True))
    with op.batch_alter_table("stages") as b:
        b.add_column(sa.Column("owner", sa.String(255), nullable=True))
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        b.create_index("ix_jobs_owner_idempotency", ["owner", "idempotency_key"], unique=True)
        b.create_index("ix_jobs_owner_created", ["owner", "created_time"])
        b.create_index("ix_jobs_status_completed", ["status", "completed_time"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_index("ix_jobs_status_completed")
        b.drop_index("ix_jobs_owner_created")
        b.drop_index("ix_jobs_owner_idempotency")
        b.drop_column("idempotency_key")
    with op.batch_alter_table("stages") as b:
        b.drop_column("owner")
    with op.batch_alter_table("pools") as b:
        b.drop_column("owner")
    op.drop_table("secrets")
    op.drop_table("users")
