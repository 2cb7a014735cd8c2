"""Submission: rows and history rows in one statement, idempotency keys honoured under races."""

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tasklease.engine.store import NewTask, Store
from tests.support.db import triggers


async def test_submit_writes_task_and_history(store: Store, conn: asyncpg.Connection) -> None:
    due = datetime(2026, 1, 20, 12, tzinfo=UTC)
    [s] = await store.submit_many(
        [
            NewTask(
                "email_user",
                '{"user_id": 42}',
                due_at=due,
                priority=3,
                queue="mail",
                max_attempts=2,
            )
        ]
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
    [s] = await store.submit_many([NewTask("noop", "{}")])
    now = await conn.fetchval("SELECT now()")
    assert abs(now - s.task["due_at"]) < timedelta(seconds=5)


async def test_idempotency_key_returns_the_existing_task(
    store: Store, conn: asyncpg.Connection
) -> None:
    [first] = await store.submit_many([NewTask("noop", '{"n": 1}', idempotency_key="order-7")])
    [again] = await store.submit_many([NewTask("noop", '{"n": 2}', idempotency_key="order-7")])
    assert first.created and not again.created
    assert again.task["id"] == first.task["id"] and again.task["payload"] == '{"n": 1}'
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 1
    assert await triggers(conn, first.task["id"]) == ["submit"]


async def test_racing_submissions_with_one_key_make_one_task(
    store: Store, conn: asyncpg.Connection
) -> None:
    results = await asyncio.gather(
        *(store.submit_many([NewTask("noop", "{}", idempotency_key="race")]) for _ in range(8))
    )
    assert sum(r[0].created for r in results) == 1
    assert len({r[0].task["id"] for r in results}) == 1
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 1


async def test_batch_keeps_input_order_and_resolves_keys(
    store: Store, conn: asyncpg.Connection
) -> None:
    [old] = await store.submit_many([NewTask("noop", '{"old": true}', idempotency_key="k1")])
    batch = [
        NewTask("noop", '{"i": 0}'),
        NewTask("noop", '{"i": 1}', idempotency_key="k1"),  # taken before
        NewTask("noop", '{"i": 2}', idempotency_key="k2"),
        NewTask("noop", '{"i": 3}'),
        NewTask("noop", '{"i": 4}', idempotency_key="k2"),  # repeated within the batch
        NewTask("noop", '{"i": 5}'),
    ]
    out = await store.submit_many(batch)
    assert [s.created for s in out] == [True, False, True, True, False, True]
    assert out[1].task["id"] == old.task["id"] and out[4].task["id"] == out[2].task["id"]
    assert [s.task["payload"] for s in out] == [
        '{"i": 0}',
        '{"old": true}',
        '{"i": 2}',
        '{"i": 3}',
        '{"i": 2}',
        '{"i": 5}',
    ]
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 5
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 5


async def test_batch_is_all_or_nothing(store: Store, conn: asyncpg.Connection) -> None:
    batch = [NewTask("noop", "{}"), NewTask("noop", "{}", max_attempts=0)]  # violates a check
    with pytest.raises(asyncpg.CheckViolationError):
        await store.submit_many(batch)
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 0
