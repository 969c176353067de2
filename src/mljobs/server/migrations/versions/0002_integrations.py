"""external access integrations (named egress policies)

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
    op.create_table(
        "integrations",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("allowed_hosts", sa.JSON, nullable=False),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("integrations")
