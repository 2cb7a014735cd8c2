"""scheduling: per-task lease and timeout, snooze, global limits, periodic schedules

Revision ID: 0003
Revises: 0002
"""

from tasklease.schema.migrations import run_sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UP = """
-- Per-task overrides of the action's lease and execution timeout (NULL: the action's).
ALTER TABLE tasks ADD COLUMN lease_seconds float8 CHECK (lease_seconds > 0),
                  ADD COLUMN timeout_seconds float8 CHECK (timeout_seconds > 0);

ALTER TABLE task_transitions DROP CONSTRAINT task_transitions_trigger_check;
ALTER TABLE task_transitions ADD CONSTRAINT task_transitions_trigger_check
    CHECK (trigger IN ('submit', 'claim', 'reclaim', 'expire', 'complete', 'fail', 'bury',
                       'cancel', 'cancel_running', 'release', 'requeue', 'snooze'));

-- Starts (claims and reclaims) of rate-limited actions only, kept for one period: the
-- sliding window a rate limit is counted over.
CREATE TABLE action_starts (
    action text        NOT NULL,
    at     timestamptz NOT NULL
);
CREATE INDEX action_starts_action_at ON action_starts (action, at);

-- How many more tasks a claim may start under the global limits that apply to it.
-- Called by task_claim_due only when a limit applies. It takes a transaction-scoped
-- advisory lock per limited key (the queue, each limited action), always in the same order,
-- so claimers of a limited key take turns; and, being VOLATILE, it counts with a snapshot
-- taken after the locks, which sees every claim committed by whoever held them before.
-- (The claim statement's own snapshot is older: counting there would miss those claims.)
-- Returns one row per limited key: running_left (NULL: no concurrency limit), starts_left
-- (NULL: no rate limit) and retry_in, the seconds until a rate window frees a start.
CREATE FUNCTION tasklease_claim_capacity(
    p_queue text, p_queue_max integer,
    p_actions text[], p_max_running integer[], p_rate integer[], p_period float8[]
) RETURNS TABLE (scope text, name text, running_left integer, starts_left integer,
                 retry_in float8)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    k record;
BEGIN
    FOR k IN
        SELECT key FROM (
            SELECT 'queue:' || p_queue AS key WHERE p_queue_max IS NOT NULL
            UNION SELECT 'action:' || a FROM unnest(p_actions) AS a
        ) AS keys ORDER BY key
    LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('tasklease.limit:' || k.key, 0));
    END LOOP;

    IF p_queue_max IS NOT NULL THEN
        RETURN QUERY
        SELECT 'queue', p_queue, greatest(p_queue_max - count(*)::integer, 0), NULL::integer,
               NULL::float8
        FROM tasks WHERE lease_expires_at IS NOT NULL AND state = 'RUNNING' AND queue = p_queue;
    END IF;

    DELETE FROM action_starts s
    USING unnest(p_actions, p_period) AS l(action, period)
    WHERE s.action = l.action AND l.period IS NOT NULL
      AND s.at <= now() - make_interval(secs => l.period);

    RETURN QUERY
    SELECT 'action', l.action,
           CASE WHEN l.max_running IS NOT NULL
                THEN greatest(l.max_running - coalesce(r.running, 0), 0) END,
           CASE WHEN l.rate IS NOT NULL THEN greatest(l.rate - coalesce(w.starts, 0), 0) END,
           CASE WHEN l.rate IS NOT NULL AND coalesce(w.starts, 0) >= l.rate
                THEN greatest(extract(epoch FROM w.oldest + make_interval(secs => l.period)
                                                  - now())::float8, 0) END
    FROM unnest(p_actions, p_max_running, p_rate, p_period)
         AS l(action, max_running, rate, period)
    LEFT JOIN LATERAL (
        SELECT count(*)::integer AS running FROM tasks t
        WHERE t.lease_expires_at IS NOT NULL AND t.state = 'RUNNING' AND t.action = l.action
    ) AS r ON l.max_running IS NOT NULL
    LEFT JOIN LATERAL (
        SELECT count(*)::integer AS starts, min(s.at) AS oldest FROM action_starts s
        WHERE s.action = l.action AND s.at > now() - make_interval(secs => l.period)
    ) AS w ON l.rate IS NOT NULL;
END
$fn$;

-- Periodic tasks, as the workers declare them (their handler modules). The scheduler in
-- every worker creates each slot's task with the idempotency key `schedule:<name>:<slot>`,
-- so one task per slot however many workers run; last_slot_at is advanced with a guard.
CREATE TABLE schedules (
    name          text        PRIMARY KEY,
    action        text        NOT NULL,
    cron          text,
    every_seconds float8      CHECK (every_seconds > 0),
    timezone      text        NOT NULL DEFAULT 'UTC',
    payload       jsonb       NOT NULL DEFAULT '{}',
    queue         text        NOT NULL DEFAULT 'default',
    priority      smallint    NOT NULL DEFAULT 0,
    missed        text        NOT NULL DEFAULT 'once' CHECK (missed IN ('once', 'skip')),
    last_slot_at  timestamptz,
    last_task_id  bigint,
    next_run_at   timestamptz NOT NULL,
    declared_at   timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);
"""

DOWN = """
DROP TABLE schedules;
DROP FUNCTION tasklease_claim_capacity(text, integer, text[], integer[], integer[], float8[]);
DROP TABLE action_starts;
DELETE FROM task_transitions WHERE trigger = 'snooze';
ALTER TABLE task_transitions DROP CONSTRAINT task_transitions_trigger_check;
ALTER TABLE task_transitions ADD CONSTRAINT task_transitions_trigger_check
    CHECK (trigger IN ('submit', 'claim', 'reclaim', 'expire', 'complete', 'fail', 'bury',
                       'cancel', 'cancel_running', 'release', 'requeue'));
ALTER TABLE tasks DROP COLUMN timeout_seconds, DROP COLUMN lease_seconds;
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
