"""Claiming and listing read indexes only, whatever piles up beside what they return."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import pytest

from tasklease.engine.queries import CLAIM, CLAIM_LIMITED, SQL
from tasklease.engine.store import FIRST_PAGE, LIST_FILTERS
from tests.support.db import LEASES

# tasks_state_id serves `state = 'RUNNING'` as well as tasks_lease_expiry: RUNNING rows only
ALLOWED_INDEXES = {
    "tasks_claimable",
    "tasks_claimable_order",
    "tasks_lease_expiry",
    "tasks_state_id",
    "tasks_pkey",
    "limits_pkey",
    "limit_tokens_pkey",
    "limit_tokens_rate",
    "queue_pauses_pkey",
    "limit_key_tokens_pkey",
    "tasks_running_keyed",
}


# tables the claim reads only through an index: each is as large as the tasks or the limits
SCANNED_BY_KEY = ("tasks", "limit_tokens", "limit_key_tokens")


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in nodes(child))]


async def claim_plan(
    conn: asyncpg.Connection, plan_mode: str, args: tuple[Any, ...], claim: str = CLAIM
) -> list[dict[str, Any]]:
    """The claim's plan, run (and rolled back)."""
    await conn.execute(f"SET plan_cache_mode = {plan_mode}")
    tr = conn.transaction()
    await tr.start()
    try:
        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + claim, *args)
    finally:
        await tr.rollback()
    plan = nodes(msgspec.json.decode(raw)[0]["Plan"])
    for n in plan:
        read = (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
        table = n.get("Relation Name")
        # (an empty table of tokens may be scanned: there is nothing to read)
        if n["Node Type"] == "Seq Scan" and table in SCANNED_BY_KEY and (table == "tasks" or read):
            raise AssertionError(f"the claim reads the whole {table}: {n}")
    indexes = {n["Index Name"] for n in plan if "Index Name" in n}
    assert indexes <= ALLOWED_INDEXES, indexes
    assert {"tasks_claimable", "tasks_claimable_order"} & indexes, indexes
    return plan


def rows_read(
    plan: list[dict[str, Any]],
    indexes: tuple[str, ...] = ("tasks_claimable", "tasks_claimable_order"),
) -> int:
    """Rows read through the given indexes (by default the two claimable ones) by the node
    that read most: those it returned and those its filter dropped, over all its loops."""
    return max(
        round((n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"])
        for n in plan
        if n.get("Index Name") in indexes
    )


ARGS = ("default", list(LEASES), 10, "w", list(LEASES.values()), 300.0)


async def set_limits(conn: asyncpg.Connection, with_limits: bool) -> None:
    """With limits: the queue, and every action, under a concurrency and a rate limit, each
    far above the load."""
    if with_limits:
        keys = ["queue:default", *(f"{p}:{a}" for a in LEASES for p in ("action", "rate"))]
        for key in keys:
            per = 1.0 if key.startswith("rate:") else None
            await conn.execute(SQL["limit_set"], key, 10_000, per, True, None)
        # half of every concurrency limit held (by tasks that do not exist), half of every
        # rate's tokens taken a moment ago, one token in two as claims that start anywhere
        # leave them: the claim reads few of them
        await conn.execute("""
            UPDATE limit_tokens SET task_id = -n WHERE n % 2 = 0 AND key NOT LIKE 'rate:%';
            UPDATE limit_tokens SET free_at = now() + interval '1 hour'
            WHERE n % 2 = 0 AND key LIKE 'rate:%'""")


# without limits, the claim a worker runs (task_claim_due); with limits, the one it runs
# then (task_claim_due_limited); and that one without limits (the claim after the last limit
# was removed, which says 'plain')
RULES = pytest.mark.parametrize(
    "with_limits, claim",
    [(False, CLAIM), (True, CLAIM_LIMITED), (False, CLAIM_LIMITED)],
    ids=["no-limits", "limits", "no-limits-limited-claim"],
)


@RULES
@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
async def test_claim_never_scans_finished_or_future_tasks(
    conn: asyncpg.Connection, plan_mode: str, with_limits: bool, claim: str
) -> None:
    await set_limits(conn, with_limits)
    await conn.execute("""
        INSERT INTO tasks (action, payload, state, attempt, result)
        SELECT 'noop', '{}', 'COMPLETED', 1, 'null' FROM generate_series(1, 30000);
        INSERT INTO tasks (action, payload, due_at)
        SELECT 'noop', '{}', now() + interval '1 day' FROM generate_series(1, 5000);
        INSERT INTO tasks (action, payload) SELECT 'noop', '{}' FROM generate_series(1, 50);
        ANALYZE tasks;""")
    # rows read through the claimable indexes: the 50 due tasks, not the 35,000 others
    plan = await claim_plan(conn, plan_mode, ARGS, claim)
    assert rows_read(plan) <= 50
    if with_limits:  # windows of each limit's tokens (a sample of 64 to tell whether one is
        # free, 2k + 16 to take k), not their 10,000
        assert rows_read(plan, ("limit_tokens_rate", "limit_tokens_pkey")) <= 400
    # and it claims what is due, not the future or the finished
    rows = await conn.fetch(claim, *ARGS)
    last = "plain" if claim is CLAIM_LIMITED and not with_limits else "wait"
    assert [r["trigger"] for r in rows] == ["claim"] * 10 + [last]
    assert 86000 < rows[-1]["wait_seconds"] <= 86400  # the tasks due in a day


@RULES
@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
async def test_claim_from_a_backlog_reads_one_batch(
    conn: asyncpg.Connection, plan_mode: str, with_limits: bool, claim: str
) -> None:
    """20,000 tasks due: the claim walks the order index and stops after its 10."""
    await set_limits(conn, with_limits)
    await conn.execute("""
        INSERT INTO tasks (action, payload, priority)
        SELECT 'noop', '{}', g % 3 FROM generate_series(1, 20000) g;
        ANALYZE tasks;""")
    assert rows_read(await claim_plan(conn, plan_mode, ARGS, claim)) <= 10


@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
async def test_a_large_claim_under_limits_matches_starts_and_tokens_in_one_pass(
    conn: asyncpg.Connection, plan_mode: str
) -> None:
    """A claim of 200 under limits: no step compares every start with every token or every
    task with every start (a join planned on part of its key, a subquery run per row), which
    took more than half of such a claim's time; and its tokens are read through their key."""
    # the limits of the bench's drains under limits (engine/tools/bench.py), with their
    # tokens analyzed, as a deployment has them
    for key, per in (("queue:default", None), ("action:noop", None), ("rate:noop", 1.0)):
        await conn.execute(SQL["limit_set"], key, 10_000, per, True, None)
    await conn.execute("""
        INSERT INTO tasks (action, payload) SELECT 'noop', '{}' FROM generate_series(1, 1000);
        ANALYZE tasks; ANALYZE limit_tokens;""")
    args = ("default", list(LEASES), 200, "w", list(LEASES.values()), 300.0)
    plan = await claim_plan(conn, plan_mode, args, CLAIM_LIMITED)
    # each start is looked at once for each of its 3 limits and each of the 4 actions
    # claimed for, nothing more
    most = max(3, len(LEASES)) * 200
    dropped = max(round(n.get("Rows Removed by Join Filter", 0)) for n in plan)
    assert dropped <= most, dropped
    visited = max(round(n["Actual Rows"] * n["Actual Loops"]) for n in plan)
    assert visited <= most, visited
    rows = await conn.fetch(CLAIM_LIMITED, *args)
    assert [r["trigger"] for r in rows] == ["claim"] * 200 + ["wait"]
    # each start took its queue's and its action's concurrency token, and a rate token
    ids = [r["id"] for r in rows[:-1]]
    held = await conn.fetch(
        "SELECT task_id, array_agg(split_part(key, ':', 1) ORDER BY key) AS kinds "
        "FROM limit_tokens WHERE task_id = ANY($1) GROUP BY task_id",
        ids,
    )
    assert sorted(r["task_id"] for r in held) == sorted(ids)
    assert {tuple(r["kinds"]) for r in held} == {("action", "queue")}
    rated = await conn.fetchval(
        "SELECT count(*) FROM limit_tokens WHERE key = 'rate:noop' AND free_at > now()"
    )
    assert rated == 200


@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
async def test_claim_under_a_per_key_limit_reads_past_full_values_only(
    conn: asyncpg.Connection, plan_mode: str
) -> None:
    """20,000 tasks due from 100 customers, one in two at its cap of 2: the claim reads the
    100 RUNNING tasks of the action by value, and walks the order index past the tasks of
    the full values (one in two) to its 10; it reads the tokens of the values it starts."""
    await conn.execute(SQL["limit_set"], "key:noop", 2, None, True, "customer")
    await conn.execute("""
        INSERT INTO tasks (action, payload, state, attempt, lease_expires_at, lease_token,
                           worker, limit_key)
        SELECT 'noop', jsonb_build_object('customer', 'c' || (g % 50) * 2), 'RUNNING', 1,
               now() + interval '1 hour', gen_random_uuid(), 'w', 'c' || (g % 50) * 2
        FROM generate_series(1, 100) g;
        INSERT INTO tasks (action, payload)
        SELECT 'noop', jsonb_build_object('customer', 'c' || g % 100)
        FROM generate_series(1, 20000) g;
        ANALYZE tasks;""")
    plan = await claim_plan(conn, plan_mode, ARGS, CLAIM_LIMITED)
    assert rows_read(plan) <= 30
    assert rows_read(plan, ("tasks_running_keyed",)) <= 100
    rows = await conn.fetch(CLAIM_LIMITED, *ARGS)
    assert [r["trigger"] for r in rows] == ["claim"] * 10 + ["held"]


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"state": "DEAD"},
        {"state": "PENDING", "action": "rare"},
        {"state": "DEAD", "queue": "x"},
    ],
)
async def test_listing_pages_by_state_read_an_index(
    conn: asyncpg.Connection, filters: dict[str, str]
) -> None:
    """A page of unfinished tasks (by state, with or without action or queue) beside 30,000
    finished ones. A filter by action or queue alone has no index of its own (migration
    0014: one would cost every claim and completion) and reads the primary key back from
    its cursor: ~50 ms for a rare action among a million finished tasks (docs/operations.md)."""
    await conn.execute("""
        INSERT INTO tasks (action, payload, state, attempt, result)
        SELECT 'noop', '{}', 'COMPLETED', 1, 'null' FROM generate_series(1, 30000);
        INSERT INTO tasks (action, queue, payload) VALUES ('rare', 'rare', '{}');
        ANALYZE tasks;""")
    args: list[Any] = [FIRST_PAGE, 51]
    where = ""
    for name, value in filters.items():
        args.append(value)
        where += " AND " + LIST_FILTERS[name].format(len(args))
    sql = SQL["task_list"].replace("{filters}", where)
    raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
    plan = nodes(msgspec.json.decode(raw)[0]["Plan"])
    assert not any(n["Node Type"].endswith("Seq Scan") for n in plan), plan[0]
    # a page reads about a page of rows, not the 30,000 finished tasks around it
    assert sum(n.get("Rows Removed by Filter", 0) for n in plan) <= 100, plan[0]


async def test_every_index_of_tasks_but_its_key_is_partial(conn: asyncpg.Connection) -> None:
    """What the drain's speed depends on: a claim and a completion each write a new version of
    the task's row, which every full index of `tasks` takes an entry for. Only the primary
    key may be one; every other index holds only the rows it serves (migration 0014)."""
    rows = await conn.fetch("""
        SELECT c.relname, i.indpred IS NOT NULL AS partial
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = 'tasks'::regclass""")
    full = sorted(r["relname"] for r in rows if not r["partial"])
    assert full == ["tasks_pkey"], full


@pytest.mark.parametrize(
    "query, args",
    [
        ("task_get_by_idempotency_key", ["k-rare"]),
        ("dead_by_action", []),
        ("task_requeue_action_if_dead", ["rare", 0, 1000, "operator"]),
    ],
)
async def test_dashboard_queries_read_an_index(
    conn: asyncpg.Connection, query: str, args: list[Any]
) -> None:
    """The dashboard's search, dead letter counts and requeue-all beside 30,000 finished tasks."""
    await conn.execute("""
        INSERT INTO tasks (action, payload, state, attempt, result, idempotency_key)
        SELECT 'rare', '{}', 'COMPLETED', 1, 'null', 'k-' || g FROM generate_series(1, 30000) g;
        INSERT INTO tasks (action, payload, state, idempotency_key)
        VALUES ('rare', '{}', 'DEAD', 'k-rare');
        ANALYZE tasks;""")
    tr = conn.transaction()
    await tr.start()
    try:
        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + SQL[query], *args)
    finally:
        await tr.rollback()
    plan = nodes(msgspec.json.decode(raw)[0]["Plan"])
    seq = [n for n in plan if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
    assert seq == [], plan[0]
    assert sum(n.get("Rows Removed by Filter", 0) for n in plan) <= 100, plan[0]


@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
async def test_a_submission_reads_no_other_task(
    conn: asyncpg.Connection, plan_mode: str, keyed: bool
) -> None:
    """One task submitted beside 30,000 others in a table never analyzed (autovacuum has not
    come by yet): without an idempotency key the statement reads no table at all; with one,
    it finds the key through its index, never by a scan of `tasks` (PostgreSQL 15 chose a
    sequential scan for the generic plan of such a table)."""
    await conn.execute("""
        INSERT INTO tasks (action, payload, idempotency_key)
        SELECT 'noop', '{}', 'key ' || g FROM generate_series(1, 30000) g""")
    await conn.execute(f"SET plan_cache_mode = {plan_mode}")
    sql = SQL["task_submit_many" if keyed else "task_submit_unkeyed"]
    key = "a new key" if keyed else None
    args = (["noop"], ["default"], [0], ["{}"], [5], [None], [key], [None], [None], False)
    tr = conn.transaction()
    await tr.start()
    try:
        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
    finally:
        await tr.rollback()
    plan = nodes(msgspec.json.decode(raw)[0]["Plan"])
    reads = {
        (n["Node Type"], n.get("Index Name"))
        for n in plan
        if n.get("Relation Name") in ("tasks", "task_transitions")
        and n["Node Type"] != "ModifyTable"
    }
    if keyed:
        assert reads and all(index == "tasks_idempotency_key" for _, index in reads), reads
    else:
        assert reads == set(), reads
