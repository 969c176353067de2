"""user uid: the uid a user's sandboxed jobs run as on a server that runs as root

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("uid", sa.Integer))
        batch.create_unique_constraint("uq_users_uid", ["uid"])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_uid", type_="unique")
        batch.drop_column("uid")
