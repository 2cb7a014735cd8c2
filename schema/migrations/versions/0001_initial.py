"""tasks and their transition history

Revision ID: 0001
Revises:
"""

from tasklease.schema.migrations import run_sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UP = """
CREATE TYPE task_state AS ENUM ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED', 'DEAD', 'CANCELLED');

CREATE TABLE tasks (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action              text        NOT NULL CHECK (action <> ''),
    queue               text        NOT NULL DEFAULT 'default' CHECK (queue <> ''),
    priority            smallint    NOT NULL DEFAULT 0,
    payload             jsonb       NOT NULL,
    state               task_state  NOT NULL DEFAULT 'PENDING',
    attempt             integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    due_at              timestamptz NOT NULL DEFAULT now(),
    idempotency_key     text,
    -- the token of the latest lease; kept after the lease ends, so a worker whose
    -- reply was lost can tell "I completed it" from "someone else did"
    lease_token         uuid,
    lease_expires_at    timestamptz,
    worker              text,
    cancel_requested_at timestamptz,
    result              jsonb,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (attempt >= 0 AND attempt <= max_attempts),
    CHECK ((state = 'RUNNING') = (lease_expires_at IS NOT NULL AND lease_token IS NOT NULL))
);

-- Claiming reads only these two partial indexes: finished tasks are in neither, however
-- many pile up. With a backlog the claim walks tasks_claimable_order in claim order and
-- stops after the batch; with few tasks due, a range scan of tasks_claimable stops at
-- now(), so tasks scheduled for later are not read (it also finds the next due time).
CREATE INDEX tasks_claimable ON tasks (queue, due_at) WHERE state IN ('PENDING', 'FAILED');
CREATE INDEX tasks_claimable_order ON tasks (queue, priority DESC, due_at, id)
    WHERE state IN ('PENDING', 'FAILED');
-- Most tasks have no key: a partial index costs them nothing on every transition.
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Leases to take over: only RUNNING tasks have one (see the check above). The predicate
-- names the lease, not the state, so statements that guard on state = 'RUNNING' for a
-- batch of ids keep using the primary key instead of walking every running task.
CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at) WHERE lease_expires_at IS NOT NULL;

-- A queue table churns: every claim and completion leaves a dead row version behind, and
-- the claim's index scans step over them until vacuum clears them. Vacuum and analyze it
-- after 1-2 % of changes instead of the default 10-20 %.
ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0.01,
                       autovacuum_analyze_scale_factor = 0.02,
                       autovacuum_vacuum_insert_scale_factor = 0.02);

CREATE TABLE task_transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    -- no foreign key: its check locks the task row for every history row written; history
    -- is only ever written by the statement that moves that very task, and deleted with it
    task_id     bigint      NOT NULL,
    trigger     text        NOT NULL CHECK (trigger IN ('submit', 'claim', 'reclaim', 'expire',
                    'complete', 'fail', 'bury', 'cancel', 'cancel_running', 'release', 'requeue')),
    from_state  task_state,
    to_state    task_state  NOT NULL,
    attempt     integer     NOT NULL,
    worker      text,
    at          timestamptz NOT NULL DEFAULT now(),
    detail      text,
    CHECK ((trigger = 'submit') = (from_state IS NULL)),
    -- one index serves both: a task's history is read in this order
    PRIMARY KEY (task_id, id)
);
"""

DOWN = """
DROP TABLE task_transitions;
DROP TABLE tasks;
DROP TYPE task_state;
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
