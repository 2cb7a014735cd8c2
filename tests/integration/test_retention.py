"""Retention deletes old finished tasks with their history, and nothing else."""

from __future__ import annotations

import asyncpg

from tasklease.engine.queries import SQL
from tasklease.engine.retention import Retention, RetentionConfig
from tasklease.engine.states import TaskState
from tasklease.engine.store import Store
from tests.support.db import connect_db, force_state, submit

HOUR = 3600.0


async def arrange(
    store: Store, conn: asyncpg.Connection, state: TaskState, age_hours: float
) -> int:
    """A task in `state` since `age_hours` ago, with a two-row history."""
    task_id = await submit(store)
    await force_state(conn, task_id, state)
    await conn.execute(
        "INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt) "
        "VALUES ($1, 'claim', 'PENDING', 'RUNNING', 1)",
        task_id,
    )
    await conn.execute(
        "UPDATE tasks SET created_at = now() - make_interval(secs => $2 + 60), "
        "updated_at = now() - make_interval(secs => $2) WHERE id = $1",
        task_id,
        age_hours * HOUR,
    )
    return task_id


async def remaining(conn: asyncpg.Connection) -> tuple[set[int], set[int]]:
    tasks = {r["id"] for r in await conn.fetch("SELECT id FROM tasks")}
    history = {r["task_id"] for r in await conn.fetch("SELECT task_id FROM task_transitions")}
    return tasks, history


async def test_old_finished_tasks_go_with_their_history_and_nothing_else(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    S = TaskState
    old = [
        await arrange(store, conn, S.COMPLETED, 3),
        await arrange(store, conn, S.CANCELLED, 3),
        await arrange(store, conn, S.DEAD, 30),
    ]
    kept = [
        await arrange(store, conn, S.COMPLETED, 1),  # finished, not old enough
        await arrange(store, conn, S.DEAD, 3),  # DEAD is kept longer
        await arrange(store, conn, S.PENDING, 30),  # not finished, however old
        await arrange(store, conn, S.FAILED, 30),
        await arrange(store, conn, S.RUNNING, 30),
    ]
    # more old completed tasks than one window, so the walk takes several
    old += [await arrange(store, conn, S.COMPLETED, 3) for _ in range(7)]
    config = RetentionConfig(finished_seconds=2 * HOUR, dead_seconds=24 * HOUR, batch=3, pause=0)

    pruned = await Retention(db, config).round()

    assert pruned is not None and pruned.tasks == len(old)
    assert pruned.transitions == 2 * len(old)  # submit + claim each
    assert pruned.windows >= 4
    tasks, history = await remaining(conn)
    assert tasks == set(kept) and history == set(kept)


async def test_forever_keeps_them(store: Store, conn: asyncpg.Connection, db: str) -> None:
    done = await arrange(store, conn, TaskState.COMPLETED, 24 * 365)
    dead = await arrange(store, conn, TaskState.DEAD, 24 * 365)
    config = RetentionConfig(finished_seconds=None, dead_seconds=HOUR, pause=0)
    pruned = await Retention(db, config).round()
    assert pruned is not None and pruned.tasks == 1
    assert (await remaining(conn))[0] == {done}
    assert dead not in (await remaining(conn))[0]


async def test_one_round_at_a_time(store: Store, conn: asyncpg.Connection, db: str) -> None:
    """Another session holds the retention lock: this round does nothing."""
    await arrange(store, conn, TaskState.COMPLETED, 48)
    holder = await connect_db(db)
    try:
        async with holder.transaction():
            assert await holder.fetchval(SQL["retention_try_lock"])
            assert await Retention(db, RetentionConfig(pause=0)).round() is None
            assert len((await remaining(conn))[0]) == 1
    finally:
        await holder.close()
    pruned = await Retention(db, RetentionConfig(finished_seconds=HOUR, pause=0)).round()
    assert pruned is not None and pruned.tasks == 1


async def test_a_requeued_task_is_not_deleted(store: Store, conn: asyncpg.Connection) -> None:
    """State and age decide, not the id window: an old DEAD task that was requeued is
    PENDING and recent again, and stays."""
    task_id = await arrange(store, conn, TaskState.DEAD, 48)
    assert await store.requeue(task_id, "by test")
    row = await conn.fetchrow(SQL["task_prune_finished"], 0, 100, HOUR, HOUR)
    assert row["tasks"] == 0
    assert (await remaining(conn))[0] == {task_id}


async def test_a_deleted_dependants_edges_go_with_it(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """docs/workflows.md: the edges of a deleted dependant go; those of a kept dependant stay,
    even when what it waited for is deleted."""
    S = TaskState
    dependency = await arrange(store, conn, S.COMPLETED, 3)
    gone = await arrange(store, conn, S.COMPLETED, 3)
    kept = await arrange(store, conn, S.PENDING, 3)
    await conn.execute(
        "INSERT INTO task_dependencies (depends_on, task_id, satisfied) "
        "VALUES ($1, $2, true), ($1, $3, true)",
        dependency,
        gone,
        kept,
    )
    config = RetentionConfig(finished_seconds=2 * HOUR, pause=0)
    pruned = await Retention(db, config).round()
    assert pruned is not None and pruned.tasks == 2
    edges = await conn.fetch("SELECT depends_on, task_id FROM task_dependencies")
    assert [tuple(e) for e in edges] == [(dependency, kept)]
