"""outbox_job: one index on (dedupe_key, state) for the pending-job-with-this-key lookup

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 20:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_outbox_job_dedupe_key_state", "outbox_job", ["dedupe_key", "state"], unique=False
    )
    # The new index leads with dedupe_key: it answers every lookup the old one did.
    op.drop_index("ix_outbox_job_dedupe_key", table_name="outbox_job")


def downgrade() -> None:
    op.create_index("ix_outbox_job_dedupe_key", "outbox_job", ["dedupe_key"], unique=False)
    op.drop_index("ix_outbox_job_dedupe_key_state", table_name="outbox_job")
