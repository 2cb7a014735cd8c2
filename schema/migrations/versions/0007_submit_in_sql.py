"""tasklease_submit(): enqueue from SQL (triggers, other languages), in the caller's transaction

Revision ID: 0007
Revises: 0006
"""

from tasklease.schema.migrations import run_sql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UP = """
-- Submit one task in the caller's transaction; returns its id (for a repeated idempotency
-- key, the id of the task that holds it). Checked here: the bounds the API applies (action,
-- queue and key 1-200 characters, payload a JSON object, priority -1000..1000, max_attempts
-- 1..1000, lease 1 s and timeout 0.1 s to 7 days). Not checked: that a handler exists for the
-- action and that the payload fits its schema; the database does not know the handlers.
-- Such a task waits PENDING until a worker that has the action claims it (GET /stats).
-- max_attempts defaults to 5, not to the action's own setting, for the same reason.
CREATE FUNCTION tasklease_submit(
    action          text,
    payload         jsonb DEFAULT '{}',
    due_at          timestamptz DEFAULT NULL,
    queue           text DEFAULT 'default',
    priority        integer DEFAULT 0,
    max_attempts    integer DEFAULT 5,
    idempotency_key text DEFAULT NULL,
    lease_seconds   float8 DEFAULT NULL,
    timeout_seconds float8 DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF length(tasklease_submit.action) NOT BETWEEN 1 AND 200 OR tasklease_submit.action IS NULL
    THEN
        RAISE EXCEPTION 'tasklease_submit: action must be 1 to 200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(tasklease_submit.payload) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'tasklease_submit: payload must be a JSON object, not %',
            coalesce(jsonb_typeof(tasklease_submit.payload), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(tasklease_submit.queue) NOT BETWEEN 1 AND 200 OR tasklease_submit.queue IS NULL
    THEN
        RAISE EXCEPTION 'tasklease_submit: queue must be 1 to 200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tasklease_submit.priority NOT BETWEEN -1000 AND 1000
       OR tasklease_submit.priority IS NULL THEN
        RAISE EXCEPTION 'tasklease_submit: priority must be between -1000 and 1000'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tasklease_submit.max_attempts NOT BETWEEN 1 AND 1000
       OR tasklease_submit.max_attempts IS NULL THEN
        RAISE EXCEPTION 'tasklease_submit: max_attempts must be between 1 and 1000'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(tasklease_submit.idempotency_key) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'tasklease_submit: idempotency_key must be 1 to 200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF starts_with(tasklease_submit.idempotency_key, 'schedule:') THEN
        RAISE EXCEPTION 'tasklease_submit: idempotency keys starting with ''schedule:'' are '
                        'reserved for the periodic schedules'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tasklease_submit.lease_seconds NOT BETWEEN 1 AND 604800 THEN
        RAISE EXCEPTION 'tasklease_submit: lease_seconds must be 1 to 604800'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tasklease_submit.timeout_seconds NOT BETWEEN 0.1 AND 604800 THEN
        RAISE EXCEPTION 'tasklease_submit: timeout_seconds must be 0.1 to 604800'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- a key taken by a transaction that commits meanwhile: the insert waits for it, then
    -- finds the conflict; the next statement's snapshot sees the row that holds the key
    INSERT INTO tasks (action, queue, priority, payload, max_attempts, due_at,
                       idempotency_key, lease_seconds, timeout_seconds)
    VALUES (tasklease_submit.action, tasklease_submit.queue, tasklease_submit.priority,
            tasklease_submit.payload, tasklease_submit.max_attempts,
            coalesce(tasklease_submit.due_at, now()), tasklease_submit.idempotency_key,
            tasklease_submit.lease_seconds, tasklease_submit.timeout_seconds)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        SELECT t.id INTO new_id FROM tasks t
        WHERE t.idempotency_key = tasklease_submit.idempotency_key;
        RETURN new_id;
    END IF;
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt)
    VALUES (new_id, 'submit', NULL, 'PENDING', 0);
    -- wakes idle workers of the queue at commit, as every submission does
    PERFORM pg_notify('tasklease', tasklease_submit.queue);
    RETURN new_id;
END
$fn$;
"""

DOWN = """
DROP FUNCTION tasklease_submit(text, jsonb, timestamptz, text, integer, integer, text, float8,
                               float8);
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
