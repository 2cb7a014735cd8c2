"""tasks and their transition history

Revision ID: 0001
Revises:
"""

from schema.migrations import run_sql

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
    idempotency_key     text        UNIQUE,
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

-- Claiming reads only this index: finished tasks are not in it, however many pile up,
-- and the range scan stops at now(), so tasks scheduled for later are not read either.
CREATE INDEX tasks_claimable ON tasks (queue, due_at) WHERE state IN ('PENDING', 'FAILED');
-- Leases to take over; holds only RUNNING tasks.
CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at) WHERE state = 'RUNNING';

CREATE TABLE task_transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     bigint      NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    trigger     text        NOT NULL CHECK (trigger IN ('submit', 'claim', 'reclaim', 'expire',
                    'complete', 'fail', 'bury', 'cancel', 'cancel_running', 'release', 'requeue')),
    from_state  task_state,
    to_state    task_state  NOT NULL,
    attempt     integer     NOT NULL,
    worker      text,
    at          timestamptz NOT NULL DEFAULT now(),
    detail      text,
    CHECK ((trigger = 'submit') = (from_state IS NULL))
);
CREATE INDEX task_transitions_task ON task_transitions (task_id, id);
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
