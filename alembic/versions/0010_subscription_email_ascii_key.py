"""subscription.email_ascii_key: the address with its domain in ASCII (`xn--`), for a search
typed that way, whole or half-way; filled for the subscriptions already there

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 20:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from app import addresses

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows read at a time: memory stays flat on any size of table.
BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("subscription", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "email_ascii_key", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True
            )
        )
    connection = op.get_bind()
    subscription = sa.table(
        "subscription",
        sa.column("id", sa.Integer),
        sa.column("email", sa.String),
        sa.column("email_ascii_key", sa.String),
    )
    after = 0
    while True:
        rows = connection.execute(
            sa.select(subscription.c.id, subscription.c.email)
            .where(subscription.c.id > after)
            .order_by(subscription.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        after = rows[-1][0]
        # Only an internationalized domain has another spelling.
        spelled = [
            {"row_id": row_id, "ascii_key": ascii_key}
            for row_id, email in rows
            if (ascii_key := addresses.ascii_key(email)) is not None
        ]
        if spelled:
            connection.execute(
                subscription.update()
                .where(subscription.c.id == sa.bindparam("row_id"))
                .values(email_ascii_key=sa.bindparam("ascii_key")),
                spelled,
            )


def downgrade() -> None:
    with op.batch_alter_table("subscription", schema=None) as batch_op:
        batch_op.drop_column("email_ascii_key")
