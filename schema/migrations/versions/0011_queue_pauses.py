"""paused queues: a claim in a paused queue starts nothing; submissions are still accepted

Revision ID: 0011
Revises: 0010
"""

from tasklease.schema.migrations import run_sql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UP = """
-- One row per paused queue (tasklease pause, POST /queues/{queue}/pause). The claim reads
-- it: in a paused queue it neither claims nor takes over a crashed worker's task; tasks
-- already running finish. Resuming deletes the row and wakes the workers (NOTIFY).
CREATE TABLE queue_pauses (
    queue     text        PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);
"""

DOWN = """
DROP TABLE queue_pauses;
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
