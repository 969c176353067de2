"""instance resource use: CPU seconds, peak resident memory and the bounded samples

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("cpu_seconds", sa.Float))
        batch.add_column(sa.Column("peak_rss_bytes", sa.BigInteger))
        batch.add_column(sa.Column("metrics", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("metrics")
        batch.drop_column("peak_rss_bytes")
        batch.drop_column("cpu_seconds")
