"""Submission: one row, one history row, idempotency keys honoured even under races."""

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from engine.store import Store
from tests.support.db import triggers


async def test_submit_writes_task_and_history(store: Store, conn: asyncpg.Connection) -> None:
    due = datetime(2026, 1, 20, 12, tzinfo=UTC)
    s = await store.submit(
        "email_user", '{"user_id": 42}', due_at=due, priority=3, queue="mail", max_attempts=2
    )
    assert s.created
    t = s.task
    assert (
        t["state"],
        t["attempt"],
        t["max_attempts"],
        t["due_at"],
        t["priority"],
        t["queue"],
    ) == ("PENDING", 0, 2, due, 3, "mail")
    assert await triggers(conn, t["id"]) == ["submit"]


async def test_due_defaults_to_database_now(store: Store, conn: asyncpg.Connection) -> None:
    t = (await store.submit("noop", "{}")).task
    now = await conn.fetchval("SELECT now()")
    assert abs(now - t["due_at"]) < timedelta(seconds=5)


async def test_idempotency_key_returns_the_existing_task(
    store: Store, conn: asyncpg.Connection
) -> None:
    first = await store.submit("noop", '{"n": 1}', idempotency_key="order-7")
    again = await store.submit("noop", '{"n": 2}', idempotency_key="order-7")
    assert first.created and not again.created
    assert again.task["id"] == first.task["id"] and again.task["payload"] == '{"n": 1}'
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 1
    assert await triggers(conn, first.task["id"]) == ["submit"]


async def test_racing_submissions_with_one_key_make_one_task(
    store: Store, conn: asyncpg.Connection
) -> None:
    results = await asyncio.gather(
        *(store.submit("noop", "{}", idempotency_key="race") for _ in range(8))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.task["id"] for r in results}) == 1
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 1
