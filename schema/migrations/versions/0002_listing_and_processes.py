"""indexes for listing tasks; processes report their counters

Revision ID: 0002
Revises: 0001
"""

from tasklease.schema.migrations import run_sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UP = """
-- GET /tasks pages newest first by id, optionally filtered; keyset, never OFFSET.
-- COMPLETED (the bulk: a page of them is found by walking the primary key) and RUNNING
-- (few: tasks_lease_expiry holds exactly those) are left out, so neither claiming nor
-- completing a task writes an entry here.
CREATE INDEX tasks_state_id ON tasks (state, id) WHERE state NOT IN ('COMPLETED', 'RUNNING');
CREATE INDEX tasks_action_id ON tasks (action, id);
CREATE INDEX tasks_queue_id ON tasks (queue, id);

-- Every API and worker process upserts its row every few seconds: what /metrics and
-- /stats report for the whole cluster, and which workers were seen recently.
CREATE TABLE processes (
    id           text        PRIMARY KEY,
    kind         text        NOT NULL CHECK (kind IN ('api', 'worker')),
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    queues       text[]      NOT NULL DEFAULT '{}',
    concurrency  integer     NOT NULL DEFAULT 0,
    running      integer     NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    -- {"transitions": {"claim": 3, ...}, "durations": {"action": {"buckets": [...], "sum": s}}}
    counters     jsonb       NOT NULL DEFAULT '{}'
);
"""

DOWN = """
DROP TABLE processes;
DROP INDEX tasks_queue_id;
DROP INDEX tasks_action_id;
DROP INDEX tasks_state_id;
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
