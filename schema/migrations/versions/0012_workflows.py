"""workflows: tasks that wait for other tasks (WAITING), their edges, and workflows

Revision ID: 0012
Revises: 0011
"""

from tasklease.schema.migrations import run_sql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UP = """
-- A task submitted with unfinished dependencies is WAITING: no claim reads it (the claim's
-- sources are PENDING and FAILED). Appended, so the enum's order stays TaskState's.
ALTER TYPE task_state ADD VALUE 'WAITING';

-- waiting_for: the dependencies not yet settled (0 once it may run); dependencies: how many
-- it has (the worker reads their results only when > 0); dependants: edges pointing at it
-- (the trigger below runs only when > 0, so tasks without dependants pay nothing).
-- workflow_id: the workflow (a batch that declared a graph) it belongs to, if any.
ALTER TABLE tasks
    ADD COLUMN waiting_for  integer NOT NULL DEFAULT 0 CHECK (waiting_for >= 0),
    ADD COLUMN dependencies integer NOT NULL DEFAULT 0 CHECK (dependencies >= 0),
    ADD COLUMN dependants   integer NOT NULL DEFAULT 0 CHECK (dependants >= 0),
    ADD COLUMN workflow_id  bigint;

CREATE TABLE workflows (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- the fan-in task: it depends on every member (on_failure 'run'), so it runs once
    on_finish  bigint
);

CREATE INDEX tasks_workflow ON tasks (workflow_id, id) WHERE workflow_id IS NOT NULL;

-- One row per edge: task_id waits for depends_on. on_failure says what a dependency that
-- ends DEAD or CANCELLED does to task_id: 'cancel' it (cascading), let it 'run' anyway, or
-- 'hold' it WAITING while the dependency is DEAD (a requeue that completes lets it go on; a
-- CANCELLED dependency cancels it). satisfied: the edge no longer holds task_id back.
CREATE TABLE task_dependencies (
    depends_on bigint  NOT NULL,
    task_id    bigint  NOT NULL,
    on_failure text    NOT NULL DEFAULT 'cancel' CHECK (on_failure IN ('cancel', 'run', 'hold')),
    satisfied  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (depends_on, task_id),
    CHECK (depends_on <> task_id)
);
CREATE INDEX task_dependencies_task ON task_dependencies (task_id);

ALTER TABLE task_transitions DROP CONSTRAINT task_transitions_trigger_check;
ALTER TABLE task_transitions ADD CONSTRAINT task_transitions_trigger_check CHECK (trigger = ANY (
    ARRAY['submit', 'claim', 'reclaim', 'expire', 'complete', 'fail', 'bury', 'cancel',
          'cancel_running', 'release', 'requeue', 'snooze', 'ready', 'abandon']));

-- When a task with dependants ends COMPLETED, DEAD or CANCELLED (whichever statement moved
-- it: complete, bury, expire in the claim, cancel), its edges are settled in the same
-- transaction. Each statement below takes a fresh snapshot (READ COMMITTED), so it sees a
-- dependant submitted while the completion waited for the submission's lock on this row
-- (the submission counts itself in `dependants` under that lock).
-- ready:   WAITING -> PENDING when its last unsettled edge is satisfied. The row lock makes
--          concurrent last completions count down one after the other: exactly one sees 0.
-- abandon: WAITING -> CANCELLED under on_failure 'cancel' (or 'hold' and CANCELLED), and
--          so on down the graph (one recursive query; their own 'run' edges are settled by
--          this trigger fired for them in turn).
CREATE FUNCTION tasklease_settle_dependants() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    WITH satisfied AS (
        UPDATE task_dependencies d SET satisfied = true
        WHERE d.depends_on = NEW.id AND NOT d.satisfied
          AND (NEW.state = 'COMPLETED' OR d.on_failure = 'run')
        RETURNING d.task_id
    ), woken AS (
        UPDATE tasks t
        SET waiting_for = t.waiting_for - 1,
            state = CASE WHEN t.waiting_for = 1 THEN 'PENDING'::task_state ELSE t.state END,
            due_at = CASE WHEN t.waiting_for = 1 THEN greatest(t.due_at, now()) ELSE t.due_at END,
            updated_at = now()
        FROM satisfied s
        WHERE t.id = s.task_id AND t.state = 'WAITING'
        RETURNING t.id, t.state, t.attempt, t.queue
    )
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
    SELECT id, 'ready', 'WAITING', 'PENDING', attempt,
           format('dependencies settled: the last, task %s, is %s', NEW.id, NEW.state)
    FROM woken WHERE state = 'PENDING' AND pg_notify('tasklease', queue) IS NOT NULL;

    IF NEW.state <> 'COMPLETED' THEN
        -- everything that waits, through 'cancel' (or 'hold', once cancelled) edges, on what
        -- is abandoned: found in one recursive query and cancelled in one UPDATE, so that a
        -- long chain cascades without nesting trigger calls (their triggers, fired once this
        -- UPDATE is done, find nothing more to abandon: the stack stays two calls deep)
        WITH RECURSIVE doomed(id) AS (
            SELECT d.task_id FROM task_dependencies d JOIN tasks t ON t.id = d.task_id
            WHERE d.depends_on = NEW.id AND NOT d.satisfied AND t.state = 'WAITING'
              AND (d.on_failure = 'cancel' OR (d.on_failure = 'hold' AND NEW.state = 'CANCELLED'))
            UNION
            SELECT d.task_id FROM doomed
            JOIN task_dependencies d ON d.depends_on = doomed.id
            JOIN tasks t ON t.id = d.task_id
            WHERE NOT d.satisfied AND t.state = 'WAITING' AND d.on_failure IN ('cancel', 'hold')
        ), abandoned AS (
            UPDATE tasks t SET state = 'CANCELLED', waiting_for = 0, updated_at = now()
            WHERE t.id = ANY(ARRAY(SELECT id FROM doomed)) AND t.state = 'WAITING'
            RETURNING t.id, t.attempt
        )
        INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
        SELECT id, 'abandon', 'WAITING', 'CANCELLED', attempt,
               format('what it waits for depends on task %s, which is %s', NEW.id, NEW.state)
        FROM abandoned WHERE pg_notify('tasklease_done', id::text) IS NOT NULL;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER tasks_settle_dependants AFTER UPDATE OF state ON tasks
FOR EACH ROW
WHEN (NEW.dependants > 0 AND NEW.state IS DISTINCT FROM OLD.state
      AND NEW.state IN ('COMPLETED', 'DEAD', 'CANCELLED'))
EXECUTE FUNCTION tasklease_settle_dependants();
"""

DOWN = """
DO $fn$
BEGIN
    IF EXISTS (SELECT FROM tasks WHERE state::text = 'WAITING')
       OR EXISTS (SELECT FROM task_transitions
                  WHERE from_state::text = 'WAITING' OR to_state::text = 'WAITING') THEN
        RAISE EXCEPTION 'tasks are or were WAITING (workflows): cancel and prune them before '
                        'downgrading below 0012'
            USING ERRCODE = 'object_in_use';
    END IF;
END
$fn$;

DROP TRIGGER tasks_settle_dependants ON tasks;
DROP FUNCTION tasklease_settle_dependants();
DROP TABLE task_dependencies;
DROP TABLE workflows;
DROP INDEX tasks_workflow;
ALTER TABLE tasks DROP COLUMN waiting_for, DROP COLUMN dependencies, DROP COLUMN dependants,
                  DROP COLUMN workflow_id;

DELETE FROM task_transitions WHERE trigger IN ('ready', 'abandon');
ALTER TABLE task_transitions DROP CONSTRAINT task_transitions_trigger_check;
ALTER TABLE task_transitions ADD CONSTRAINT task_transitions_trigger_check CHECK (trigger = ANY (
    ARRAY['submit', 'claim', 'reclaim', 'expire', 'complete', 'fail', 'bury', 'cancel',
          'cancel_running', 'release', 'requeue', 'snooze']));

-- PostgreSQL cannot drop an enum value: the type is made again without it, and what
-- compares the column with its values (indexes, a constraint) is made again with it.
DROP INDEX tasks_claimable;
DROP INDEX tasks_claimable_order;
DROP INDEX tasks_state_id;
ALTER TABLE tasks DROP CONSTRAINT tasks_check1;
ALTER TYPE task_state RENAME TO task_state_0012;
CREATE TYPE task_state AS ENUM ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED', 'DEAD', 'CANCELLED');
ALTER TABLE tasks ALTER COLUMN state DROP DEFAULT,
    ALTER COLUMN state TYPE task_state USING state::text::task_state,
    ALTER COLUMN state SET DEFAULT 'PENDING';
ALTER TABLE task_transitions
    ALTER COLUMN from_state TYPE task_state USING from_state::text::task_state,
    ALTER COLUMN to_state TYPE task_state USING to_state::text::task_state;
DROP TYPE task_state_0012;
ALTER TABLE tasks ADD CONSTRAINT tasks_check1
    CHECK ((state = 'RUNNING') = (lease_expires_at IS NOT NULL AND lease_token IS NOT NULL));
CREATE INDEX tasks_claimable ON tasks (queue, due_at) WHERE state IN ('PENDING', 'FAILED');
CREATE INDEX tasks_claimable_order ON tasks (queue, priority DESC, due_at, id)
    WHERE state IN ('PENDING', 'FAILED');
CREATE INDEX tasks_state_id ON tasks (state, id) WHERE state NOT IN ('COMPLETED', 'RUNNING');
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
