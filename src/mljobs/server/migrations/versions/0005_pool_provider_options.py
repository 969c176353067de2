"""pools: provider options (a Slurm partition, a Ray cluster's address, ...)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("provider_options", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("provider_options")
