-- Every SQL statement tasklease runs, by name. Loaded by engine/queries.py.
--
-- A statement over a batch takes aligned arrays: ids in $1, and the i-th element of every
-- other array belongs to $1[i] (`array_position($1, t.id)` finds it). `t.id = ANY($1)` reads
-- the batch's rows through the primary key; no join, so no plan can go wrong on it.
--
-- A transition is one statement: a guarded UPDATE (its guard is in its WHERE
-- clause and in its name) plus the INSERT of its history row, in CTEs, so the
-- state change and its record commit together in one round trip. A guard that
-- matches no row returns no row: the caller lost the race and is told so.
-- `attempt` in a history row is the task's attempt after the transition.
-- JSON goes in and out as text (encoded by msgspec), so asyncpg never parses it.

-- name: task_get
-- One task by id.
SELECT * FROM tasks WHERE id = $1;

-- name: task_history
-- A task's transitions, oldest first.
SELECT trigger, from_state, to_state, attempt, worker, at, detail
FROM task_transitions WHERE task_id = $1 ORDER BY id;

-- name: task_claim_due
-- Lease up to $3 tasks to worker $4 from queue $1, for the actions in $2 with their lease
-- seconds in $5. Expired leases come first: reclaimed (RUNNING, attempt + 1, new token)
-- while attempts remain, else expired (DEAD). Then due PENDING/FAILED tasks are claimed,
-- highest priority, then earliest due first. SKIP LOCKED lets workers claim side by side.
-- A last row (trigger 'wait') says in how many seconds the next task comes due or the
-- next lease runs out (NULL: none known), so an idle worker sleeps exactly that long.
WITH expired AS (
    -- a crashed worker's lease: no reaper, whoever claims next takes it over
    SELECT id, worker AS old_worker FROM tasks
    WHERE state = 'RUNNING' AND lease_expires_at <= now()
      AND queue = $1 AND action = ANY($2::text[])
    ORDER BY lease_expires_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), due AS (
    SELECT id, state AS from_state FROM tasks
    WHERE state IN ('PENDING', 'FAILED') AND due_at <= now()
      AND queue = $1 AND action = ANY($2::text[])
    ORDER BY priority DESC, due_at, id
    LIMIT greatest($3 - (SELECT count(*) FROM expired), 0)
    FOR UPDATE SKIP LOCKED
), lease AS (
    SELECT * FROM unnest($2::text[], $5::float8[]) AS l(action, seconds)
), reclaimed AS (
    UPDATE tasks t
    SET attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => lease.seconds),
        worker = $4, updated_at = now()
    FROM expired, lease
    WHERE t.id = expired.id AND lease.action = t.action
      AND t.state = 'RUNNING' AND t.lease_expires_at <= now() AND t.attempt < t.max_attempts
    RETURNING t.*, expired.old_worker
), dead AS (
    UPDATE tasks t
    SET state = 'DEAD', lease_expires_at = NULL, updated_at = now(),
        last_error = 'lease of ' || coalesce(expired.old_worker, '?')
                     || ' expired on the last attempt'
    FROM expired
    WHERE t.id = expired.id
      AND t.state = 'RUNNING' AND t.lease_expires_at <= now() AND t.attempt >= t.max_attempts
    RETURNING t.id, t.attempt, t.last_error
), claimed AS (
    UPDATE tasks t
    SET state = 'RUNNING', attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => lease.seconds),
        worker = $4, updated_at = now()
    FROM due, lease
    -- the id list steers the planner to the primary key rather than re-reading the due range
    WHERE t.id = ANY(ARRAY(SELECT id FROM due)) AND t.id = due.id AND lease.action = t.action
      AND t.state IN ('PENDING', 'FAILED') AND t.due_at <= now()
    RETURNING t.*, due.from_state
), wake AS (
    -- the earliest future due time: one ordered probe of tasks_claimable
    SELECT least(
        (SELECT due_at FROM tasks
         WHERE queue = $1 AND state IN ('PENDING', 'FAILED') AND due_at > now()
           AND action = ANY($2::text[])
         ORDER BY due_at LIMIT 1),
        (SELECT min(lease_expires_at) FROM tasks
         WHERE state = 'RUNNING' AND lease_expires_at > now()
           AND queue = $1 AND action = ANY($2::text[]))
    ) AS at
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'claim', from_state, 'RUNNING'::task_state, attempt, $4, NULL FROM claimed
    UNION ALL
    SELECT id, 'reclaim', 'RUNNING'::task_state, 'RUNNING'::task_state, attempt, $4,
           'lease of ' || coalesce(old_worker, '?') || ' expired' FROM reclaimed
    UNION ALL
    SELECT id, 'expire', 'RUNNING'::task_state, 'DEAD'::task_state, attempt, $4, last_error
    FROM dead
)
SELECT 'claim' AS trigger, from_state, id, action, queue, payload, attempt, max_attempts,
       lease_token, lease_expires_at, idempotency_key, due_at, NULL::float8 AS wait_seconds
FROM claimed
UNION ALL
SELECT 'reclaim', 'RUNNING', id, action, queue, payload, attempt, max_attempts,
       lease_token, lease_expires_at, idempotency_key, due_at, NULL
FROM reclaimed
UNION ALL
SELECT 'expire', 'RUNNING', id, NULL, NULL, NULL, attempt, NULL, NULL, NULL, NULL, NULL, NULL
FROM dead
UNION ALL
SELECT 'wait', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       extract(epoch FROM at - now())::float8
FROM wake;

-- name: task_heartbeat_if_leased
-- Extend the lease of task $1 held under token $2 by $3 seconds. No row: the lease is lost.
UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = $1 AND state = 'RUNNING' AND lease_token = $2
RETURNING lease_expires_at, cancel_requested_at IS NOT NULL AS cancel_requested;

-- name: task_heartbeat_many_if_leased
-- Extend each lease (id $1[i], token $2[i]) by $3[i] seconds; returns those still held,
-- with whether cancellation was requested. A missing id: that lease is lost.
UPDATE tasks t
SET lease_expires_at = now() + make_interval(secs => ($3::float8[])[array_position($1, t.id)])
WHERE t.id = ANY($1::bigint[]) AND t.state = 'RUNNING'
  AND t.lease_token = ($2::uuid[])[array_position($1, t.id)]
RETURNING t.id, t.cancel_requested_at IS NOT NULL AS cancel_requested;

-- name: task_complete_many_if_leased
-- RUNNING -> COMPLETED for each (id $1[i], token $2[i], result $3[i]) whose token still
-- holds the lease; returns the ids that moved. One statement for a whole batch.
WITH moved AS (
    UPDATE tasks t
    SET state = 'COMPLETED', result = ($3::text[])[array_position($1, t.id)]::jsonb,
        lease_expires_at = NULL, updated_at = now()
    WHERE t.id = ANY($1::bigint[]) AND t.state = 'RUNNING'
      AND t.lease_token = ($2::uuid[])[array_position($1, t.id)]
    RETURNING t.id, t.attempt, t.worker
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker)
    SELECT id, 'complete', 'RUNNING', 'COMPLETED', attempt, worker FROM moved
)
SELECT id FROM moved;

-- name: task_fail_many_if_leased
-- RUNNING -> FAILED for each (id $1[i], token $2[i]) whose token holds the lease and that
-- has attempts left; the next attempt is due in $3[i] seconds; error $4[i] (its first line,
-- the description, goes to the history; the rest is the traceback).
WITH moved AS (
    UPDATE tasks t
    SET state = 'FAILED',
        due_at = now() + make_interval(secs => ($3::float8[])[array_position($1, t.id)]),
        last_error = ($4::text[])[array_position($1, t.id)],
        lease_expires_at = NULL, updated_at = now()
    WHERE t.id = ANY($1::bigint[]) AND t.state = 'RUNNING'
      AND t.lease_token = ($2::uuid[])[array_position($1, t.id)]
      AND t.attempt < t.max_attempts
    RETURNING t.id, t.attempt, t.worker, t.last_error,
              ($3::float8[])[array_position($1, t.id)] AS retry_in
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'fail', 'RUNNING', 'FAILED', attempt, worker,
           format('retry in %ss: %s', round(retry_in::numeric, 1), split_part(last_error, E'\n', 1))
    FROM moved
)
SELECT id FROM moved;

-- name: task_bury_many_if_leased
-- RUNNING -> DEAD for each (id $1[i], token $2[i]) whose token holds the lease, when its
-- attempts are exhausted or its error $3[i] is permanent ($4[i]); the history keeps the
-- error's first line.
WITH moved AS (
    UPDATE tasks t
    SET state = 'DEAD', last_error = ($3::text[])[array_position($1, t.id)],
        lease_expires_at = NULL, updated_at = now()
    WHERE t.id = ANY($1::bigint[]) AND t.state = 'RUNNING'
      AND t.lease_token = ($2::uuid[])[array_position($1, t.id)]
      AND (t.attempt >= t.max_attempts OR ($4::boolean[])[array_position($1, t.id)])
    RETURNING t.id, t.attempt, t.worker, t.last_error
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'bury', 'RUNNING', 'DEAD', attempt, worker, split_part(last_error, E'\n', 1)
    FROM moved
)
SELECT id FROM moved;

-- name: task_release_if_leased
-- RUNNING -> PENDING for task $1 under token $2: a worker shutting down hands it back and
-- the attempt is not counted.
WITH moved AS (
    UPDATE tasks SET state = 'PENDING', attempt = attempt - 1, lease_expires_at = NULL,
                     updated_at = now()
    WHERE id = $1 AND state = 'RUNNING' AND lease_token = $2
    RETURNING id, attempt, worker, queue
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'release', 'RUNNING', 'PENDING', attempt, worker, 'worker shutting down'
    FROM moved WHERE pg_notify('tasklease', queue) IS NOT NULL
)
SELECT id, attempt FROM moved;

-- name: task_cancel_if_waiting
-- PENDING or FAILED -> CANCELLED for task $1; $2 is the detail for the history.
WITH old AS (
    SELECT id, state FROM tasks WHERE id = $1 AND state IN ('PENDING', 'FAILED') FOR UPDATE
), moved AS (
    UPDATE tasks t SET state = 'CANCELLED', updated_at = now()
    FROM old WHERE t.id = old.id AND t.state IN ('PENDING', 'FAILED')
    RETURNING t.id, t.attempt, old.state AS from_state
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
    SELECT id, 'cancel', from_state, 'CANCELLED', attempt, $2 FROM moved
)
SELECT id, attempt FROM moved;

-- name: task_cancel_if_leased
-- RUNNING -> CANCELLED for task $1 under token $2, once cancellation was requested.
WITH moved AS (
    UPDATE tasks SET state = 'CANCELLED', lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND state = 'RUNNING' AND lease_token = $2
      AND cancel_requested_at IS NOT NULL
    RETURNING id, attempt, worker
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'cancel_running', 'RUNNING', 'CANCELLED', attempt, worker,
           'handler stopped on request' FROM moved
)
SELECT id, attempt FROM moved;

-- name: task_request_cancel_if_running
-- Ask the worker holding RUNNING task $1 to stop it; the worker sees it at its next heartbeat.
UPDATE tasks SET cancel_requested_at = coalesce(cancel_requested_at, now())
WHERE id = $1 AND state = 'RUNNING'
RETURNING id;

-- name: task_requeue_if_dead
-- DEAD -> PENDING for task $1: attempts reset to 0, due now; $2 is the detail.
WITH moved AS (
    UPDATE tasks SET state = 'PENDING', attempt = 0, due_at = now(), result = NULL,
                     cancel_requested_at = NULL, updated_at = now()
    WHERE id = $1 AND state = 'DEAD'
    RETURNING id, attempt, queue
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
    SELECT id, 'requeue', 'DEAD', 'PENDING', attempt, $2 FROM moved
    WHERE pg_notify('tasklease', queue) IS NOT NULL
)
SELECT id, attempt FROM moved;

-- name: task_lease_outcome
-- After a lost reply: the state of task $1 and whether token $2 holds its latest lease.
SELECT state, lease_token = $2 AS ours FROM tasks WHERE id = $1;

-- name: task_submit_many
-- Insert a batch of PENDING tasks and their `submit` rows in one statement. $1..$7 are
-- aligned arrays, one element per task. Returns the inserted tasks (created) and, for
-- idempotency keys already taken, the existing tasks (not created).
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::integer[],
                         $6::timestamptz[], $7::text[]) WITH ORDINALITY
        AS i(action, queue, priority, payload, max_attempts, due_at, idempotency_key, ord)
), new AS (
    INSERT INTO tasks (action, queue, priority, payload, max_attempts, due_at, idempotency_key)
    SELECT action, queue, priority, payload::jsonb, max_attempts, coalesce(due_at, now()),
           idempotency_key
    FROM input ORDER BY ord
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), logged AS (
    -- NOTIFY wakes idle workers of the queue (pg_notify returns void, which IS NOT NULL)
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt)
    SELECT id, 'submit', NULL, 'PENDING', 0 FROM new
    WHERE pg_notify('tasklease', queue) IS NOT NULL
)
SELECT true AS created, new.* FROM new
UNION ALL
SELECT false AS created, t.* FROM tasks t
WHERE t.idempotency_key = ANY($7::text[])
  AND t.idempotency_key NOT IN (SELECT idempotency_key FROM new WHERE idempotency_key IS NOT NULL);

-- name: task_list
-- A page of tasks, newest first: id below the cursor $1, at most $2 rows. Store.list_tasks
-- adds `AND column = $n` for each filter given (state, action, queue) in place of {filters}.
SELECT * FROM tasks WHERE id < $1 {filters} ORDER BY id DESC LIMIT $2;

-- name: task_counts
-- How many tasks each queue holds in each state.
SELECT queue, state, count(*) AS tasks FROM tasks GROUP BY queue, state;

-- name: queue_lag
-- Per queue: tasks due and waiting (PENDING/FAILED with due_at <= now) and the age in
-- seconds of the oldest of them. Reads only the claimable index.
SELECT queue, count(*) AS due,
       extract(epoch FROM now() - min(due_at))::float8 AS oldest_due_seconds
FROM tasks WHERE state IN ('PENDING', 'FAILED') AND due_at <= now()
GROUP BY queue;

-- name: process_report
-- Upsert this process's row: alive now, tasks running, cumulative counters ($8, JSON);
-- $9 marks a clean stop.
INSERT INTO processes (id, kind, host, pid, queues, concurrency, running, counters, stopped_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, CASE WHEN $9 THEN now() END)
ON CONFLICT (id) DO UPDATE
SET running = excluded.running, counters = excluded.counters, last_seen_at = now(),
    stopped_at = excluded.stopped_at;

-- name: process_list
-- Every process that has reported, with how long ago it was last seen.
SELECT *, extract(epoch FROM now() - last_seen_at)::float8 AS seen_seconds_ago
FROM processes ORDER BY kind, started_at;

-- name: task_get_by_idempotency_key
-- The task holding idempotency key $1 (the partial unique index tasks_idempotency_key).
SELECT * FROM tasks WHERE idempotency_key = $1;

-- name: dead_by_action
-- How many DEAD tasks each action has. Reads the partial index tasks_state_id.
SELECT action, count(*) AS tasks FROM tasks WHERE state = 'DEAD' GROUP BY action ORDER BY action;

-- name: task_requeue_action_if_dead
-- DEAD -> PENDING for up to $3 DEAD tasks of action $1 with ids above $2, lowest ids first:
-- attempts reset to 0, due now; $4 is the detail. Callers page through with the last id.
WITH picked AS (
    SELECT id FROM tasks WHERE state = 'DEAD' AND action = $1 AND id > $2
    ORDER BY id LIMIT $3
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE tasks t SET state = 'PENDING', attempt = 0, due_at = now(), result = NULL,
                       cancel_requested_at = NULL, updated_at = now()
    FROM picked WHERE t.id = picked.id AND t.state = 'DEAD'
    RETURNING t.id, t.attempt, t.queue
), logged AS (
    -- one NOTIFY per queue reaches the workers: PostgreSQL folds identical ones
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
    SELECT id, 'requeue', 'DEAD', 'PENDING', attempt, $4 FROM moved
    WHERE pg_notify('tasklease', queue) IS NOT NULL
)
SELECT id FROM moved ORDER BY id;
