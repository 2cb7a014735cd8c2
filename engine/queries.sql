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
-- Notifications: 'tasklease' (payload: a queue) wakes workers when work is submitted;
-- 'tasklease_done' (payload: task ids, comma-separated) says tasks reached a final state,
-- for Client.wait(). Both are sent at commit, so a rolled-back change wakes no one; a
-- submission in its own transaction sends its wake-up just after its commit (queue_wake).

-- name: task_get
-- One task by id.
SELECT * FROM tasks WHERE id = $1;

-- name: task_history
-- A task's transitions, oldest first.
SELECT trigger, from_state, to_state, attempt, worker, at, detail
FROM task_transitions WHERE task_id = $1 ORDER BY id;

-- name: task_claim_due
-- Lease up to $3 tasks to worker $4 from queue $1, for the actions in $2 with their lease
-- seconds in $5 (a task's own lease_seconds wins). Expired leases come first: reclaimed
-- (RUNNING, attempt + 1, new token) while attempts remain, else expired (DEAD). Then due
-- PENDING/FAILED tasks are claimed: highest priority, then earliest due, except that with
-- aging on ($6 seconds) about half of each claim goes to tasks due for longer than that,
-- oldest first, so no priority starves another. SKIP LOCKED lets workers claim side by side.
-- A last row says in how many seconds to look again: the next due time or lease expiry
-- ('wait'). A paused queue (queue_pauses) starts nothing and gives no time.
-- Limits are not here: when a global or per-key limit (the `limits` table) applies to the
-- queue or one of its actions, this statement starts nothing and says 'limited', and the
-- worker claims from that queue with task_claim_due_limited (below), which is this
-- statement with the limits joined in, until that one says 'plain'. So a claim with no limit
-- pays nothing for them (docs/benchmarks.md, "The claim without limits").
WITH lease AS (
    SELECT * FROM unnest($2::text[], $5::float8[]) AS l(action, seconds)
), stop AS MATERIALIZED (
    -- a paused queue starts nothing, neither claims nor takeovers; nor does this statement
    -- where a limit applies
    SELECT EXISTS (SELECT FROM queue_pauses WHERE queue = $1) AS paused,
           EXISTS (SELECT FROM limits
                   WHERE key = ANY(ARRAY['queue:' || $1]
                                   || ARRAY(SELECT p || a FROM unnest($2::text[]) AS a,
                                                 unnest('{action:,rate:,key:}'::text[]) AS p)))
               AS limited
), expired_locked AS (
    -- a crashed worker's lease: no reaper, whoever claims next takes it over
    SELECT id, worker AS old_worker, attempt < max_attempts AS restart FROM tasks
    WHERE state = 'RUNNING' AND lease_expires_at <= now()
      AND queue = $1 AND action = ANY($2::text[])
    ORDER BY lease_expires_at
    LIMIT (SELECT CASE WHEN paused OR limited THEN 0 ELSE $3 END FROM stop)
    FOR UPDATE SKIP LOCKED
), room AS MATERIALIZED (
    SELECT CASE WHEN (SELECT paused OR limited FROM stop) THEN 0
                ELSE greatest($3 - (SELECT count(*) FROM expired_locked), 0) END AS n
), aged AS (
    SELECT id, state FROM tasks
    WHERE state IN ('PENDING', 'FAILED') AND due_at <= now() - make_interval(secs => $6)
      AND queue = $1 AND action = ANY($2::text[])
    ORDER BY due_at, id
    -- half the room, rounded up or down at random: a one-slot claim takes the oldest half
    -- of the time
    LIMIT (SELECT floor(n * 0.5 + random())::integer FROM room)
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id, state FROM tasks
    WHERE state IN ('PENDING', 'FAILED') AND due_at <= now()
      AND queue = $1 AND action = ANY($2::text[])
      AND id <> ALL(ARRAY(SELECT id FROM aged))
    ORDER BY priority DESC, due_at, id
    LIMIT (SELECT n FROM room) - (SELECT count(*) FROM aged)
    FOR UPDATE SKIP LOCKED
), due AS (
    SELECT id, state AS from_state FROM aged UNION ALL SELECT id, state FROM ranked
), reclaimed AS (
    UPDATE tasks t
    SET attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => coalesce(t.lease_seconds, lease.seconds)),
        worker = $4, updated_at = now()
    FROM expired_locked expired, lease
    WHERE t.id = expired.id AND lease.action = t.action AND expired.restart
      AND t.state = 'RUNNING' AND t.lease_expires_at <= now() AND t.attempt < t.max_attempts
    RETURNING t.*, expired.old_worker, coalesce(t.lease_seconds, lease.seconds) AS lease_for
), dead AS (
    UPDATE tasks t
    SET state = 'DEAD', lease_expires_at = NULL, updated_at = now(),
        last_error = 'lease of ' || coalesce(expired.old_worker, '?')
                     || ' expired on the last attempt'
    FROM expired_locked expired
    WHERE t.id = expired.id AND NOT expired.restart
      AND t.state = 'RUNNING' AND t.lease_expires_at <= now() AND t.attempt >= t.max_attempts
    RETURNING t.id, t.attempt, t.last_error
), claimed AS (
    UPDATE tasks t
    SET state = 'RUNNING', attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => coalesce(t.lease_seconds, lease.seconds)),
        worker = $4, updated_at = now()
    FROM due, lease
    -- the id list steers the planner to the primary key rather than re-reading the due range
    WHERE t.id = ANY(ARRAY(SELECT id FROM due)) AND t.id = due.id AND lease.action = t.action
      AND t.state IN ('PENDING', 'FAILED') AND t.due_at <= now()
    RETURNING t.*, due.from_state, coalesce(t.lease_seconds, lease.seconds) AS lease_for
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
    FROM dead WHERE pg_notify('tasklease_done', id::text) IS NOT NULL
)
SELECT 'claim' AS trigger, from_state, id, action, queue, payload, attempt, max_attempts,
       lease_token, idempotency_key, lease_for, timeout_seconds, dependencies, dependants,
       NULL::float8 AS wait_seconds
FROM claimed
UNION ALL
SELECT 'reclaim', 'RUNNING', id, action, queue, payload, attempt, max_attempts,
       lease_token, idempotency_key, lease_for, timeout_seconds, dependencies, dependants, NULL
FROM reclaimed
UNION ALL
SELECT 'expire', 'RUNNING', id, NULL, NULL, NULL, attempt, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL
FROM dead
UNION ALL
-- 'limited': a limit applies here, this statement started nothing: claim again at once with
-- task_claim_due_limited. Paused: no time to look again (resuming wakes the workers).
SELECT CASE WHEN (SELECT limited AND NOT paused FROM stop) THEN 'limited' ELSE 'wait' END,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       CASE WHEN NOT (SELECT paused OR limited FROM stop)
            THEN extract(epoch FROM at - now())::float8 END
FROM wake;

-- name: task_claim_due_limited
-- task_claim_due with the limits joined in: what a worker runs for a queue where a global or
-- per-key limit applies (to the queue or one of its actions), from the claim on which
-- task_claim_due said 'limited' until this one says 'plain'.
-- Global limits (queue:, action:, rate: in `limits`) join in at `tokens`: a task starts only
-- with a free token of every limit it falls under (its queue's, its action's, its action's
-- rate; a takeover keeps its concurrency tokens and needs only a rate token), taken here.
-- Per-key limits (`key:ACTION`) join in at `kwants` to `krefused`: a start of such an action
-- takes a token of its value of the field, and values at their cap are stepped over.
-- The last row says when to look again: as task_claim_due's, or, when a limit held due work
-- back ('held'), sooner if a token may free sooner.
WITH lease AS (
    SELECT * FROM unnest($2::text[], $5::float8[]) AS l(action, seconds)
), limited AS MATERIALIZED (
    -- the limits this claim starts tasks under, and whether any of their tokens is free
    SELECT l.key, l.value, l.per_seconds, r.start,
           -- a concurrency limit: a token no task holds among 64 from the random number on
           -- (and round): a sample, since a held token is only known by reading its row
           CASE WHEN l.per_seconds IS NULL
                THEN EXISTS (SELECT FROM limit_tokens t
                             WHERE t.key = l.key AND t.n >= r.start AND t.n < r.start + 64
                               AND t.n <= l.value AND t.task_id IS NULL)
                  OR EXISTS (SELECT FROM limit_tokens t
                             WHERE t.key = l.key AND t.n < r.start + 64 - l.value
                               AND t.task_id IS NULL)
                ELSE (SELECT t.n FROM limit_tokens t
                      WHERE t.key = l.key AND t.key LIKE 'rate:%' AND t.free_at <= now()
                        AND t.n <= l.value
                      ORDER BY t.free_at LIMIT 1) IS NOT NULL END AS open
    FROM limits l
    -- where this claim starts looking for free tokens: anywhere
    CROSS JOIN LATERAL (SELECT 1 + floor(random() * l.value)::integer AS start) AS r
    WHERE l.key = ANY(ARRAY['queue:' || $1]
                      || ARRAY(SELECT p || a FROM unnest($2::text[]) AS a,
                                                  unnest('{action:,rate:}'::text[]) AS p))
), keyed AS MATERIALIZED (
    -- per-key limits (`key:ACTION`): at most `value` tasks of the action RUNNING at once for
    -- each value of the payload field `by` (a task without it counts under '')
    SELECT l.key, substr(l.key, 5) AS action, l.value, l.by,
           -- where this claim starts looking for a value's tokens: anywhere, so that claims
           -- side by side take and make different ones
           1 + floor(random() * l.value)::integer AS start
    FROM limits l
    WHERE l.key = ANY(ARRAY(SELECT 'key:' || a FROM unnest($2::text[]) AS a))
), full_keys AS MATERIALIZED (
    -- the values at their cap in this snapshot (tasks_running_keyed): the scans below step
    -- over their due tasks (a hashed NOT IN), so that one value's backlog holds back no other
    -- value. A value filled meanwhile is refused its token below; one freed meanwhile waits
    -- for the next claim.
    SELECT k.action, r.limit_key FROM keyed k
    JOIN tasks r ON r.action = k.action AND r.state = 'RUNNING' AND r.limit_key IS NOT NULL
    GROUP BY k.action, k.by, k.value, r.limit_key HAVING count(*) >= k.value
), shut AS MATERIALIZED (
    -- actions that may start nothing now (a limit shut, or a per-key limit of 0): the scans
    -- below step over their due tasks
    SELECT a FROM unnest($2::text[]) AS a
    WHERE EXISTS (SELECT FROM limited
                  WHERE NOT open AND key IN ('queue:' || $1, 'action:' || a, 'rate:' || a))
       OR EXISTS (SELECT FROM keyed WHERE keyed.action = a AND keyed.value = 0)
), paused AS MATERIALIZED (
    -- a paused queue starts nothing, neither claims nor takeovers
    SELECT EXISTS (SELECT FROM queue_pauses WHERE queue = $1) AS yes
), expired_locked AS (
    -- a crashed worker's lease: no reaper, whoever claims next takes it over
    SELECT id, worker AS old_worker, action, attempt < max_attempts AS restart FROM tasks
    WHERE state = 'RUNNING' AND lease_expires_at <= now()
      AND queue = $1 AND action = ANY($2::text[])
    ORDER BY lease_expires_at
    LIMIT (SELECT CASE WHEN yes THEN 0 ELSE $3 END FROM paused)
    FOR UPDATE SKIP LOCKED
), room AS MATERIALIZED (
    SELECT CASE WHEN (SELECT yes FROM paused) THEN 0
                ELSE greatest($3 - (SELECT count(*) FROM expired_locked), 0) END AS n
), aged AS (
    SELECT id, state, action, priority, due_at,
           -- its value of the field of its action's per-key limit, if it has one
           (SELECT coalesce(tasks.payload ->> k.by, '') FROM keyed k
            WHERE k.action = tasks.action) AS sub
    FROM tasks
    WHERE state IN ('PENDING', 'FAILED') AND due_at <= now() - make_interval(secs => $6)
      AND queue = $1 AND action = ANY($2::text[])
      AND action NOT IN (SELECT a FROM shut)
      AND (NOT EXISTS (SELECT FROM full_keys)
           OR (action, coalesce(payload ->> (SELECT k.by FROM keyed k
                                             WHERE k.action = tasks.action), ''))
              NOT IN (SELECT action, limit_key FROM full_keys))
    ORDER BY due_at, id
    -- half the room, rounded up or down at random: a one-slot claim takes the oldest half
    -- of the time
    LIMIT (SELECT floor(n * 0.5 + random())::integer FROM room)
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id, state, action, priority, due_at,
           -- its value of the field of its action's per-key limit, if it has one
           (SELECT coalesce(tasks.payload ->> k.by, '') FROM keyed k
            WHERE k.action = tasks.action) AS sub
    FROM tasks
    WHERE state IN ('PENDING', 'FAILED') AND due_at <= now()
      AND queue = $1 AND action = ANY($2::text[])
      AND action NOT IN (SELECT a FROM shut)
      AND (NOT EXISTS (SELECT FROM full_keys)
           OR (action, coalesce(payload ->> (SELECT k.by FROM keyed k
                                             WHERE k.action = tasks.action), ''))
              NOT IN (SELECT action, limit_key FROM full_keys))
      AND id <> ALL(ARRAY(SELECT id FROM aged))
    ORDER BY priority DESC, due_at, id
    LIMIT (SELECT n FROM room) - (SELECT count(*) FROM aged)
    FOR UPDATE SKIP LOCKED
), candidates AS (
    -- everything this claim may start, in the order it starts them: takeovers, aged, ranked
    SELECT id, action, restart, 0 AS part, 0 AS priority, NULL::timestamptz AS due_at
           , NULL AS sub
    FROM expired_locked
    UNION ALL SELECT id, action, NULL, 1, 0, due_at, sub FROM aged
    UNION ALL SELECT id, action, NULL, 2, priority, due_at, sub FROM ranked
), wants AS MATERIALIZED (
    -- each start's place in line for each limit it falls under (driven by the limits, so
    -- that with none, nothing here runs)
    SELECT c.id, l.key, l.value, l.per_seconds, l.start,
           row_number() OVER (PARTITION BY l.key
                              ORDER BY c.part, c.priority DESC, c.due_at, c.id) AS place
    FROM limited l
    CROSS JOIN LATERAL (
        SELECT * FROM candidates c
        WHERE l.key IN ('queue:' || $1, 'action:' || c.action, 'rate:' || c.action)
          AND (c.restart IS NULL OR (c.restart AND l.per_seconds IS NOT NULL))
    ) AS c
), tokens AS MATERIALIZED (
    -- per limit, up to as many free tokens as starts want one, from a random number on (and
    -- round), locked: a token another claim holds is skipped, one it took meanwhile is read
    -- again and left
    SELECT w.key, t.n, row_number() OVER (PARTITION BY w.key ORDER BY t.n) AS place
    FROM (SELECT key, value, per_seconds, start, count(*) AS k FROM wants
          GROUP BY key, value, per_seconds, start) AS w
    CROSS JOIN LATERAL (
        SELECT * FROM (
            -- a concurrency limit's tokens no task holds among the 2k + 16 from the random
            -- number on (and round to 1): a window of the primary key, since a held token is
            -- only known by reading its row; fewer than wanted are left for the next claim
            SELECT * FROM (
                SELECT t.n FROM limit_tokens t
                WHERE w.per_seconds IS NULL AND t.key = w.key AND t.n >= w.start
                  AND t.n < w.start + 2 * w.k + 16 AND t.n <= w.value AND t.task_id IS NULL
                ORDER BY t.n LIMIT w.k FOR UPDATE SKIP LOCKED) AS from_start
            UNION ALL
            SELECT * FROM (
                SELECT t.n FROM limit_tokens t
                WHERE w.per_seconds IS NULL AND t.key = w.key AND t.n < w.start
                  AND t.n < w.start + 2 * w.k + 16 - w.value AND t.task_id IS NULL
                ORDER BY t.n LIMIT w.k FOR UPDATE SKIP LOCKED) AS round_again
            UNION ALL
            -- a rate's tokens come free again, oldest first
            SELECT * FROM (
                SELECT t.n FROM limit_tokens t
                WHERE w.per_seconds IS NOT NULL AND t.key = w.key AND t.key LIKE 'rate:%'
                  AND t.free_at <= now() AND t.n <= w.value
                ORDER BY t.free_at LIMIT w.k FOR UPDATE SKIP LOCKED) AS rate
        ) AS found
        LIMIT w.k
    ) AS t
), tokarr AS MATERIALIZED (
    -- per limit, its tokens found in order: the start in place p takes the p-th (a subscript,
    -- where a join on (key, place) was planned as a merge on key alone: every pair compared)
    SELECT key, array_agg(n ORDER BY place) AS ns FROM tokens GROUP BY key
), refused AS MATERIALIZED (
    -- starts that did not get a token of some limit: not started this time
    SELECT DISTINCT w.id FROM wants w
    LEFT JOIN tokarr k ON k.key = w.key
    WHERE k.ns[w.place] IS NULL
), kwants AS MATERIALIZED (
    -- each start under a per-key limit (not a takeover: it keeps its token; not one another
    -- limit refused), its value of the field, and its place in line for that value's tokens
    SELECT c.id, k.key, k.value, k.start, c.sub,
           row_number() OVER (PARTITION BY k.key, c.sub
                              ORDER BY c.part, c.priority DESC, c.due_at, c.id) AS place
    FROM keyed k
    JOIN candidates c ON c.action = k.action AND c.restart IS NULL
    WHERE c.id NOT IN (SELECT id FROM refused)
), kgot AS MATERIALIZED (
    -- per start, the free token of its value that its place in line comes to, from the
    -- claim's random number on (and round), locked as `tokens` does (a token another claim
    -- holds is skipped, one it took meanwhile is read again and left). Each start's own
    -- probe: the p-th start locks the value's first p free tokens (its earlier ones'
    -- included, which stay first) and takes the p-th, so no two starts take the same one,
    -- and no CTE is joined with another
    SELECT w.id, w.key, w.sub, w.value, w.start, w.place, t.n FROM kwants w
    LEFT JOIN LATERAL (
        SELECT t.n FROM limit_key_tokens t
        WHERE t.key = w.key AND t.sub = w.sub AND t.n <= w.value AND t.task_id IS NULL
        ORDER BY t.n < w.start, t.n OFFSET w.place - 1 LIMIT 1 FOR UPDATE SKIP LOCKED) AS t
        ON true
), kmade AS (
    -- a start that found none: a number up to the value that no row is in this snapshot (from
    -- the random number on, one each: the i-th start of a value that found none takes the
    -- i-th; generate_series gives them in order), made here, held at once.
    -- A number made by a claim that committed meanwhile conflicts, and that start is refused
    -- this time; one that a claim still running is making is waited for (then refused): made
    -- in (key, sub, n) order, so no two claims wait on each other. So a value's tokens appear
    -- as it needs them, each at most once.
    INSERT INTO limit_key_tokens (key, sub, n, task_id)
    SELECT w.key, w.sub, m.n, w.id
    FROM (SELECT *, row_number() OVER (PARTITION BY key, sub ORDER BY place) AS miss
          FROM kgot WHERE n IS NULL) AS w
    CROSS JOIN LATERAL (
        SELECT s.n FROM (SELECT (i - 1) % w.value + 1 AS n
                         FROM generate_series(w.start, w.start + w.value - 1) AS g(i)) AS s
        WHERE (SELECT t.n FROM limit_key_tokens t
               WHERE t.key = w.key AND t.sub = w.sub AND t.n = s.n) IS NULL
        OFFSET w.miss - 1 LIMIT 1) AS m
    ORDER BY w.key, w.sub, m.n
    ON CONFLICT DO NOTHING
    RETURNING task_id AS id, sub, n
), kheld AS MATERIALIZED (
    -- per start under a per-key limit, the token of its value it holds
    SELECT id, sub, n FROM kgot WHERE n IS NOT NULL UNION ALL SELECT id, sub, n FROM kmade
), kmap AS MATERIALIZED (
    -- the same as aligned arrays, for `claimed` to look up by id (array_position)
    SELECT array_agg(id) AS ids, array_agg(sub) AS subs, array_agg(n) AS ns FROM kheld
), krefused AS MATERIALIZED (
    -- starts that got no token of their value: not started this time
    SELECT id FROM kwants WHERE id NOT IN (SELECT id FROM kheld)
), assigned AS MATERIALIZED (
    -- the tokens of what starts
    SELECT w.id, w.key, k.ns[w.place] AS n, w.per_seconds FROM wants w
    JOIN tokarr k ON k.key = w.key
    WHERE w.id NOT IN (SELECT id FROM refused)
      AND w.id NOT IN (SELECT id FROM krefused)
), amap AS MATERIALIZED (
    -- `assigned` as aligned arrays, for `taken`
    SELECT array_agg(key) AS keys, array_agg(n) AS ns, array_agg(id) AS ids,
           array_agg(per_seconds) AS pers
    FROM assigned
), held AS MATERIALIZED (
    -- per task, the numbers of the concurrency tokens it will hold, as aligned arrays for
    -- `claimed` to look up by id (array_position), as kmap
    SELECT array_agg(id) AS ids, array_agg(queue_token) AS queue_tokens,
           array_agg(action_token) AS action_tokens
    FROM (SELECT id, max(n) FILTER (WHERE key LIKE 'queue:%') AS queue_token,
                 max(n) FILTER (WHERE key LIKE 'action:%') AS action_token
          FROM assigned GROUP BY id) AS per_task
), expired AS (
    SELECT * FROM expired_locked WHERE id NOT IN (SELECT id FROM refused)
), due AS (
    SELECT id, state AS from_state FROM aged
    WHERE id NOT IN (SELECT id FROM refused)
      AND id NOT IN (SELECT id FROM krefused)
    UNION ALL
    SELECT id, state FROM ranked
    WHERE id NOT IN (SELECT id FROM refused)
      AND id NOT IN (SELECT id FROM krefused)
), reclaimed AS (
    UPDATE tasks t
    SET attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => coalesce(t.lease_seconds, lease.seconds)),
        worker = $4, updated_at = now()
    FROM expired, lease
    WHERE t.id = expired.id AND lease.action = t.action AND expired.restart
      AND t.state = 'RUNNING' AND t.lease_expires_at <= now() AND t.attempt < t.max_attempts
    RETURNING t.*, expired.old_worker, coalesce(t.lease_seconds, lease.seconds) AS lease_for
), dead AS (
    UPDATE tasks t
    SET state = 'DEAD', lease_expires_at = NULL, updated_at = now(),
        last_error = 'lease of ' || coalesce(expired.old_worker, '?')
                     || ' expired on the last attempt'
    FROM expired
    WHERE t.id = expired.id AND NOT expired.restart
      AND t.state = 'RUNNING' AND t.lease_expires_at <= now() AND t.attempt >= t.max_attempts
    RETURNING t.id, t.attempt, t.last_error, t.queue, t.action, t.queue_token, t.action_token,
              t.limit_key, t.key_token
), claimed AS (
    UPDATE tasks t
    SET state = 'RUNNING', attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => coalesce(t.lease_seconds, lease.seconds)),
        worker = $4, updated_at = now(),
        queue_token = (SELECT queue_tokens[array_position(ids, t.id)] FROM held),
        action_token = (SELECT action_tokens[array_position(ids, t.id)] FROM held),
        limit_key = (SELECT subs[array_position(ids, t.id)] FROM kmap),
        key_token = (SELECT ns[array_position(ids, t.id)] FROM kmap)
    FROM due, lease
    -- the id list steers the planner to the primary key rather than re-reading the due range
    WHERE t.id = ANY(ARRAY(SELECT id FROM due)) AND t.id = due.id AND lease.action = t.action
      AND t.state IN ('PENDING', 'FAILED') AND t.due_at <= now()
    RETURNING t.*, due.from_state, coalesce(t.lease_seconds, lease.seconds) AS lease_for
), taken AS (
    -- the tokens of what started: a concurrency token is held by its task until the task
    -- leaves RUNNING, a rate token comes free one period after this start
    UPDATE limit_tokens t
    SET task_id = CASE WHEN a.per_seconds IS NULL THEN a.id END,
        free_at = CASE WHEN a.per_seconds IS NOT NULL
                       THEN now() + make_interval(secs => a.per_seconds) ELSE t.free_at END
    -- `assigned` read back as arrays: the planner then counts on a few rows and probes the
    -- primary key for each (joined with the CTE, whose size it cannot know, it may choose to
    -- read every token instead)
    FROM unnest((SELECT keys FROM amap), (SELECT ns FROM amap), (SELECT ids FROM amap),
                (SELECT pers FROM amap)) AS a(key, n, id, per_seconds)
    WHERE t.key = a.key AND t.n = a.n
), ktaken AS (
    -- the free tokens of a value found above, now held by what started
    UPDATE limit_key_tokens t SET task_id = g.id
    FROM kgot g
    WHERE t.key = g.key AND t.sub = g.sub AND t.n = g.n AND g.n IS NOT NULL
), freed AS (
    -- what expired on its last attempt gives its concurrency tokens back
    UPDATE limit_tokens k SET task_id = NULL
    FROM dead m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM dead m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
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
), held_back AS (
    -- a limit held due work back (it refused a start, or is shut while its tasks are due):
    -- look again when a token may free: running tasks may end at any moment, so soon; a
    -- rate's next token frees at a known time
    SELECT min(CASE WHEN l.value = 0 THEN NULL WHEN l.per_seconds IS NULL THEN 0.1 ELSE
                   -- the tokens taken now are still free in this statement's snapshot
                   (SELECT extract(epoch FROM least(min(t.free_at), now() + make_interval(
                                                   secs => l.per_seconds)) - now())::float8
                    FROM limit_tokens t
                    WHERE t.key = l.key AND t.key LIKE 'rate:%' AND t.free_at > now()
                      AND t.n <= l.value) END) AS retry_in
    FROM limited l
    -- CASE: the probe of due tasks runs only when a limit is shut and none refused a start
    WHERE CASE WHEN EXISTS (SELECT FROM refused) THEN true
               WHEN l.open THEN false
               ELSE (SELECT t.id FROM tasks t
                     WHERE t.queue = $1 AND t.state IN ('PENDING', 'FAILED')
                       AND t.due_at <= now() AND t.action IN (SELECT a FROM shut)
                     ORDER BY t.due_at LIMIT 1) IS NOT NULL
          END
), key_held AS (
    -- a per-key limit held due work back: it refused a start, or some value is at its cap
    -- (its due tasks, if any, were stepped over): look again soon, as for a concurrency
    -- limit (the worker also does as soon as its own outcomes are written)
    SELECT CASE WHEN EXISTS (SELECT FROM krefused) OR EXISTS (SELECT FROM full_keys)
                THEN 0.1::float8 END AS retry_in
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'claim', from_state, 'RUNNING'::task_state, attempt, $4, NULL FROM claimed
    UNION ALL
    SELECT id, 'reclaim', 'RUNNING'::task_state, 'RUNNING'::task_state, attempt, $4,
           'lease of ' || coalesce(old_worker, '?') || ' expired' FROM reclaimed
    UNION ALL
    SELECT id, 'expire', 'RUNNING'::task_state, 'DEAD'::task_state, attempt, $4, last_error
    FROM dead WHERE pg_notify('tasklease_done', id::text) IS NOT NULL
)
SELECT 'claim' AS trigger, from_state, id, action, queue, payload, attempt, max_attempts,
       lease_token, idempotency_key, lease_for, timeout_seconds, dependencies, dependants,
       NULL::float8 AS wait_seconds
FROM claimed
UNION ALL
SELECT 'reclaim', 'RUNNING', id, action, queue, payload, attempt, max_attempts,
       lease_token, idempotency_key, lease_for, timeout_seconds, dependencies, dependants, NULL
FROM reclaimed
UNION ALL
SELECT 'expire', 'RUNNING', id, NULL, NULL, NULL, attempt, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL
FROM dead
UNION ALL
-- 'plain': no limit applies to this queue or its actions any more: claim with
-- task_claim_due from now on ('held': a limit held due work back, look again soon)
SELECT CASE
            WHEN NOT EXISTS (SELECT FROM limited) AND NOT EXISTS (SELECT FROM keyed)
            THEN 'plain'
            WHEN (SELECT retry_in FROM held_back) IS NULL
                 AND (SELECT retry_in FROM key_held) IS NULL
            THEN 'wait' ELSE 'held' END,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       -- paused: no time to look again (resuming wakes the workers)
       CASE WHEN NOT (SELECT yes FROM paused)
            THEN least(extract(epoch FROM at - now())::float8,
                       (SELECT retry_in FROM held_back),
                       (SELECT retry_in FROM key_held)) END
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
-- A task with dependants (docs/workflows.md) has them settled by the trigger
-- tasks_settle_dependants; a worker completes such tasks with
-- task_complete_settling_many_if_leased, which settles them set-based, for the whole batch.
WITH moved AS (
    UPDATE tasks t
    SET state = 'COMPLETED', result = ($3::text[])[array_position($1, t.id)]::jsonb,
        lease_expires_at = NULL, updated_at = now()
    WHERE t.id = ANY($1::bigint[]) AND t.state = 'RUNNING'
      AND t.lease_token = ($2::uuid[])[array_position($1, t.id)]
    RETURNING t.id, t.attempt, t.worker, t.queue, t.action, t.queue_token, t.action_token,
              t.limit_key, t.key_token
), notified AS (
    -- wakes Client.wait(): the ids that finished, 300 a notification (payloads stay < 8000 bytes)
    SELECT count(pg_notify('tasklease_done', ids)) AS n FROM (
        SELECT string_agg(id::text, ',') AS ids
        FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk FROM moved) AS m GROUP BY chunk
    ) AS c
), freed AS (
    -- its concurrency tokens come free (docs/scheduling.md), through the primary key
    UPDATE limit_tokens k SET task_id = NULL
    FROM moved m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM moved m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker)
    SELECT id, 'complete', 'RUNNING', 'COMPLETED', attempt, worker FROM moved
    WHERE (SELECT n FROM notified) IS NOT NULL
)
SELECT id FROM moved;

-- name: task_complete_settling_many_if_leased
-- RUNNING -> COMPLETED for each (id $1[i], token $2[i], result $3[i]) whose token still
-- holds the lease, as task_complete_many_if_leased, for a batch that holds a task with
-- dependants (the worker knows from its claim). Workflows (docs/workflows.md): the dependants' edges this statement sees are settled here,
-- for the whole batch at once (settled, woken, readied: WAITING -> PENDING when the last
-- settles); `dependants` keeps the count of those it does not see (submitted while it waited
-- for the row's lock), for which the trigger tasks_settle_dependants fires. Without edges,
-- these CTEs find nothing through an index of an empty range.
WITH moved AS (
    UPDATE tasks t
    SET state = 'COMPLETED', result = ($3::text[])[array_position($1, t.id)]::jsonb,
        lease_expires_at = NULL, updated_at = now(),
        dependants = CASE WHEN t.dependants > 0
                          THEN t.dependants - (SELECT count(*) FROM task_dependencies d
                                               WHERE d.depends_on = t.id)::integer
                          ELSE 0 END
    WHERE t.id = ANY($1::bigint[]) AND t.state = 'RUNNING'
      AND t.lease_token = ($2::uuid[])[array_position($1, t.id)]
    RETURNING t.id, t.attempt, t.worker, t.queue, t.action, t.queue_token, t.action_token,
              t.limit_key, t.key_token
), settled AS (
    UPDATE task_dependencies d SET satisfied = true
    WHERE d.depends_on = ANY(ARRAY(SELECT id FROM moved)) AND NOT d.satisfied
    RETURNING d.task_id, d.depends_on
), woken AS (
    -- under the row lock, counted down from its latest value: of two statements completing
    -- the last dependencies at once, exactly one sees 0
    UPDATE tasks t
    SET waiting_for = t.waiting_for - s.n,
        state = CASE WHEN t.waiting_for = s.n THEN 'PENDING'::task_state ELSE t.state END,
        due_at = CASE WHEN t.waiting_for = s.n THEN greatest(t.due_at, now()) ELSE t.due_at END,
        updated_at = now()
    FROM (SELECT task_id, count(*)::integer AS n, max(depends_on) AS last FROM settled
          GROUP BY task_id) AS s
    WHERE t.id = s.task_id AND t.state = 'WAITING'
    RETURNING t.id, t.state, t.attempt, t.queue, s.last
), readied AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
    SELECT id, 'ready', 'WAITING', 'PENDING', attempt,
           format('dependencies settled: the last, task %s, is COMPLETED', last)
    FROM woken WHERE state = 'PENDING' AND pg_notify('tasklease', queue) IS NOT NULL
), notified AS (
    -- wakes Client.wait(): the ids that finished, 300 a notification (payloads stay < 8000 bytes)
    SELECT count(pg_notify('tasklease_done', ids)) AS n FROM (
        SELECT string_agg(id::text, ',') AS ids
        FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk FROM moved) AS m GROUP BY chunk
    ) AS c
), freed AS (
    -- its concurrency tokens come free (docs/scheduling.md), through the primary key
    UPDATE limit_tokens k SET task_id = NULL
    FROM moved m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM moved m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker)
    SELECT id, 'complete', 'RUNNING', 'COMPLETED', attempt, worker FROM moved
    WHERE (SELECT n FROM notified) IS NOT NULL
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
              ($3::float8[])[array_position($1, t.id)] AS retry_in,
              t.queue, t.action, t.queue_token, t.action_token, t.limit_key, t.key_token
), freed AS (
    -- its concurrency tokens come free (docs/scheduling.md), through the primary key
    UPDATE limit_tokens k SET task_id = NULL
    FROM moved m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM moved m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
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
    RETURNING t.id, t.attempt, t.worker, t.last_error, t.queue, t.action, t.queue_token,
              t.action_token, t.limit_key, t.key_token
), notified AS (
    -- wakes Client.wait(): the ids that finished, 300 a notification (payloads stay < 8000 bytes)
    SELECT count(pg_notify('tasklease_done', ids)) AS n FROM (
        SELECT string_agg(id::text, ',') AS ids
        FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk FROM moved) AS m GROUP BY chunk
    ) AS c
), freed AS (
    -- its concurrency tokens come free (docs/scheduling.md), through the primary key
    UPDATE limit_tokens k SET task_id = NULL
    FROM moved m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM moved m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'bury', 'RUNNING', 'DEAD', attempt, worker, split_part(last_error, E'\n', 1)
    FROM moved WHERE (SELECT n FROM notified) IS NOT NULL
)
SELECT id FROM moved;

-- name: task_release_if_leased
-- RUNNING -> PENDING for task $1 under token $2: a worker shutting down hands it back and
-- the attempt is not counted.
WITH moved AS (
    UPDATE tasks SET state = 'PENDING', attempt = attempt - 1, lease_expires_at = NULL,
                     updated_at = now()
    WHERE id = $1 AND state = 'RUNNING' AND lease_token = $2
    RETURNING id, attempt, worker, queue, action, queue_token, action_token,
              limit_key, key_token
), freed AS (
    -- its concurrency tokens come free (docs/scheduling.md), through the primary key
    UPDATE limit_tokens k SET task_id = NULL
    FROM moved m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM moved m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'release', 'RUNNING', 'PENDING', attempt, worker, 'worker shutting down'
    FROM moved WHERE pg_notify('tasklease', queue) IS NOT NULL
)
SELECT id, attempt FROM moved;

-- name: task_snooze_if_leased
-- RUNNING -> PENDING for task $1 under token $2, due again in $3 seconds: the handler asked
-- to run later; the attempt is given back, so a snooze never counts as a failure.
WITH moved AS (
    UPDATE tasks SET state = 'PENDING', attempt = attempt - 1, lease_expires_at = NULL,
                     due_at = now() + make_interval(secs => $3), updated_at = now()
    WHERE id = $1 AND state = 'RUNNING' AND lease_token = $2
    RETURNING id, attempt, worker, queue, action, queue_token, action_token,
              limit_key, key_token
), freed AS (
    -- its concurrency tokens come free (docs/scheduling.md), through the primary key
    UPDATE limit_tokens k SET task_id = NULL
    FROM moved m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM moved m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'snooze', 'RUNNING', 'PENDING', attempt, worker,
           format('snoozed for %ss', round($3::numeric, 1)) || coalesce(': ' || $4, '')
    FROM moved
)
SELECT id, attempt FROM moved;

-- name: task_cancel_if_waiting
-- PENDING, FAILED or WAITING -> CANCELLED for task $1; $2 is the detail for the history.
-- Its dependants are settled by the trigger tasks_settle_dependants (docs/workflows.md).
WITH old AS (
    SELECT id, state FROM tasks WHERE id = $1 AND state IN ('PENDING', 'FAILED', 'WAITING')
    FOR UPDATE
), moved AS (
    UPDATE tasks t SET state = 'CANCELLED', waiting_for = 0, updated_at = now()
    FROM old WHERE t.id = old.id AND t.state IN ('PENDING', 'FAILED', 'WAITING')
    RETURNING t.id, t.attempt, old.state AS from_state
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
    SELECT id, 'cancel', from_state, 'CANCELLED', attempt, $2 FROM moved
    WHERE pg_notify('tasklease_done', id::text) IS NOT NULL
)
SELECT id, attempt FROM moved;

-- name: task_cancel_if_leased
-- RUNNING -> CANCELLED for task $1 under token $2, once cancellation was requested.
WITH moved AS (
    UPDATE tasks SET state = 'CANCELLED', lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND state = 'RUNNING' AND lease_token = $2
      AND cancel_requested_at IS NOT NULL
    RETURNING id, attempt, worker, queue, action, queue_token, action_token,
              limit_key, key_token
), freed AS (
    -- its concurrency tokens come free (docs/scheduling.md), through the primary key
    UPDATE limit_tokens k SET task_id = NULL
    FROM moved m
    WHERE (m.queue_token IS NOT NULL OR m.action_token IS NOT NULL) AND k.task_id = m.id
      AND ((k.key = 'queue:' || m.queue AND k.n = m.queue_token)
           OR (k.key = 'action:' || m.action AND k.n = m.action_token))
), kfreed AS (
    -- and its token of a per-key limit
    UPDATE limit_key_tokens k SET task_id = NULL
    FROM moved m
    WHERE m.key_token IS NOT NULL AND k.task_id = m.id
      AND k.key = 'key:' || m.action AND k.sub = m.limit_key AND k.n = m.key_token
), logged AS (
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, detail)
    SELECT id, 'cancel_running', 'RUNNING', 'CANCELLED', attempt, worker,
           'handler stopped on request' FROM moved
    WHERE pg_notify('tasklease_done', id::text) IS NOT NULL
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

-- name: task_running_by_worker
-- The tasks worker $1 holds, with their lease tokens: a dead worker's, for its supervisor to
-- settle (engine/supervisor.py). RUNNING rows are those with a lease (tasks_lease_expiry).
SELECT id, lease_token, action, attempt, max_attempts FROM tasks
WHERE lease_expires_at IS NOT NULL AND state = 'RUNNING' AND worker = $1;

-- name: task_lease_outcome
-- After a lost reply: the state of task $1 and whether token $2 holds its latest lease.
SELECT state, lease_token = $2 AS ours FROM tasks WHERE id = $1;

-- name: task_submit_many
-- Insert a batch of PENDING tasks and their `submit` rows in one statement. $1..$9 are
-- aligned arrays, one element per task; $10: NOTIFY the tasks' queues at commit (a caller's
-- transaction) or not (the caller wakes them after its own commit, Store.wake). Returns the inserted tasks (created) and, for
-- idempotency keys already taken, the existing tasks (not created).
-- A key is repeated faithfully when the task that holds it (or, within the batch, the first
-- task that gives it) has the same action, payload (as a JSON value), queue, priority,
-- max_attempts, lease_seconds and timeout_seconds; due_at is not compared. Any other repeat
-- is a conflict: then nothing is inserted, and one row per such task (conflict_index, from 0)
-- names the task holding the key (conflict_task) or the earlier task of the batch giving it
-- (conflict_earlier, from 0), and what differs (conflict_fields).
-- A key taken by a transaction that committed after this statement's snapshot is neither
-- inserted nor returned; the caller runs the statement again. Should the statement have
-- inserted other tasks meanwhile, it fails with serialization_failure (tasklease_raise)
-- instead, so that none of them stays.
WITH input AS MATERIALIZED (
    SELECT action, queue, priority, payload::jsonb AS payload, max_attempts, due_at,
           idempotency_key, lease_seconds, timeout_seconds, ord
    FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::integer[],
                $6::timestamptz[], $7::text[], $8::float8[], $9::float8[])
        WITH ORDINALITY
        AS i(action, queue, priority, payload, max_attempts, due_at, idempotency_key,
             lease_seconds, timeout_seconds, ord)
), held AS (
    -- the tasks that hold the keys given, as this statement's snapshot sees them
    SELECT * FROM tasks WHERE idempotency_key = ANY($7::text[])
), reference AS (
    -- what a task giving a key must match: the task that holds it, else the first of the
    -- batch that gives it
    SELECT idempotency_key, id AS task_id, NULL::bigint AS ord, action, payload, queue,
           priority, max_attempts, lease_seconds, timeout_seconds
    FROM held
    UNION ALL
    SELECT * FROM (
        SELECT DISTINCT ON (idempotency_key) idempotency_key, NULL::bigint, ord, action,
               payload, queue, priority, max_attempts, lease_seconds, timeout_seconds
        FROM input
        WHERE idempotency_key IS NOT NULL
          AND idempotency_key NOT IN (SELECT idempotency_key FROM held)
        ORDER BY idempotency_key, ord) AS first_given
), conflict AS (
    SELECT i.ord, r.task_id, r.ord AS earlier, d.fields
    FROM input i
    JOIN reference r ON r.idempotency_key = i.idempotency_key
    CROSS JOIN LATERAL (SELECT array_remove(ARRAY[
        CASE WHEN i.action <> r.action THEN 'action' END,
        CASE WHEN i.payload <> r.payload THEN 'payload' END,
        CASE WHEN i.queue <> r.queue THEN 'queue' END,
        CASE WHEN i.priority <> r.priority THEN 'priority' END,
        CASE WHEN i.max_attempts <> r.max_attempts THEN 'max_attempts' END,
        CASE WHEN i.lease_seconds IS DISTINCT FROM r.lease_seconds THEN 'lease_seconds' END,
        CASE WHEN i.timeout_seconds IS DISTINCT FROM r.timeout_seconds
             THEN 'timeout_seconds' END], NULL) AS fields) AS d
    WHERE cardinality(d.fields) > 0
), new AS (
    INSERT INTO tasks (action, queue, priority, payload, max_attempts, due_at, idempotency_key,
                       lease_seconds, timeout_seconds)
    SELECT action, queue, priority, payload, max_attempts, coalesce(due_at, now()),
           idempotency_key, lease_seconds, timeout_seconds
    FROM input
    WHERE NOT EXISTS (SELECT FROM conflict)
    ORDER BY ord
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), logged AS (
    -- NOTIFY wakes idle workers of the queue (pg_notify returns void, which IS NOT NULL)
    -- when $10; else the caller wakes them after the commit (Store.wake)
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt)
    SELECT id, 'submit', NULL, 'PENDING', 0 FROM new
    WHERE CASE WHEN $10::boolean THEN pg_notify('tasklease', queue) IS NOT NULL ELSE true END
), raced AS (
    -- keys neither inserted nor seen: taken by a transaction that committed after our snapshot
    SELECT idempotency_key FROM input
    WHERE idempotency_key IS NOT NULL
      AND idempotency_key NOT IN (SELECT idempotency_key FROM held)
      AND idempotency_key NOT IN (SELECT idempotency_key FROM new
                                  WHERE idempotency_key IS NOT NULL)
      AND NOT EXISTS (SELECT FROM conflict)
)
SELECT true AS created, new.*, NULL::bigint AS conflict_index, NULL::bigint AS conflict_task,
       NULL::bigint AS conflict_earlier, NULL::text[] AS conflict_fields
FROM new
UNION ALL
SELECT false, held.*, NULL, NULL, NULL, NULL FROM held
WHERE held.idempotency_key NOT IN (SELECT idempotency_key FROM new
                                   WHERE idempotency_key IS NOT NULL)
UNION ALL
SELECT false, (NULL::tasks).*, ord - 1, task_id, earlier - 1, fields FROM conflict
UNION ALL
SELECT false, (NULL::tasks).*, NULL, NULL, NULL, NULL FROM raced
WHERE CASE WHEN EXISTS (SELECT FROM new)
           THEN tasklease_raise('40001', format(
               'idempotency_key %L was taken by a transaction that committed during this '
               'submission: nothing of it was written; submit again', idempotency_key))
           ELSE false END;

-- name: task_submit_unkeyed
-- task_submit_many for tasks none of which has an idempotency key (most submissions):
-- nothing to find or compare, so none of its checks. $1..$10 as there ($7 all NULL).
WITH new AS (
    INSERT INTO tasks (action, queue, priority, payload, max_attempts, due_at, idempotency_key,
                       lease_seconds, timeout_seconds)
    SELECT action, queue, priority, payload::jsonb, max_attempts, coalesce(due_at, now()),
           idempotency_key, lease_seconds, timeout_seconds
    FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::integer[],
                $6::timestamptz[], $7::text[], $8::float8[], $9::float8[])
        WITH ORDINALITY
        AS i(action, queue, priority, payload, max_attempts, due_at, idempotency_key,
             lease_seconds, timeout_seconds, ord)
    ORDER BY ord
    RETURNING *
), logged AS (
    -- NOTIFY wakes idle workers of the queue (pg_notify returns void, which IS NOT NULL)
    -- when $10; else the caller wakes them after the commit (Store.wake)
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt)
    SELECT id, 'submit', NULL, 'PENDING', 0 FROM new
    WHERE CASE WHEN $10::boolean THEN pg_notify('tasklease', queue) IS NOT NULL ELSE true END
)
SELECT true AS created, new.* FROM new;

-- name: task_submit_graph
-- Insert a graph of tasks (docs/workflows.md) and their edges in one statement: all or none.
-- $1..$9 as task_submit_unkeyed (no idempotency keys). Edges as aligned arrays: the
-- dependant's place in the batch $10[i] (from 1), and what it waits for, either the place of
-- another task of the batch $11[i] or an existing task's id $12[i], with on_failure $13[i].
-- $14: make a workflow (its id in every task's workflow_id); $15: the place of its fan-in
-- task (on_finish), or NULL. The batch is checked acyclic by the caller (engine/workflows.py).
-- An existing dependency is counted (`dependants`) under its row lock: a completion in
-- flight commits first and is seen here (the edge is then already satisfied); one that
-- comes later waits for this commit, and its trigger (tasks_settle_dependants) sees the edge.
-- A dependency that does not exist, or that has already failed in a way that would cancel
-- the task at once, fails the statement (SQLSTATE TLDEP, the message says which).
WITH input AS MATERIALIZED (
    SELECT action, queue, priority, payload::jsonb AS payload, max_attempts, due_at,
           lease_seconds, timeout_seconds, ord
    FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::integer[],
                $6::timestamptz[], $7::text[], $8::float8[], $9::float8[])
        WITH ORDINALITY
        AS i(action, queue, priority, payload, max_attempts, due_at, idempotency_key,
             lease_seconds, timeout_seconds, ord)
), edges AS MATERIALIZED (
    SELECT * FROM unnest($10::integer[], $11::integer[], $12::bigint[], $13::text[])
        AS e(ord, dep_ord, dep_id, on_failure)
), outside AS MATERIALIZED (
    UPDATE tasks t SET dependants = t.dependants + e.n
    FROM (SELECT dep_id, count(*)::integer AS n FROM edges WHERE dep_id IS NOT NULL
          GROUP BY dep_id) AS e
    WHERE t.id = e.dep_id
    RETURNING t.id, t.state
), settled AS MATERIALIZED (
    SELECT e.*, o.id AS found, o.state AS dep_state,
           e.dep_id IS NOT NULL
           AND (o.state = 'COMPLETED'
                OR (o.state IN ('DEAD', 'CANCELLED') AND e.on_failure = 'run')) AS satisfied
    FROM edges e LEFT JOIN outside o ON o.id = e.dep_id
), refused AS (
    SELECT format('tasks[%s].depends_on: task %s %s', ord - 1, dep_id,
                  CASE WHEN found IS NULL THEN 'does not exist'
                       ELSE format('is %s: with on_failure=%s this task would be cancelled at '
                                   'once', dep_state, on_failure) END) AS message
    FROM settled
    WHERE dep_id IS NOT NULL
      AND (found IS NULL
           OR (dep_state = 'CANCELLED' AND on_failure <> 'run')
           OR (dep_state = 'DEAD' AND on_failure = 'cancel'))
    LIMIT 1
), workflow AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('workflows', 'id')) AS id WHERE $14::boolean
), new AS (
    INSERT INTO tasks (action, queue, priority, payload, max_attempts, due_at, lease_seconds,
                       timeout_seconds, state, waiting_for, dependencies, dependants,
                       workflow_id)
    SELECT i.action, i.queue, i.priority, i.payload, i.max_attempts, coalesce(i.due_at, now()),
           i.lease_seconds, i.timeout_seconds,
           CASE WHEN coalesce(w.waiting, 0) > 0 THEN 'WAITING' ELSE 'PENDING' END::task_state,
           coalesce(w.waiting, 0), coalesce(w.total, 0), coalesce(d.n, 0),
           (SELECT id FROM workflow)
    FROM input i
    LEFT JOIN (SELECT ord, count(*) FILTER (WHERE NOT satisfied)::integer AS waiting,
                      count(*)::integer AS total
               FROM settled GROUP BY ord) AS w ON w.ord = i.ord
    LEFT JOIN (SELECT dep_ord, count(*)::integer AS n FROM edges WHERE dep_ord IS NOT NULL
               GROUP BY dep_ord) AS d ON d.dep_ord = i.ord
    ORDER BY i.ord
    RETURNING *
), numbered AS MATERIALIZED (
    -- identities are given in insertion order, which is the batch's
    SELECT id, row_number() OVER (ORDER BY id) AS ord FROM new
), linked AS (
    INSERT INTO task_dependencies (depends_on, task_id, on_failure, satisfied)
    SELECT coalesce(s.dep_id, d.id), n.id, s.on_failure, s.satisfied
    FROM settled s JOIN numbered n ON n.ord = s.ord LEFT JOIN numbered d ON d.ord = s.dep_ord
), made AS (
    INSERT INTO workflows (id, on_finish) OVERRIDING SYSTEM VALUE
    SELECT id, (SELECT n.id FROM numbered n WHERE n.ord = $15) FROM workflow
), logged AS (
    -- NOTIFY wakes idle workers of the queue (pg_notify returns void, which IS NOT NULL)
    INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, detail)
    SELECT id, 'submit', NULL, state, 0,
           CASE WHEN state = 'WAITING'
                THEN format('waiting for %s of %s dependencies', waiting_for, dependencies) END
    FROM new
    WHERE pg_notify('tasklease', queue) IS NOT NULL
)
SELECT true AS created, new.* FROM new
WHERE NOT EXISTS (SELECT FROM refused)
UNION ALL
SELECT false, (NULL::tasks).* FROM refused WHERE tasklease_raise('TLDEP', message);

-- name: task_dependency_results
-- What the tasks in $1 waited for: per task, each dependency's id, action, state and result
-- (a worker reads them once per claim, before the handlers run, for ctx.dependencies).
SELECT d.task_id, t.id, t.action, t.state, t.result, d.on_failure
FROM task_dependencies d JOIN tasks t ON t.id = d.depends_on
WHERE d.task_id = ANY($1::bigint[])
ORDER BY d.task_id, t.id;

-- name: workflow_get
-- Workflow $1 (no row: none such).
SELECT * FROM workflows WHERE id = $1;

-- name: workflow_tasks
-- The members of workflow $1, by id (tasks_workflow).
SELECT * FROM tasks WHERE workflow_id = $1 ORDER BY id;

-- name: workflow_edges
-- The edges among the tasks in $1 and to what they wait for.
SELECT task_id, depends_on, on_failure, satisfied FROM task_dependencies
WHERE task_id = ANY($1::bigint[])
ORDER BY task_id, depends_on;

-- name: task_edges
-- Task $1's place in a graph: what it waits for ('dependency') and what waits for it
-- ('dependant'), with the other task's action and state.
SELECT 'dependency' AS kind, t.id, t.action, t.state, d.on_failure, d.satisfied
FROM task_dependencies d JOIN tasks t ON t.id = d.depends_on WHERE d.task_id = $1
UNION ALL
SELECT 'dependant', t.id, t.action, t.state, d.on_failure, d.satisfied
FROM task_dependencies d JOIN tasks t ON t.id = d.task_id WHERE d.depends_on = $1
ORDER BY 1, 2;

-- name: task_list
-- A page of tasks, newest first: id below the cursor $1, at most $2 rows. Store.list_tasks
-- adds `AND column = $n` for each filter given (state, action, queue) in place of {filters}.
SELECT * FROM tasks WHERE id < $1 {filters} ORDER BY id DESC LIMIT $2;

-- name: task_counts
-- How many tasks each queue holds in each state.
SELECT queue, state, count(*) AS tasks FROM tasks GROUP BY queue, state;

-- name: queue_lag
-- Per queue: tasks due and waiting (PENDING/FAILED with due_at <= now) and the age in
-- seconds of the oldest of them. Reads only the claimable index. A due time before year 1
-- ('-infinity', BC: only SQL writes such rows) counts from year 1: `now() - '-infinity'` is
-- an error before PostgreSQL 17 and infinite after.
SELECT queue, count(*) AS due,
       extract(epoch FROM now() - greatest(min(due_at), '0001-01-01 00:00:00+00'))::float8
           AS oldest_due_seconds
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
-- Every process that has reported, with how long ago it was last seen (a time out of years
-- 1 to 9999, which only SQL writes, counts as the nearest end of that range).
SELECT *, extract(epoch FROM now() - least(greatest(last_seen_at, '0001-01-01 00:00:00+00'),
                                           '9999-12-31 23:59:59.999999+00'))::float8
              AS seen_seconds_ago
FROM processes ORDER BY kind, started_at;

-- name: db_now
-- The database clock, which decides what is due.
SELECT now();

-- name: schedule_declare
-- Upsert a schedule as a worker's code declares it ($1..$9) with its first run time $10.
-- A changed time rule ($3 cron, $4 every, $5 timezone) starts over from $10; otherwise the
-- row's progress (last_slot_at, next_run_at) is kept.
INSERT INTO schedules AS s (name, action, cron, every_seconds, timezone, payload, queue,
                            priority, missed, next_run_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10)
ON CONFLICT (name) DO UPDATE
SET action = excluded.action, cron = excluded.cron, every_seconds = excluded.every_seconds,
    timezone = excluded.timezone, payload = excluded.payload, queue = excluded.queue,
    priority = excluded.priority, missed = excluded.missed, updated_at = now(),
    next_run_at = CASE
        WHEN (s.cron, s.every_seconds, s.timezone)
             IS DISTINCT FROM (excluded.cron, excluded.every_seconds, excluded.timezone)
        THEN excluded.next_run_at ELSE s.next_run_at END
WHERE (s.action, s.cron, s.every_seconds, s.timezone, s.payload, s.queue, s.priority, s.missed)
      IS DISTINCT FROM (excluded.action, excluded.cron, excluded.every_seconds,
                        excluded.timezone, excluded.payload, excluded.queue,
                        excluded.priority, excluded.missed);

-- name: schedule_state
-- Progress of the schedules named in $1, with the database's now.
SELECT name, last_slot_at, next_run_at, now() AS now FROM schedules WHERE name = ANY($1::text[]);

-- name: schedule_advance_if_at
-- Move schedule $1 from slot $2 (as read) to slot $3, next run at $4, its task $5. No row:
-- another scheduler advanced it first.
UPDATE schedules SET last_slot_at = $3, next_run_at = $4, last_task_id = coalesce($5, last_task_id),
                     updated_at = now()
WHERE name = $1 AND last_slot_at IS NOT DISTINCT FROM $2
RETURNING name;

-- name: schedule_list
-- Every schedule, by name.
SELECT * FROM schedules ORDER BY name;

-- name: retention_try_lock
-- Whether this transaction won the retention lock (held until it commits or rolls back:
-- transaction-scoped, so that it works through a pooler in transaction mode too).
SELECT pg_try_advisory_xact_lock(hashtextextended('tasklease.retention', 0));

-- name: task_prune_finished
-- Delete, with their history, the tasks among the next $2 ids after $1 that finished long
-- enough ago: COMPLETED or CANCELLED for more than $3 seconds, DEAD for more than $4 (NULL:
-- keep). The window walks the primary key, so no index on finished tasks is needed (one would
-- cost every completion); the caller stops at the first window created after the cutoff.
-- A task that moved meanwhile (a DEAD one requeued) is skipped or re-checked under its lock.
-- A deleted dependant's edges go with it (those of a deleted dependency stay with their
-- dependant, for its ctx.dependencies and its workflow's graph).
WITH scanned AS (
    SELECT id, state, updated_at, created_at FROM tasks WHERE id > $1 ORDER BY id LIMIT $2
), doomed AS (
    SELECT id FROM tasks
    WHERE id = ANY(ARRAY(
        SELECT id FROM scanned
        WHERE (state IN ('COMPLETED', 'CANCELLED') AND updated_at < now() - make_interval(secs => $3))
           OR (state = 'DEAD' AND updated_at < now() - make_interval(secs => $4))))
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM tasks t USING doomed
    WHERE t.id = doomed.id
      AND ((t.state IN ('COMPLETED', 'CANCELLED') AND t.updated_at < now() - make_interval(secs => $3))
           OR (t.state = 'DEAD' AND t.updated_at < now() - make_interval(secs => $4)))
    RETURNING t.id
), history AS (
    DELETE FROM task_transitions WHERE task_id = ANY(ARRAY(SELECT id FROM gone)) RETURNING 1
), edges AS (
    -- a finished dependant's edges (docs/workflows.md): nothing reads them again
    DELETE FROM task_dependencies WHERE task_id = ANY(ARRAY(SELECT id FROM gone))
)
SELECT (SELECT count(*) FROM gone) AS tasks, (SELECT count(*) FROM history) AS transitions,
       (SELECT max(id) FROM scanned) AS last_id,
       (SELECT min(created_at) >= now() - make_interval(secs => least($3, $4)) FROM scanned)
           AS past_cutoff;

-- name: process_prune
-- Forget processes not seen for $1 seconds.
DELETE FROM processes WHERE last_seen_at < now() - make_interval(secs => $1);

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

-- name: ui_session_start
-- A dashboard login: session $1 valid for $2 seconds; sessions past their expiry go.
WITH gone AS (DELETE FROM ui_sessions WHERE expires_at < now())
INSERT INTO ui_sessions (id, expires_at) VALUES ($1, now() + make_interval(secs => $2));

-- name: ui_session_alive
-- Whether dashboard session $1 exists and has not expired.
SELECT EXISTS (SELECT 1 FROM ui_sessions WHERE id = $1 AND expires_at > now());

-- name: ui_session_end
-- Log dashboard session $1 out.
DELETE FROM ui_sessions WHERE id = $1;

-- name: limit_set
-- Give global limit $1 ('queue:NAME', 'action:NAME', 'rate:NAME' or 'key:NAME') the value $2
-- (a rate: per $3 seconds; a key: per value of the payload field $5, NULL keeping the one
-- stored), declared by code ($4 true: an operator's value is left alone) or set by an
-- operator ($4 false). Adds its tokens up to the value and deletes the free ones above it
-- (those still held stay with their tasks, and are never taken again); a key's tokens are
-- made by the claim as each value needs them. Returns the limit, or no row when a
-- declaration met an operator's value.
WITH l AS (
    INSERT INTO limits AS l (key, value, per_seconds, declared, by)
    VALUES ($1, $2, $3, $4, coalesce($5, (SELECT by FROM limits WHERE key = $1)))
    ON CONFLICT (key) DO UPDATE
    SET value = excluded.value, per_seconds = excluded.per_seconds,
        declared = excluded.declared, by = excluded.by,
        updated_at = CASE WHEN (l.value, l.per_seconds, l.declared, l.by)
                               IS DISTINCT FROM (excluded.value, excluded.per_seconds,
                                                 excluded.declared, excluded.by)
                          THEN now() ELSE l.updated_at END
    WHERE NOT (excluded.declared AND NOT l.declared)
    RETURNING l.*
), added AS (
    -- when some are missing: a worker starting with the value already written counts
    -- them (an index-only scan) and writes nothing
    INSERT INTO limit_tokens (key, n)
    SELECT l.key, generate_series(1, l.value) FROM l
    WHERE l.key NOT LIKE 'key:%'
      AND (SELECT count(*) FROM limit_tokens t WHERE t.key = l.key AND t.n <= l.value) < l.value
    ON CONFLICT DO NOTHING
), dropped AS (
    DELETE FROM limit_tokens t USING l
    WHERE t.key = l.key AND t.n > l.value AND t.task_id IS NULL
), dropped_per_key AS (
    DELETE FROM limit_key_tokens t USING l
    WHERE l.key LIKE 'key:%' AND t.key = l.key AND t.n > l.value AND t.task_id IS NULL
)
SELECT key, value, per_seconds, declared, by, updated_at FROM l;

-- name: limit_unset
-- Remove the global limits in $1, those declared by code only if $2 (a worker whose code no
-- longer declares them), any if not $2 (an operator). Their tokens go with them.
DELETE FROM limits WHERE key = ANY($1::text[]) AND (declared OR NOT $2) RETURNING key;

-- name: limit_list
-- Every global limit with what holds its tokens now: running tasks (concurrency, per-key)
-- or starts within the last period (rate); for a per-key limit, `keys`: how many values of
-- its field have a task running.
SELECT l.key, l.value, l.per_seconds, l.declared, l.by, l.updated_at,
       CASE WHEN l.key LIKE 'key:%'
            THEN (SELECT count(*) FROM limit_key_tokens k
                  WHERE k.key = l.key AND k.task_id IS NOT NULL)
            ELSE (SELECT count(*) FROM limit_tokens t
                  WHERE t.key = l.key AND (t.task_id IS NOT NULL OR t.free_at > now()))
       END AS used,
       CASE WHEN l.key LIKE 'key:%'
            THEN (SELECT count(DISTINCT k.sub) FROM limit_key_tokens k
                  WHERE k.key = l.key AND k.task_id IS NOT NULL) END AS keys
FROM limits l ORDER BY l.key;

-- name: queue_pause
-- Pause queue $1: claims in it start nothing until it is resumed. Returns when it was
-- paused (the first time, if it already was).
WITH paused AS (
    INSERT INTO queue_pauses (queue) VALUES ($1) ON CONFLICT (queue) DO NOTHING
    RETURNING paused_at
)
SELECT paused_at FROM paused
UNION ALL
SELECT paused_at FROM queue_pauses WHERE queue = $1;

-- name: queue_resume
-- Resume queue $1 and wake the workers of it; returns the queue if it was paused.
DELETE FROM queue_pauses WHERE queue = $1 AND pg_notify('tasklease', queue) IS NOT NULL
RETURNING queue;

-- name: queue_wake
-- Wake the workers of the queues in $1: what a submission in a transaction of its own sends
-- after its commit (Store.wake). A transaction that notifies holds a lock from its commit
-- until its WAL is flushed, so a NOTIFY inside each submission serialised their commits
-- (no group commit). This one writes nothing durable: its commit need not wait for the
-- flush (a crash may lose the wake-up, never a task; workers poll as a safety net).
SELECT set_config('synchronous_commit', 'off', true), pg_notify('tasklease', q)
FROM unnest($1::text[]) AS q;

-- name: queue_paused_list
-- The paused queues, with when each was paused.
SELECT queue, paused_at FROM queue_pauses ORDER BY queue;
