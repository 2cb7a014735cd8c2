"""tasklease_submit(): due_at bounded, a reused idempotency key with other content refused;
tasklease_raise() for statements that must fail as a whole

Revision ID: 0009
Revises: 0008
"""

from tasklease.schema.migrations import run_sql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UP = """
-- Raise an error from inside a statement (plain SQL has no RAISE): the submit statement
-- (engine/queries.sql, task_submit_many) fails with it when an idempotency key it was given
-- was taken by a transaction that committed after its snapshot, so that none of its rows
-- stay. Returns boolean, so it can stand in a WHERE clause; it never returns.
CREATE FUNCTION tasklease_raise(code text, message text) RETURNS boolean
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
END
$fn$;

-- Submit one task in the caller's transaction; returns its id. Checked here: the bounds the
-- API applies (action, queue and key 1-200 characters, payload a JSON object, priority
-- -1000..1000, max_attempts 1..1000, lease 1 s and timeout 0.1 s to 7 days, due_at from
-- 1970-01-01 up to, not including, 2200-01-01). Not checked: that a handler exists for the
-- action and that the payload fits its schema; the database does not know the handlers.
-- Such a task waits PENDING until a worker that has the action claims it (GET /stats).
-- max_attempts defaults to 5, not to the action's own setting, for the same reason.
-- A repeated idempotency key returns the id of the task that holds it when that task has the
-- same action, payload (as a JSON value), queue, priority, max_attempts, lease_seconds and
-- timeout_seconds (due_at is not compared: a retry that leaves it out means "now" again);
-- with any of them different, it raises unique_violation naming the key and that task.
CREATE OR REPLACE FUNCTION tasklease_submit(
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
    held   tasks;
    differ text[];
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
    IF tasklease_submit.due_at < '1970-01-01 00:00:00+00'
       OR tasklease_submit.due_at >= '2200-01-01 00:00:00+00' THEN
        RAISE EXCEPTION 'tasklease_submit: due_at must be from 1970-01-01 00:00:00+00 up to '
                        '(not including) 2200-01-01 00:00:00+00, not %', tasklease_submit.due_at
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
    LOOP
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
        EXIT WHEN new_id IS NOT NULL;
        SELECT * INTO held FROM tasks t WHERE t.idempotency_key = tasklease_submit.idempotency_key;
        CONTINUE WHEN NOT FOUND;  -- deleted meanwhile (retention): the key is free again
        differ := array_remove(ARRAY[
            CASE WHEN held.action <> tasklease_submit.action THEN 'action' END,
            CASE WHEN held.payload <> tasklease_submit.payload THEN 'payload' END,
            CASE WHEN held.queue <> tasklease_submit.queue THEN 'queue' END,
            CASE WHEN held.priority <> tasklease_submit.priority THEN 'priority' END,
            CASE WHEN held.max_attempts <> tasklease_submit.max_attempts THEN 'max_attempts' END,
            CASE WHEN held.lease_seconds IS DISTINCT FROM tasklease_submit.lease_seconds
                 THEN 'lease_seconds' END,
            CASE WHEN held.timeout_seconds IS DISTINCT FROM tasklease_submit.timeout_seconds
                 THEN 'timeout_seconds' END], NULL);
        IF cardinality(differ) > 0 THEN
            RAISE EXCEPTION 'tasklease_submit: idempotency_key % is already used by task % with '
                            'a different %', quote_literal(tasklease_submit.idempotency_key),
                            held.id, array_to_string(differ, ', ')
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('task_id=%s fields=%s', held.id,
                                      array_to_string(differ, ',')),
                      HINT = 'A repeat returns the task only with the same action, payload, '
                             'queue, priority, max_attempts, lease_seconds and timeout_seconds.';
        END IF;
        RETURN held.id;
    END LOOP;
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt)
    VALUES (new_id, 'submit', NULL, 'PENDING', 0);
    -- wakes idle workers of the queue at commit, as every submission does
    PERFORM pg_notify('tasklease', tasklease_submit.queue);
    RETURN new_id;
END
$fn$;
"""

# 0007's tasklease_submit, as it was.
DOWN = """
CREATE OR REPLACE FUNCTION tasklease_submit(
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

DROP FUNCTION tasklease_raise(text, text);
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
