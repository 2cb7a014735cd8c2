"""Claiming and listing read indexes only, whatever piles up beside what they return."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import pytest

from engine.queries import SQL
from engine.store import FIRST_PAGE, LIST_FILTERS
from tests.support.db import LEASES

ALLOWED_INDEXES = {"tasks_claimable", "tasks_lease_expiry", "tasks_pkey"}


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in nodes(child))]


@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
async def test_claim_never_scans_finished_or_future_tasks(
    conn: asyncpg.Connection, plan_mode: str
) -> None:
    await conn.execute("""
        INSERT INTO tasks (action, payload, state, attempt, result)
        SELECT 'noop', '{}', 'COMPLETED', 1, 'null' FROM generate_series(1, 30000);
        INSERT INTO tasks (action, payload, due_at)
        SELECT 'noop', '{}', now() + interval '1 day' FROM generate_series(1, 5000);
        INSERT INTO tasks (action, payload) SELECT 'noop', '{}' FROM generate_series(1, 50);
        ANALYZE tasks;""")
    await conn.execute(f"SET plan_cache_mode = {plan_mode}")
    args = (["default"], list(LEASES), 10, "w", list(LEASES.values()))
    tr = conn.transaction()
    await tr.start()
    try:
        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + SQL["task_claim_due"], *args)
    finally:
        await tr.rollback()
    plan = nodes(msgspec.json.decode(raw)[0]["Plan"])
    seq = [n for n in plan if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
    assert seq == [], "the claim reads the whole tasks table"
    indexes = {n["Index Name"] for n in plan if "Index Name" in n}
    assert indexes <= ALLOWED_INDEXES and "tasks_claimable" in indexes, indexes
    # rows read through the claimable index: the 50 due tasks, not the 35,000 others
    read = [n["Actual Rows"] for n in plan if n.get("Index Name") == "tasks_claimable"]
    assert read and max(read) <= 50, read
    # and it claims what is due, not the future or the finished
    rows = await conn.fetch(SQL["task_claim_due"], *args)
    assert [r["trigger"] for r in rows] == ["claim"] * 10 + ["wait"]
    assert 86000 < rows[-1]["wait_seconds"] <= 86400  # the tasks due in a day


@pytest.mark.parametrize(
    "filters",
    [{}, {"state": "DEAD"}, {"action": "rare"}, {"queue": "rare"}, {"state": "DEAD", "queue": "x"}],
)
async def test_listing_pages_read_an_index_whatever_the_filter(
    conn: asyncpg.Connection, filters: dict[str, str]
) -> None:
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
