"""Transactional completion: a handler's writes and its task's completion commit together,
guarded by the lease token (engine/fencing.py), with real workers in this process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tasklease import LeaseLost, TaskState
from tasklease.engine.fencing import Fence
from tasklease.engine.store import Store
from tests.integration.test_worker import done
from tests.support.db import connect_db, expire_lease, state_of, submit, triggers, wait_until
from tests.support.workers import Running


@pytest.fixture
async def fence(store: Store) -> AsyncIterator[Fence]:
    """Handler transactions as a worker makes them, on the test's database."""
    f = Fence(store)
    yield f
    await f.close()


S = TaskState


async def effects(conn: asyncpg.Connection, task_id: int) -> list[int]:
    rows = await conn.fetch("SELECT attempt FROM effects WHERE task_id = $1 ORDER BY 1", task_id)
    return [r["attempt"] for r in rows]


@pytest.mark.parametrize("action", ["test_tx_write", "test_tx_session"])
async def test_writes_and_completion_commit_together(
    store: Store,
    conn: asyncpg.Connection,
    workers: Running,
    action: str,
) -> None:
    task_id = await submit(store, action, "{}")
    workers.start(store)
    await wait_until(done(conn, task_id, S.COMPLETED), "completed")
    row = await state_of(conn, task_id)
    assert row["attempt"] == 1
    assert await effects(conn, task_id) == [1]
    assert await triggers(conn, task_id) == ["submit", "claim", "complete"]
    result = await conn.fetchval("SELECT result::text FROM tasks WHERE id = $1", task_id)
    assert '"attempt": 1' in result


@pytest.mark.parametrize("action", ["test_tx_write", "test_tx_session"])
async def test_a_failed_attempt_leaves_no_writes(
    store: Store,
    conn: asyncpg.Connection,
    workers: Running,
    action: str,
) -> None:
    task_id = await submit(store, action, '{"fail_inside": true}')
    workers.start(store)
    await wait_until(done(conn, task_id, S.COMPLETED), "completed on the second attempt")
    assert await effects(conn, task_id) == [2], "the failed attempt's write was kept"
    assert await triggers(conn, task_id) == ["submit", "claim", "fail", "claim", "complete"]


async def claimed(store: Store, worker: str) -> tuple[int, uuid.UUID]:
    [task] = (await store.claim("default", {"test_tx_write": 30.0}, 1, worker)).leased
    return task.id, task.lease_token


async def test_a_lost_lease_rolls_the_whole_transaction_back(
    store: Store, conn: asyncpg.Connection, fence: Fence
) -> None:
    await submit(store, "test_tx_write", "{}")
    task_id, stale = await claimed(store, "w1")
    with pytest.raises(LeaseLost, match="another worker took the task over"):
        async with fence.transaction(task_id, stale, lambda: '"w1"') as tx:
            await tx.execute("INSERT INTO effects VALUES ($1, 1, 'w1')", task_id)
            # meanwhile the lease runs out and another worker takes the task over
            await expire_lease(conn, task_id)
            _, current = await claimed(store, "w2")
            # a savepoint left open, or closed, cannot keep the guard from failing
            await tx.execute("SAVEPOINT handler_own")
    assert await effects(conn, task_id) == []
    row = await state_of(conn, task_id)
    assert (row["state"], row["attempt"]) == ("RUNNING", 2)
    # the current holder completes it, with its writes
    async with fence.transaction(task_id, current, lambda: '"w2"') as tx:
        await tx.execute("INSERT INTO effects VALUES ($1, 2, 'w2')", task_id)
    assert await effects(conn, task_id) == [2]
    assert (await state_of(conn, task_id))["state"] == "COMPLETED"
    assert await triggers(conn, task_id) == ["submit", "claim", "reclaim", "complete"]


async def test_an_exception_inside_rolls_back_and_completes_nothing(
    store: Store, conn: asyncpg.Connection, fence: Fence
) -> None:
    await submit(store, "test_tx_write", "{}")
    task_id, token = await claimed(store, "w1")
    with pytest.raises(ZeroDivisionError):
        async with fence.transaction(task_id, token, lambda: "1") as tx:
            await tx.execute("INSERT INTO effects VALUES ($1, 1, 'w1')", task_id)
            _ = 1 / 0
    with pytest.raises(asyncpg.InFailedSQLTransactionError):
        async with fence.transaction(task_id, token, lambda: "1") as tx:
            await tx.execute("INSERT INTO effects VALUES ($1, 1, 'w1')", task_id)
            # an error the handler swallows leaves the transaction aborted: the guard
            # cannot run in it, so nothing commits
            with pytest.raises(asyncpg.UndefinedTableError):
                await tx.execute("SELECT * FROM no_such_table")
    assert await effects(conn, task_id) == []
    assert (await state_of(conn, task_id))["state"] == "RUNNING"


async def test_a_handler_that_commits_by_itself_completes_nothing(
    store: Store, conn: asyncpg.Connection, fence: Fence
) -> None:
    await submit(store, "test_tx_write", "{}")
    task_id, token = await claimed(store, "w1")
    with pytest.raises(RuntimeError, match="ended its transaction itself"):
        async with fence.transaction(task_id, token, lambda: "1") as tx:
            await tx.execute("COMMIT")
    assert (await state_of(conn, task_id))["state"] == "RUNNING"


async def test_a_dropped_connection_is_not_a_completion(
    store: Store, conn: asyncpg.Connection, fence: Fence
) -> None:
    """The handler's connection dies inside the block: the handler gets the error, nothing is
    written, and the task stays RUNNING under its lease (the worker records the failure)."""
    await submit(store, "test_tx_write", "{}")
    task_id, token = await claimed(store, "w1")
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        async with fence.transaction(task_id, token, lambda: "1") as tx:
            await tx.execute("INSERT INTO effects VALUES ($1, 1, 'w1')", task_id)
            # the server's pid as the server says (through PgBouncer, get_server_pid() is not)
            pid = await tx.fetchval("SELECT pg_backend_pid()")
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.2)
    assert await effects(conn, task_id) == []
    assert (await state_of(conn, task_id))["state"] == "RUNNING"


async def test_a_lost_commit_reply_is_settled_by_the_lease_outcome(
    store: Store, conn: asyncpg.Connection, db: str, fence: Fence
) -> None:
    """COMMIT sent, its reply lost: COMPLETED under this token means it committed (the
    handler goes on); still RUNNING means it did not (the handler gets the error)."""
    for _ in range(2):
        await submit(store, "test_tx_write", "{}")
    own = await connect_db(db)
    try:
        task_id, token = await claimed(store, "w1")
        tx = own.transaction()
        await tx.start()
        await fence._complete(own, task_id, token, "1")

        async def committed_then_lost() -> None:
            await tx.commit()
            raise ConnectionResetError("the reply was lost")

        await fence._commit(committed_then_lost, task_id, token)  # settled: no error
        assert (await state_of(conn, task_id))["state"] == "COMPLETED"

        other_id, other_token = await claimed(store, "w1")

        async def lost_before_commit() -> None:
            raise ConnectionResetError("the connection dropped")

        with pytest.raises(ConnectionResetError):
            await fence._commit(lost_before_commit, other_id, other_token)
        assert (await state_of(conn, other_id))["state"] == "RUNNING"
    finally:
        await own.close()
