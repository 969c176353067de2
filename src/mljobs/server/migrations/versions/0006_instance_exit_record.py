"""instance exit record: how each instance ended, kept with its EXITED status

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("exit_record", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("exit_record")
