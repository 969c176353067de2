"""instance exit record: how each instance ended, kept with its EXITED status

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
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("exit_record", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("exit_record")
