"""The guards beyond the source state: lease tokens, attempts, due times, lease expiry."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tasklease.engine import operations
from tasklease.engine.states import TaskState
from tasklease.engine.store import Store
from tests.support.db import (
    LEASES,
    assert_histories_are_paths,
    connect_listener,
    expire_lease,
    force_state,
    state_of,
    submit,
    triggers,
)

S = TaskState


async def claim_one(store: Store, worker: str = "w1") -> tuple[int, uuid.UUID]:
    leased = (await store.claim("default", LEASES, 1, worker)).leased
    assert len(leased) == 1
    return leased[0].id, leased[0].lease_token


@pytest.mark.parametrize(
    "fire",
    [
        lambda s, i, t: s.complete(i, t, "null"),
        lambda s, i, t: s.fail(i, t, 10, "x"),
        lambda s, i, t: s.bury(i, t, "x", True),
        lambda s, i, t: s.release(i, t),
        lambda s, i, t: s.heartbeat(i, t, 60),
    ],
    ids=["complete", "fail", "bury", "release", "heartbeat"],
)
async def test_stale_token_changes_nothing(store: Store, conn: asyncpg.Connection, fire) -> None:  # type: ignore[no-untyped-def]
    task_id = await submit(store)
    await claim_one(store)
    before = await state_of(conn, task_id)
    assert not await fire(store, task_id, uuid.uuid4())
    assert dict(await state_of(conn, task_id)) == dict(before)
    assert await triggers(conn, task_id) == ["submit", "claim"]


async def test_cancel_running_needs_the_token_and_a_request(
    store: Store, conn: asyncpg.Connection
) -> None:
    task_id = await submit(store)
    _, token = await claim_one(store)
    assert not await store.cancel_running(task_id, token)  # not requested
    assert await store.request_cancel(task_id)
    assert not await store.cancel_running(task_id, uuid.uuid4())  # stale token
    row = await store.heartbeat(task_id, token, 60)
    assert row is not None and row["cancel_requested"]
    assert await store.cancel_running(task_id, token)
    assert (await state_of(conn, task_id))["state"] == S.CANCELLED
    assert not await store.request_cancel(task_id)  # no longer running


async def test_fail_refused_on_last_attempt_and_bury_needs_exhaustion_or_permanent(
    store: Store, conn: asyncpg.Connection
) -> None:
    task_id = await submit(store, max_attempts=2)
    token = await force_state(conn, task_id, S.RUNNING, attempt=2)
    assert not await store.fail(task_id, token, 10, "x")
    other = await submit(store, max_attempts=2)
    other_token = await force_state(conn, other, S.RUNNING, attempt=1)
    assert not await store.bury(other, other_token, "x", permanent=False)
    assert await store.bury(other, other_token, "x", permanent=True)
    assert await store.bury(task_id, token, "x", permanent=False)
    assert [(await state_of(conn, i))["state"] for i in (task_id, other)] == [S.DEAD, S.DEAD]


async def test_claim_takes_only_due_tasks(store: Store, conn: asyncpg.Connection) -> None:
    later = await submit(store)
    await force_state(conn, later, S.PENDING, due_in=60)
    leased = (await store.claim("default", LEASES, 10, "w1")).leased
    assert leased == []
    await force_state(conn, later, S.PENDING, due_in=-1)
    leased = (await store.claim("default", LEASES, 10, "w1")).leased
    assert [t.id for t in leased] == [later]


async def test_claim_filters_by_queue_and_action(store: Store) -> None:
    mail = await submit(store, queue="mail")
    await submit(store, action="unknown_action")
    leased = (await store.claim("default", LEASES, 10, "w1")).leased
    assert leased == []
    leased = (await store.claim("mail", LEASES, 10, "w1")).leased
    assert [t.id for t in leased] == [mail]


async def test_claim_orders_by_priority_then_due_time(
    store: Store, conn: asyncpg.Connection
) -> None:
    old_low = await submit(store, priority=0)
    await force_state(conn, old_low, S.PENDING, due_in=-100)
    new_low = await submit(store, priority=0)
    high = await submit(store, priority=5)
    order = [(await store.claim("default", LEASES, 1, "w1")).leased[0].id for _ in range(3)]
    assert order == [high, old_low, new_low]


async def test_claim_sets_lease_from_the_action(store: Store) -> None:
    await submit(store, action="test_sleep")
    leased = (await store.claim("default", {"test_sleep": 7.0}, 1, "w1")).leased
    task = leased[0]
    rows = await store.pool.fetchval(
        "SELECT extract(epoch FROM lease_expires_at - now()) FROM tasks WHERE id = $1", task.id
    )
    assert 5 < rows <= 7


async def test_a_live_lease_is_not_taken_over(store: Store) -> None:
    await submit(store)
    await claim_one(store, "w1")
    c = await store.claim("default", LEASES, 10, "w2")
    leased, expired = c.leased, c.expired
    assert leased == [] and expired == []


async def test_expired_lease_is_reclaimed_and_the_old_worker_is_fenced(
    store: Store, conn: asyncpg.Connection
) -> None:
    task_id = await submit(store)
    _, old_token = await claim_one(store, "w1")
    await expire_lease(conn, task_id)
    leased = (await store.claim("default", LEASES, 10, "w2")).leased
    assert [(t.id, t.trigger, t.attempt) for t in leased] == [(task_id, "reclaim", 2)]
    new_token = leased[0].lease_token
    assert new_token != old_token
    # the first worker wakes up and tries to finish: refused, and the task is untouched
    assert not await store.complete(task_id, old_token, '"stale"')
    assert await store.heartbeat(task_id, old_token, 60) is None
    assert await store.complete(task_id, new_token, '"fresh"')
    row = await state_of(conn, task_id)
    assert (row["state"], row["result"], row["worker"]) == (S.COMPLETED, '"fresh"', "w2")
    assert await triggers(conn, task_id) == ["submit", "claim", "reclaim", "complete"]
    detail = await conn.fetchval(
        "SELECT detail FROM task_transitions WHERE task_id = $1 AND trigger = 'reclaim'", task_id
    )
    assert detail == "lease of w1 expired"
    await assert_histories_are_paths(conn)


async def test_expired_lease_on_last_attempt_goes_dead(
    store: Store, conn: asyncpg.Connection
) -> None:
    task_id = await submit(store, max_attempts=1)
    await claim_one(store, "w1")
    await expire_lease(conn, task_id)
    c = await store.claim("default", LEASES, 10, "w2")
    leased, expired = c.leased, c.expired
    assert leased == [] and expired == [task_id]
    row = await state_of(conn, task_id)
    assert row["state"] == S.DEAD and "expired on the last attempt" in row["last_error"]
    assert await triggers(conn, task_id) == ["submit", "claim", "expire"]


async def test_heartbeat_extends_the_lease(store: Store, conn: asyncpg.Connection) -> None:
    task_id = await submit(store)
    _, token = await claim_one(store)
    await expire_lease(conn, task_id)
    row = await store.heartbeat(task_id, token, 60)
    assert row is not None
    leased = (await store.claim("default", LEASES, 10, "w2")).leased
    assert leased == []


async def test_concurrent_claims_never_share_a_task(store: Store) -> None:
    ids = {await submit(store) for _ in range(60)}
    results = await asyncio.gather(*(store.claim("default", LEASES, 7, f"w{i}") for i in range(10)))
    claimed = [t.id for c in results for t in c.leased]
    assert len(claimed) == len(set(claimed)) and set(claimed) <= ids
    leased = (await store.claim("default", LEASES, 100, "last")).leased
    assert set(claimed) | {t.id for t in leased} == ids


async def test_release_gives_the_attempt_back(store: Store, conn: asyncpg.Connection) -> None:
    task_id = await submit(store)
    _, token = await claim_one(store)
    assert await store.release(task_id, token)
    row = await state_of(conn, task_id)
    assert (row["state"], row["attempt"]) == (S.PENDING, 0)
    leased = (await store.claim("default", LEASES, 10, "w2")).leased
    assert [(t.id, t.attempt) for t in leased] == [(task_id, 1)]


async def test_requeue_resets_attempts(store: Store, conn: asyncpg.Connection) -> None:
    task_id = await submit(store, max_attempts=1)
    _, token = await claim_one(store)
    assert await store.bury(task_id, token, "x", permanent=False)
    assert await store.requeue(task_id, "operator")
    row = await state_of(conn, task_id)
    assert (row["state"], row["attempt"]) == (S.PENDING, 0)
    leased = (await store.claim("default", LEASES, 10, "w2")).leased
    assert [t.attempt for t in leased] == [1]
    await assert_histories_are_paths(conn)


async def test_requeue_action_moves_only_dead_tasks_of_that_action(
    store: Store, conn: asyncpg.Connection
) -> None:
    dead = [await submit(store, "noop") for _ in range(5)]
    other_action = await submit(store, "email_user")
    not_dead = await submit(store, "noop")
    for task_id in [*dead, other_action]:
        await force_state(conn, task_id, S.DEAD)
    heard: list[str] = []
    listener = await connect_listener(store.dsn)
    await listener.add_listener("tasklease", lambda *args: heard.append(args[3]))

    assert await operations.requeue_action(store, "noop", batch=2) == 5
    rows = await conn.fetch("SELECT id, state, attempt FROM tasks ORDER BY id")
    states = {r["id"]: (r["state"], r["attempt"]) for r in rows}
    assert all(states[i] == (S.PENDING, 0) for i in dead)
    assert states[other_action][0] == S.DEAD and states[not_dead][0] == S.PENDING
    assert [await triggers(conn, i) for i in dead] == [["submit", "requeue"]] * 5
    assert await triggers(conn, not_dead) == ["submit"]
    assert await store.requeue_action("noop", 0, 10) == []
    await asyncio.sleep(0.1)
    await listener.close()
    assert "default" in heard


async def test_claim_skips_locked_rows_instead_of_waiting(
    store: Store, conn: asyncpg.Connection
) -> None:
    """Workers never wait on each other: a row locked by another transaction is skipped."""
    first = await submit(store)
    second = await submit(store)
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", first)
        leased = (await asyncio.wait_for(store.claim("default", LEASES, 2, "w1"), 5)).leased
        assert [t.id for t in leased] == [second]
