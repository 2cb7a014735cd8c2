"""global limits in shards: claimers of a limited key no longer wait for each other

Revision ID: 0004
Revises: 0003
"""

from tasklease.schema.migrations import run_sql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UP = """
-- The shard of each limit a running task was counted in (NULL: none, or claimed before 0004).
ALTER TABLE tasks ADD COLUMN queue_slot smallint, ADD COLUMN action_slot smallint;
ALTER TABLE action_starts ADD COLUMN slot smallint;
CREATE INDEX action_starts_action_slot_at ON action_starts (action, slot, at);
DROP INDEX action_starts_action_at;

-- Per shard of a limit (its key names the limit, its period, its number of shards and the
-- shard), a bound on what the shard holds: at least the running tasks started in it (or the
-- starts in its window), so that a claim need not count them while the bound leaves room.
-- Written only under the shard's lock: set to the exact count when one is made, plus what
-- each claim may start; tasks that finish (starts that age out) only make it looser.
CREATE TABLE limit_bounds (
    key   text    PRIMARY KEY,
    bound integer NOT NULL
);

-- How many more tasks a claim may start under the global limits that apply to it, and in
-- which shard. Called by task_claim_due only when a limit applies (docs/scheduling.md).
--
-- A limit L is split into shards: min(16, max(1, L / 128)) of them, shard s holding
-- L / shards, plus one for the first L mod shards. Each shard has its own transaction-scoped
-- advisory lock. Per limited key (the queue; each action's concurrency; each action's rate),
-- in key order, the claim takes the first shard whose lock is free, trying from a random
-- one; only when all are held does it wait, for one. It then reads what the shard holds
-- with a snapshot taken after the lock (the function is VOLATILE), so it sees every claim
-- committed in the shard by whoever held it before: the shard's bound (limit_bounds) when
-- that leaves room for the whole claim, else an exact count. A concurrency shard counted
-- too full for the claim is swapped, once, for the emptiest other shard if that has more
-- room and its lock is free (counted again under it). The claim may take at most the
-- shard's room, and sets the bound to what the shard holds plus what it may start.
-- The claim records the shard in the task (queue_slot, action_slot) or the start
-- (action_starts.slot); a shard's count changes upwards only under its lock, so no shard
-- exceeds its part, and the shards' parts add up to L. A slot that is NULL or not a shard
-- of the limit as now set counts in shard 0.
--
-- Deadlock-free: keys in one order, and within a key a claim waits only while it holds no
-- shard of that key, so whoever holds what it waits for waits only on later keys.
--
-- One row per limited key of the queue and per limited action: running_left (NULL: no
-- concurrency limit) and run_slot; starts_left (NULL: no rate limit) and rate_slot; and for
-- each, when the claim fills its shard, when to look again: 0 if another shard had room
-- when counted, the seconds until a rate window frees a start, or NULL (the caller's
-- default).
CREATE FUNCTION tasklease_claim_slots(
    p_queue text, p_queue_max integer,
    p_actions text[], p_max_running integer[], p_rate integer[], p_period float8[],
    p_want integer
) RETURNS TABLE (scope text, name text, running_left integer, run_slot smallint,
                 run_retry float8, starts_left integer, rate_slot smallint,
                 rate_retry float8)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    k record;
    v_shards integer;
    v_first integer;
    v_try integer;
    v_prefix text;
    v_slot integer;
    v_cap integer;
    v_used integer;
    v_total integer;
    v_room integer;
    v_moved boolean;
    v_left integer;
    v_bound_key text;
    v_retry float8;
    v_n integer := coalesce(cardinality(p_actions), 0);
    v_run_left integer[] := array_fill(NULL::integer, ARRAY[v_n]);
    v_run_slot smallint[] := array_fill(NULL::smallint, ARRAY[v_n]);
    v_run_retry float8[] := array_fill(NULL::float8, ARRAY[v_n]);
    v_rate_left integer[] := array_fill(NULL::integer, ARRAY[v_n]);
    v_rate_slot smallint[] := array_fill(NULL::smallint, ARRAY[v_n]);
    v_rate_retry float8[] := array_fill(NULL::float8, ARRAY[v_n]);
BEGIN
    FOR k IN
        SELECT * FROM (
            SELECT 'queue:' || p_queue AS key, 'queue' AS kind, 0 AS i, p_queue_max AS lim,
                   NULL::float8 AS period
            WHERE p_queue_max IS NOT NULL
            UNION ALL
            SELECT 'action:' || u.a, 'running', u.i::integer, u.m, NULL
            FROM unnest(p_actions, p_max_running) WITH ORDINALITY AS u(a, m, i)
            WHERE u.m IS NOT NULL
            UNION ALL
            SELECT 'rate:' || u.a, 'rate', u.i::integer, u.r, u.p
            FROM unnest(p_actions, p_rate, p_period) WITH ORDINALITY AS u(a, r, p, i)
            WHERE u.r IS NOT NULL
        ) AS keys ORDER BY key
    LOOP
        v_shards := greatest(least(k.lim / 128, 16), 1);
        v_prefix := k.key || coalesce('/' || k.period, '') || '/' || v_shards || '#';
        v_first := floor(random() * v_shards)::integer;
        v_slot := NULL;
        FOR j IN 0 .. v_shards - 1 LOOP
            IF pg_try_advisory_xact_lock(hashtextextended(
                   'tasklease.limit:' || k.key || '#' || (v_first + j) % v_shards, 0)) THEN
                v_slot := (v_first + j) % v_shards;
                EXIT;
            END IF;
        END LOOP;
        IF v_slot IS NULL THEN
            v_slot := v_first;
            PERFORM pg_advisory_xact_lock(hashtextextended(
                'tasklease.limit:' || k.key || '#' || v_slot, 0));
        END IF;
        v_cap := k.lim / v_shards + (v_slot < k.lim % v_shards)::integer;
        v_retry := NULL;
        v_moved := false;

        -- What the shard holds: its bound when that leaves room for the whole claim, else
        -- an exact count (which also says when to look again if the claim fills it).
        v_bound_key := v_prefix || v_slot;
        SELECT b.bound INTO v_used FROM limit_bounds b WHERE b.key = v_bound_key;
        IF v_used IS NULL OR v_used + p_want > v_cap THEN
            IF k.kind = 'rate' THEN
                -- the shard's sliding window (the holder of shard 0 also counts and clears
                -- strays)
                DELETE FROM action_starts s
                WHERE s.action = p_actions[k.i] AND s.slot = v_slot
                  AND s.at <= now() - make_interval(secs => k.period);
                SELECT count(*)::integer INTO v_used FROM action_starts s
                WHERE s.action = p_actions[k.i] AND s.slot = v_slot
                  AND s.at > now() - make_interval(secs => k.period);
                IF v_slot = 0 THEN
                    DELETE FROM action_starts s
                    WHERE s.action = p_actions[k.i] AND (s.slot IS NULL OR s.slot >= v_shards)
                      AND s.at <= now() - make_interval(secs => k.period);
                    v_used := v_used + (SELECT count(*)::integer FROM action_starts s
                                        WHERE s.action = p_actions[k.i]
                                          AND (s.slot IS NULL OR s.slot >= v_shards));
                END IF;
                IF v_used + p_want >= v_cap THEN
                    -- this claim may fill the shard: when does one have room (0: now)?
                    SELECT min(CASE WHEN w.s <> v_slot AND w.n < k.lim / v_shards
                                         + (w.s < k.lim % v_shards)::integer THEN 0
                                    ELSE greatest(extract(epoch FROM w.oldest
                                        + make_interval(secs => k.period) - now())::float8, 0)
                               END)
                    INTO v_retry
                    FROM (SELECT g.s, coalesce(c.n, 0) AS n, coalesce(c.oldest, now()) AS oldest
                          FROM generate_series(0, v_shards - 1) AS g(s)
                          LEFT JOIN (
                              SELECT CASE WHEN s.slot < v_shards THEN s.slot ELSE 0 END AS s,
                                     count(*) AS n, min(s.at) AS oldest
                              FROM action_starts s
                              WHERE s.action = p_actions[k.i]
                                AND s.at > now() - make_interval(secs => k.period)
                              GROUP BY 1) AS c ON c.s = g.s) AS w;
                END IF;
            ELSE
                -- The running tasks of the key: in all, and in this shard. All running
                -- tasks are read through the lease index (few), never the whole index of the
                -- action or queue (OFFSET 0 keeps the key's test out of the scan). When the
                -- shard cannot take the whole claim and the others have room, the claim
                -- moves, once, to the emptiest other shard if that has more room and its
                -- lock is free, and counts again (the counts came before that lock). The
                -- shard it leaves was counted under its lock: its bound becomes that count.
                LOOP
                    SELECT count(*)::integer,
                           count(*) FILTER (WHERE CASE WHEN r.slot < v_shards THEN r.slot
                                                       ELSE 0 END = v_slot)::integer
                    INTO v_total, v_used
                    FROM (SELECT CASE k.kind WHEN 'queue' THEN t.queue_slot
                                             ELSE t.action_slot END AS slot
                          FROM (SELECT t.queue, t.action, t.queue_slot, t.action_slot
                                FROM tasks t
                                WHERE t.lease_expires_at IS NOT NULL AND t.state = 'RUNNING'
                                OFFSET 0) AS t
                          WHERE CASE k.kind WHEN 'queue' THEN t.queue = p_queue
                                            ELSE t.action = p_actions[k.i] END) AS r;
                    EXIT WHEN v_used + p_want <= v_cap OR v_moved
                        OR v_total - v_used >= k.lim - v_cap;
                    v_moved := true;
                    SELECT w.s, w.room INTO v_try, v_room
                    FROM (SELECT g.s, k.lim / v_shards + (g.s < k.lim % v_shards)::integer
                                      - count(r.slot) AS room
                          FROM generate_series(0, v_shards - 1) AS g(s)
                          LEFT JOIN (SELECT CASE k.kind WHEN 'queue' THEN t.queue_slot
                                                        ELSE t.action_slot END AS slot
                                     FROM (SELECT t.queue, t.action, t.queue_slot,
                                                  t.action_slot
                                           FROM tasks t
                                           WHERE t.lease_expires_at IS NOT NULL
                                             AND t.state = 'RUNNING'
                                           OFFSET 0) AS t
                                     WHERE CASE k.kind WHEN 'queue' THEN t.queue = p_queue
                                                       ELSE t.action = p_actions[k.i] END) AS r
                            ON CASE WHEN r.slot < v_shards THEN r.slot ELSE 0 END = g.s
                          WHERE g.s <> v_slot
                          GROUP BY g.s) AS w
                    ORDER BY w.room DESC, random()
                    LIMIT 1;
                    EXIT WHEN v_room <= v_cap - v_used
                        OR NOT pg_try_advisory_xact_lock(hashtextextended(
                                   'tasklease.limit:' || k.key || '#' || v_try, 0));
                    INSERT INTO limit_bounds AS b (key, bound) VALUES (v_bound_key, v_used)
                    ON CONFLICT (key) DO UPDATE SET bound = excluded.bound;
                    v_slot := v_try;
                    v_cap := k.lim / v_shards + (v_slot < k.lim % v_shards)::integer;
                    v_bound_key := v_prefix || v_slot;
                END LOOP;
                -- another shard has room: look again at once if this claim fills this one
                v_retry := CASE WHEN v_total - v_used < k.lim - v_cap THEN 0 END;
            END IF;
        END IF;
        v_left := greatest(v_cap - v_used, 0);
        -- the claim may start up to this many in the shard: the bound says so until the next
        -- count
        INSERT INTO limit_bounds AS b (key, bound)
        VALUES (v_bound_key, v_used + least(v_left, p_want))
        ON CONFLICT (key) DO UPDATE SET bound = excluded.bound;

        IF k.kind = 'rate' THEN
            v_rate_left[k.i] := v_left;
            v_rate_slot[k.i] := v_slot;
            v_rate_retry[k.i] := v_retry;
        ELSIF k.kind = 'queue' THEN
            RETURN QUERY SELECT 'queue', p_queue, v_left, v_slot::smallint, v_retry,
                                NULL::integer, NULL::smallint, NULL::float8;
        ELSE
            v_run_left[k.i] := v_left;
            v_run_slot[k.i] := v_slot;
            v_run_retry[k.i] := v_retry;
        END IF;
    END LOOP;

    RETURN QUERY
    SELECT 'action', u.a, u.rl, u.rs, u.rr, u.sl, u.ss, u.sr
    FROM unnest(p_actions, v_run_left, v_run_slot, v_run_retry, v_rate_left, v_rate_slot,
                v_rate_retry) AS u(a, rl, rs, rr, sl, ss, sr);
END
$fn$;
"""

DOWN = """
DROP FUNCTION tasklease_claim_slots(text, integer, text[], integer[], integer[], float8[],
                                    integer);
CREATE INDEX action_starts_action_at ON action_starts (action, at);
DROP INDEX action_starts_action_slot_at;
DROP TABLE limit_bounds;
ALTER TABLE action_starts DROP COLUMN slot;
ALTER TABLE tasks DROP COLUMN action_slot, DROP COLUMN queue_slot;
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
