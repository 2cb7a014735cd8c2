"""Helpers that read or arrange database state directly, for tests only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from tasklease.engine import database
from tasklease.engine.queries import CLAIM
from tasklease.engine.states import TaskState, is_path
from tasklease.engine.store import NewTask, Store


def pooler_safe() -> dict[str, Any]:
    """asyncpg options for the tests' own connections: behind PgBouncer in transaction mode
    (TASKLEASE_PGBOUNCER, the CI's pooler pass), unnamed statements, as tasklease's own."""
    return {"statement_cache_size": 0} if database.pooled() else {}


async def connect_db(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect for the tests' own connections (see pooler_safe)."""
    return await asyncpg.connect(dsn, **pooler_safe(), **kwargs)


async def connect_listener(dsn: str) -> asyncpg.Connection:
    """A connection to LISTEN on: `dsn`, or behind a pooler the direct DSN tasklease
    listens on (TASKLEASE_PGBOUNCER)."""
    return await connect_db(database.listen_dsn(dsn) or dsn)


LEASES = {"test_sleep": 2.0, "noop": 30.0, "email_user": 30.0, "test_fail": 30.0}


async def submit(store: Store, action: str = "noop", payload: str = "{}", **kw: Any) -> int:
    task_id: int = (await store.submit_many([NewTask(action, payload, **kw)]))[0].task["id"]
    return task_id


async def force_state(
    conn: asyncpg.Connection,
    task_id: int,
    state: TaskState,
    *,
    token: uuid.UUID | None = None,
    attempt: int = 1,
    lease_in: float = 60,
    due_in: float = 0,
) -> uuid.UUID:
    """Put a task straight into `state` (test set-up, not a transition). Returns its token."""
    token = token or uuid.uuid4()
    running = state is TaskState.RUNNING
    await conn.execute(
        """UPDATE tasks SET state = $2, lease_token = $3, attempt = $4,
               lease_expires_at = CASE WHEN $5 THEN now() + make_interval(secs => $6) END,
               due_at = now() + make_interval(secs => $7)
           WHERE id = $1""",
        task_id,
        state.value,
        token,
        attempt,
        running,
        lease_in,
        due_in,
    )
    return token


async def expire_lease(conn: asyncpg.Connection, task_id: int) -> None:
    """Move the lease into the past instead of waiting for it."""
    await conn.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task_id
    )


async def state_of(conn: asyncpg.Connection, task_id: int) -> asyncpg.Record:
    return await conn.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)


async def triggers(conn: asyncpg.Connection, task_id: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT trigger FROM task_transitions WHERE task_id = $1 ORDER BY id", task_id
    )
    return [r["trigger"] for r in rows]


async def assert_histories_are_paths(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT task_id, trigger, from_state, to_state FROM task_transitions ORDER BY task_id, id"
    )
    by_task: dict[int, list[tuple[str, TaskState | None, TaskState]]] = {}
    for r in rows:
        by_task.setdefault(r["task_id"], []).append(
            (
                r["trigger"],
                TaskState(r["from_state"]) if r["from_state"] else None,
                TaskState(r["to_state"]),
            )
        )
    for task_id, steps in by_task.items():
        assert is_path(steps), f"task {task_id}: history {steps} is not a path of the machine"
    last = {tid: steps[-1][2] for tid, steps in by_task.items()}
    for r in await conn.fetch("SELECT id, state FROM tasks"):
        assert last[r["id"]] == TaskState(r["state"]), f"task {r['id']}: state != last history"


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30, every: float = 0.05
) -> None:
    """Poll `check` until true; a bound on waiting, not a timing assertion."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


async def count_in(conn: asyncpg.Connection, state: TaskState) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM tasks WHERE state = $1", state.value)
    return n


async def assert_completed_once(conn: asyncpg.Connection) -> None:
    doubles = await conn.fetch(
        "SELECT task_id, count(*) FROM task_transitions WHERE trigger = 'complete' "
        "GROUP BY task_id HAVING count(*) > 1"
    )
    assert doubles == [], f"tasks completed more than once: {doubles}"


async def take_over(conn: asyncpg.Connection, task_id: int, worker: str) -> asyncpg.Record:
    """Expire a task's lease and reclaim it as `worker`, in one transaction, so that no
    running worker can reclaim it in between. Returns the new lease (id, lease_token)."""
    async with conn.transaction():
        await expire_lease(conn, task_id)
        rows = await conn.fetch(
            CLAIM, "default", list(LEASES), 1, worker, list(LEASES.values()), None
        )
    rows = [r for r in rows if r["trigger"] != "wait"]
    assert [(r["id"], r["trigger"]) for r in rows] == [(task_id, "reclaim")], rows
    return rows[0]
