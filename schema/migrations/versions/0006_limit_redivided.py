"""a limit given a new value never lets its running tasks (or starts) exceed it

A new value of a limit re-divides it into shards, but the tasks already running keep the
shard they were started in, which may now hold more than its new part (and a new shard starts
empty): before this migration the key's running tasks could exceed the limit until those
tasks finished (500 = 4 x 125 after 400 = 3 x ~133: up to 517). Now what the shards hold
above their parts (their excess) counts in every other shard as well.

Why the sum then stays within the limit: a shard over its part gets no claim, so its excess
only shrinks as its tasks finish (or its starts leave the window), and a count of the others
read without their locks can only overstate it. A claim in shard s leaves s holding at most
part(s) - excess(others); so once any shard within its part has been claimed in since the
change, the shards within their parts hold at most their parts minus the excess, and the
total is at most the limit. Until then no claim has added anything. (Rate limits: the same
for every window of one period, since a claim's window holds every older start of any window
that holds the claim.) With one value since the start, no shard is ever over its part, so
nothing changes.

While workers disagree on the value (a rolling deploy), each claim still adds to a shard only
up to the part its own value gives it, and a shard's bound (limit_bounds.bound) is now what
the shard's slot itself holds, whoever claimed in it, so it stays true for every value: the
running tasks stay within the sum over shards of the largest part any worker gives each.
(Before, a bound was kept per number of shards, so workers of two numbers did not see each
other's claims in it.) What a count found beside (strays, the others' excess) is kept apart,
in `extra`, for the value it was counted for (`lim`), and trusted only by claims of that value;
it misses what claims of another value add in other shards afterwards, which is why that sum,
not the new value, is the bound until the tasks started while workers disagreed have finished.
For the same reason the first claim of a value in a shard sets aside every row kept for
another value, so that a value changed back counts afresh.

The function is written out whole below; 0004 holds its first version. The bounds of before
are dropped (they are only a cache of counts), and their keys no longer name the number of
shards.

Revision ID: 0006
Revises: 0005
"""

import importlib

from tasklease.schema.migrations import run_sql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UP = """
DELETE FROM limit_bounds;
-- a bound: what the shard's slot holds (any value of the limit); lim, extra: what the last
-- count for that value of the limit found beside it (strays, other shards' excess)
ALTER TABLE limit_bounds ADD COLUMN lim integer, ADD COLUMN extra integer NOT NULL DEFAULT 0;

-- How many more tasks a claim may start under the global limits that apply to it, and in
-- which shard. Called by task_claim_due only when a limit applies (docs/scheduling.md).
--
-- A limit L is split into shards: round(L / 128) of them, 1 to 16, shard s holding its part
-- L / shards, plus one for the first L mod shards. Each shard has its own transaction-scoped
-- advisory lock. Per limited key (the queue; each action's concurrency; each action's rate),
-- in key order, the claim takes the first shard whose lock is free, trying from a random
-- one; only when all are held does it wait, for one. It then reads what the shard holds
-- with a snapshot taken after the lock (the function is VOLATILE), so it sees every claim
-- committed in the shard by whoever held it before. What a shard holds: the running tasks
-- (or starts in the window) recorded in its slot; in shard 0 also the strays (a slot that is
-- NULL or not a shard of the limit as now set); and what the other shards hold above their
-- parts (only after the limit was given a new value). Read from the shard's bound
-- (limit_bounds) when that leaves room for the whole claim, else counted. A concurrency
-- shard counted too full for the claim is swapped, once, for the other shard with the most
-- room if that has more and its lock is free (counted again under it). The claim may take
-- at most the shard's room; it records the shard in the task (queue_slot, action_slot) or the
-- start (action_starts.slot), and sets the bound to what the slot holds plus what it may
-- start (and, apart, what it counted beside). A slot's count grows only under its lock, and
-- only up to its part, so the parts, which add up to L, bound the total.
--
-- Deadlock-free: keys in one order, and within a key a claim waits only while it holds no
-- shard of that key, so whoever holds what it waits for waits only on later keys.
--
-- One row per limited key of the queue and per limited action: running_left (NULL: no
-- concurrency limit) and run_slot; starts_left (NULL: no rate limit) and rate_slot; and for
-- each, when the claim fills its shard, when to look again: 0 if another shard had room
-- when counted, the seconds until a rate window frees a start, or NULL (the caller's
-- default).
CREATE OR REPLACE FUNCTION tasklease_claim_slots(
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
    v_slot integer;
    v_cap integer;
    v_part integer;
    v_held integer[];          -- per shard (index shard + 1): running tasks, or starts
    v_oldest timestamptz[];    -- per shard: its oldest start in the window
    v_stray record;
    v_strays integer;
    v_excess integer;
    v_used integer;
    v_own integer;
    v_row record;
    v_try integer;
    v_room integer;
    v_r integer;
    v_ties integer;
    v_moved boolean;
    v_left integer;
    v_prefix text;
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
        v_shards := greatest(least((k.lim + 64) / 128, 16), 1);
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

        -- What the shard holds: its bound (what its slot holds, plus what its last count of
        -- this value of the limit found beside) when that leaves room for the whole claim,
        -- else a count (which also says when to look again if the claim fills it).
        v_prefix := k.key || coalesce('/' || k.period, '') || '#';
        v_bound_key := v_prefix || v_slot;
        SELECT b.bound, b.lim, b.extra INTO v_row FROM limit_bounds b WHERE b.key = v_bound_key;
        v_own := v_row.bound;
        v_used := v_row.bound + v_row.extra;
        IF v_row.lim IS DISTINCT FROM k.lim OR v_used + p_want > v_cap THEN
            IF v_row.lim IS DISTINCT FROM k.lim THEN
                -- The first claim of this value in this shard: what the last counts of
                -- other values found beside their shards misses what this value adds, so a
                -- claim under one of them counts again. (SKIP LOCKED: a row locked now is
                -- being written by a claim beside this one, which only a rolling deploy
                -- makes.)
                UPDATE limit_bounds AS b SET lim = NULL
                WHERE b.key IN (
                    SELECT o.key FROM limit_bounds o
                    WHERE o.key = ANY(ARRAY(SELECT v_prefix || g FROM generate_series(0, 15) AS g))
                      AND o.lim <> k.lim
                    FOR UPDATE SKIP LOCKED);
            END IF;
            IF k.kind = 'rate' THEN
                -- the shard's sliding window: its holder clears what left it (the holder
                -- of shard 0 also what strays left)
                DELETE FROM action_starts s
                WHERE s.action = p_actions[k.i] AND s.slot = v_slot
                  AND s.at <= now() - make_interval(secs => k.period);
                IF v_slot = 0 THEN
                    DELETE FROM action_starts s
                    WHERE s.action = p_actions[k.i] AND (s.slot IS NULL OR s.slot >= v_shards)
                      AND s.at <= now() - make_interval(secs => k.period);
                END IF;
            END IF;
            LOOP
                -- Every shard of the key: what it holds itself. Running tasks are read
                -- through the lease index (few), never the whole index of the action or
                -- queue (OFFSET 0 keeps the key's test out of the scan); starts shard by
                -- shard through (action, slot, at).
                IF k.kind = 'rate' THEN
                    SELECT array_agg(c.n ORDER BY g.s), array_agg(c.oldest ORDER BY g.s)
                    INTO v_held, v_oldest
                    FROM generate_series(0, v_shards - 1) AS g(s)
                    CROSS JOIN LATERAL (
                        SELECT count(*)::integer AS n, min(s.at) AS oldest
                        FROM action_starts s
                        WHERE s.action = p_actions[k.i] AND s.slot = g.s
                          AND s.at > now() - make_interval(secs => k.period)) AS c;
                    SELECT count(*)::integer AS n, min(s.at) AS oldest INTO v_stray
                    FROM action_starts s
                    WHERE s.action = p_actions[k.i] AND (s.slot IS NULL OR s.slot >= v_shards)
                      AND s.at > now() - make_interval(secs => k.period);
                    v_strays := v_stray.n;
                    v_oldest[1] := least(v_oldest[1], v_stray.oldest);
                ELSE
                    -- strays at -1, the first element
                    SELECT array_agg(coalesce(c.n, 0) ORDER BY g.s) INTO v_held
                    FROM generate_series(-1, v_shards - 1) AS g(s)
                    LEFT JOIN (
                        SELECT CASE WHEN r.slot < v_shards THEN r.slot ELSE -1 END AS s,
                               count(*)::integer AS n
                        FROM (SELECT CASE k.kind WHEN 'queue' THEN t.queue_slot
                                                 ELSE t.action_slot END AS slot
                              FROM (SELECT t.queue, t.action, t.queue_slot, t.action_slot
                                    FROM tasks t
                                    WHERE t.lease_expires_at IS NOT NULL
                                      AND t.state = 'RUNNING'
                                    OFFSET 0) AS t
                              WHERE CASE k.kind WHEN 'queue' THEN t.queue = p_queue
                                                ELSE t.action = p_actions[k.i] END) AS r
                        GROUP BY 1) AS c ON c.s = g.s;
                    v_strays := v_held[1];
                    v_held := v_held[2:];
                END IF;
                -- strays (no shard, or one the limit no longer has) are held by shard 0
                v_held[1] := v_held[1] + v_strays;
                -- what shards hold above their parts counts in every other shard
                v_excess := 0;
                FOR w IN 0 .. v_shards - 1 LOOP
                    v_part := k.lim / v_shards + (w < k.lim % v_shards)::integer;
                    v_excess := v_excess + greatest(v_held[w + 1] - v_part, 0);
                END LOOP;
                v_used := v_held[v_slot + 1] + v_excess
                          - greatest(v_held[v_slot + 1] - v_cap, 0);
                v_own := v_held[v_slot + 1] - CASE WHEN v_slot = 0 THEN v_strays ELSE 0 END;
                -- the other shard with the most room (at random among equals)
                v_try := NULL;
                v_room := NULL;
                v_ties := 0;
                FOR w IN 0 .. v_shards - 1 LOOP
                    CONTINUE WHEN w = v_slot;
                    v_part := k.lim / v_shards + (w < k.lim % v_shards)::integer;
                    v_r := v_part - v_held[w + 1] - v_excess
                           + greatest(v_held[w + 1] - v_part, 0);
                    IF v_room IS NULL OR v_r > v_room THEN
                        v_try := w;
                        v_room := v_r;
                        v_ties := 1;
                    ELSIF v_r = v_room THEN
                        v_ties := v_ties + 1;
                        IF random() * v_ties < 1 THEN
                            v_try := w;
                        END IF;
                    END IF;
                END LOOP;
                -- A concurrency claim its shard cannot hold moves, once, to that shard if
                -- it has more room and its lock is free, and counts again (the counts came
                -- before that lock). The shard it leaves was counted under its lock: its
                -- bound becomes that count.
                EXIT WHEN k.kind = 'rate' OR v_used + p_want <= v_cap OR v_moved
                    OR coalesce(v_room, 0) <= greatest(v_cap - v_used, 0)
                    OR NOT pg_try_advisory_xact_lock(hashtextextended(
                               'tasklease.limit:' || k.key || '#' || v_try, 0));
                v_moved := true;
                INSERT INTO limit_bounds AS b (key, bound, lim, extra)
                VALUES (v_bound_key, v_own, k.lim, v_used - v_own)
                ON CONFLICT (key) DO UPDATE
                SET bound = excluded.bound, lim = excluded.lim, extra = excluded.extra;
                v_slot := v_try;
                v_cap := k.lim / v_shards + (v_slot < k.lim % v_shards)::integer;
                v_bound_key := v_prefix || v_slot;
            END LOOP;
            -- when this claim fills its shard, when to look again: at once if another
            -- shard has room, else (a rate) when the first start leaves a window
            IF coalesce(v_room, 0) > 0 THEN
                v_retry := 0;
            ELSIF k.kind = 'rate' AND v_used + p_want >= v_cap THEN
                SELECT min(greatest(extract(epoch FROM coalesce(o.at, now())
                                    + make_interval(secs => k.period) - now())::float8, 0))
                INTO v_retry FROM unnest(v_oldest) AS o(at);
            END IF;
        END IF;
        v_left := greatest(v_cap - v_used, 0);
        -- the claim may start up to this many in the shard: the bound says so until the next
        -- count
        INSERT INTO limit_bounds AS b (key, bound, lim, extra)
        VALUES (v_bound_key, v_own + least(v_left, p_want), k.lim, v_used - v_own)
        ON CONFLICT (key) DO UPDATE
        SET bound = excluded.bound, lim = excluded.lim, extra = excluded.extra;

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

# Back to 0005's function, whose bounds are keyed by the number of shards: none of these
# may be read by it.
DOWN = (
    "DELETE FROM limit_bounds;\nALTER TABLE limit_bounds DROP COLUMN lim, DROP COLUMN extra;\n"
    + importlib.import_module("tasklease.schema.migrations.versions.0005_limit_shards_rounded").UP
)


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
