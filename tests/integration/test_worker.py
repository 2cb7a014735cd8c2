"""The worker in this process against the real database: outcomes, leases, stops, faults."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Callable

import asyncpg
import pytest

from tasklease.engine.executor import _Execution
from tasklease.engine.states import TaskState
from tasklease.engine.store import Store
from tasklease.engine.worker import Worker
from tests.support import handlers
from tests.support.db import (
    LEASES,
    assert_completed_once,
    assert_histories_are_paths,
    state_of,
    submit,
    take_over,
    triggers,
    wait_until,
)
from tests.support.workers import HANDLERS, Running

S = TaskState


def done(conn: asyncpg.Connection, task_id: int, state: TaskState) -> Callable[[], object]:
    async def check() -> bool:
        return bool((await state_of(conn, task_id))["state"] == state)

    return check


async def executions(conn: asyncpg.Connection, task_id: int) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM executions WHERE task_id = $1 ORDER BY id", task_id)


async def test_runs_tasks_to_completion(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    ids = [await submit(store, "test_sleep", '{"seconds": 0.01}') for _ in range(20)]
    ids.append(await submit(store, "email_user", '{"user_id": 42}', idempotency_key="welcome-42"))
    workers.start(store)
    await wait_until(lambda: _all(conn, ids), "all tasks completed")
    for task_id in ids:
        assert await triggers(conn, task_id) == ["submit", "claim", "complete"]
    mail = await state_of(conn, ids[-1])
    assert json.loads(mail["result"]) == {
        "status": "sent",
        "user_id": 42,
        "template": "welcome",
        "message_id": "<welcome-42@tasklease.invalid>",
    }
    assert await conn.fetchval("SELECT count(*) FROM executions") == 20
    await assert_histories_are_paths(conn)


async def _all(conn: asyncpg.Connection, ids: list[int]) -> bool:
    n = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state = 'COMPLETED'", ids
    )
    return bool(n == len(ids))


async def test_a_finished_execution_is_freed_without_the_garbage_collector(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    """Reference counting alone frees what each execution made, whatever its outcome: no
    reference cycle is left for the collector, whose passes took ~15 % of a drain's time
    when each task left one (docs/benchmarks.md, "Executions freed at once")."""
    ids = [await submit(store) for _ in range(10)]
    ids += [await submit(store, "test_permanent") for _ in range(3)]
    ids += [await submit(store, "test_fail", max_attempts=1) for _ in range(3)]
    ids += [await submit(store, "test_sync", '{"seconds": 0}') for _ in range(3)]
    gc.collect()
    gc.disable()
    try:
        worker = workers.start(store)
        await wait_until(lambda: _all_in(conn, ids, (S.COMPLETED, S.DEAD)), "every task to finish")
        await workers.stop(worker)
        left = [o for o in gc.get_objects() if isinstance(o, _Execution)]
        assert left == [], f"{len(left)} executions wait for the garbage collector"
    finally:
        gc.enable()


async def _all_in(conn: asyncpg.Connection, ids: list[int], states: tuple[TaskState, ...]) -> bool:
    n = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state = ANY($2::task_state[])",
        ids,
        [s.value for s in states],
    )
    return bool(n == len(ids))


async def test_never_runs_more_handlers_than_its_concurrency(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    """A slot is taken when a task is claimed, not when its handler first runs: a claim
    right after another must not see the slots of tasks that have not started yet as free."""
    handlers.OVERLAP.update(now=0, most=0)
    ids = [await submit(store, "test_overlap", '{"seconds": 0.05}') for _ in range(60)]
    workers.start(store, concurrency=5)
    await wait_until(lambda: _all(conn, ids), "60 tasks", 60)
    assert handlers.OVERLAP["most"] == 5


async def test_failing_handler_walks_failed_to_dead(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    task_id = await submit(store, "test_fail", max_attempts=3)
    workers.start(store)
    await wait_until(done(conn, task_id, S.DEAD), "the task to die")  # type: ignore[arg-type]
    assert await triggers(conn, task_id) == [
        "submit",
        "claim",
        "fail",
        "claim",
        "fail",
        "claim",
        "bury",
    ]
    rows = await conn.fetch(
        "SELECT trigger, attempt, detail FROM task_transitions "
        "WHERE task_id = $1 AND trigger IN ('fail', 'bury') ORDER BY id",
        task_id,
    )
    retry_in = [
        float(re.match(r"retry in ([\d.]+)s", r["detail"]).group(1))  # type: ignore[union-attr]
        for r in rows
        if r["trigger"] == "fail"
    ]
    assert retry_in[0] < retry_in[1], "backoff must grow: handler declares [0.1, 0.2]"
    assert [r["attempt"] for r in rows] == [1, 2, 3]
    assert rows[-1]["detail"] == "ValueError: boom on attempt 3 (attempt 3 of 3)"
    task = await state_of(conn, task_id)
    message, _, trace = task["last_error"].partition("\n\n")
    assert (task["attempt"], message) == (3, rows[-1]["detail"])
    assert trace.startswith("Traceback (most recent call last):") and "boom on attempt 3" in trace


async def test_failed_attempt_is_due_after_backoff(store: Store, conn: asyncpg.Connection) -> None:
    """Default backoff: the first retry is due about a minute after the failure."""
    task_id = await submit(store)
    leased = (await store.claim("default", LEASES, 1, "w1")).leased
    assert await store.fail(task_id, leased[0].lease_token, HANDLERS["noop"].retry_delay(1), "boom")
    delay = await conn.fetchval(
        "SELECT extract(epoch FROM due_at - now()) FROM tasks WHERE id = $1", task_id
    )
    assert 50 < delay <= 66


async def test_permanent_error_goes_dead_at_once(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    task_id = await submit(store, "test_permanent", max_attempts=5)
    workers.start(store)
    await wait_until(done(conn, task_id, S.DEAD), "the task to die")  # type: ignore[arg-type]
    assert await triggers(conn, task_id) == ["submit", "claim", "bury"]
    assert (await state_of(conn, task_id))["last_error"] == "PermanentError: user 42 does not exist"


async def test_payload_that_no_longer_fits_is_buried(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    task_id = await submit(store, "test_sleep", '{"seconds": "soon"}')
    workers.start(store)
    await wait_until(done(conn, task_id, S.DEAD), "the task to die")  # type: ignore[arg-type]
    assert "payload does not fit test_sleep" in (await state_of(conn, task_id))["last_error"]


async def test_a_result_postgresql_refuses_buries_only_that_task(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    bad = await submit(store, "test_unstorable")
    good = [await submit(store, "test_sleep", '{"seconds": 0}') for _ in range(5)]
    workers.start(store)
    await wait_until(done(conn, bad, S.DEAD), "the unstorable result to bury its task")  # type: ignore[arg-type]
    assert "result cannot be stored" in (await state_of(conn, bad))["last_error"]
    await wait_until(lambda: _all(conn, good), "the other tasks to complete")


async def test_sync_handlers_run_in_threads(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    ids = [await submit(store, "test_sync", '{"seconds": 0.2}') for _ in range(4)]
    workers.start(store, concurrency=4)
    await wait_until(lambda: _all(conn, ids), "sync tasks completed")
    for i in ids:
        assert json.loads((await state_of(conn, i))["result"]) == {"slept": 0.2, "thread": True}


async def _count_exec(conn: asyncpg.Connection, task_id: int, n: int) -> bool:
    return bool(
        await conn.fetchval("SELECT count(*) FROM executions WHERE task_id = $1", task_id) >= n
    )


async def test_worker_that_lost_its_lease_drops_its_result(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    task_id = await submit(store, "test_sleep", '{"seconds": 3}')
    loser = workers.start(store, worker_id="loser")
    await wait_until(lambda: _count_exec(conn, task_id, 1), "the handler to start")
    # the lease runs out (as if the worker had been paused) and another worker takes over
    lease = await take_over(conn, task_id, "winner")
    await wait_until(lambda: _stat(loser, "dropped"), "the loser to notice and drop")
    assert await store.complete(task_id, lease["lease_token"], '"winner"')
    row = await state_of(conn, task_id)
    assert (row["state"], row["result"], row["worker"]) == (S.COMPLETED, '"winner"', "winner")
    assert await triggers(conn, task_id) == ["submit", "claim", "reclaim", "complete"]
    assert loser.stats["complete"] == 0


async def _stat(worker: Worker, key: str) -> bool:
    return worker.stats[key] > 0


async def test_stop_hands_unfinished_tasks_back(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    task_id = await submit(store, "test_sleep", '{"seconds": 30}')
    worker = workers.start(store, grace_seconds=0.2)
    await wait_until(lambda: _count_exec(conn, task_id, 1), "the handler to start")
    await workers.stop(worker)
    row = await state_of(conn, task_id)
    assert (row["state"], row["attempt"]) == (S.PENDING, 0)
    assert await triggers(conn, task_id) == ["submit", "claim", "release"]
    assert worker.stats["release"] == 1


async def test_stop_lets_running_handlers_finish_within_grace(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    task_id = await submit(store, "test_sleep", '{"seconds": 0.5}')
    worker = workers.start(store, grace_seconds=20)
    await wait_until(lambda: _count_exec(conn, task_id, 1), "the handler to start")
    await workers.stop(worker)
    assert (await state_of(conn, task_id))["state"] == S.COMPLETED


async def test_cancel_request_stops_a_running_handler(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    task_id = await submit(store, "test_sleep", '{"seconds": 30}')
    workers.start(store)
    await wait_until(lambda: _count_exec(conn, task_id, 1), "the handler to start")
    assert await store.request_cancel(task_id)
    await wait_until(done(conn, task_id, S.CANCELLED), "cancellation")  # type: ignore[arg-type]
    assert await triggers(conn, task_id) == ["submit", "claim", "cancel_running"]


async def test_survives_terminated_connections(
    store: Store, conn: asyncpg.Connection, workers: Running, db: str
) -> None:
    ids = [await submit(store, "test_sleep", '{"seconds": 0.05}') for _ in range(60)]
    own = await Store.connect(db, max_size=6)  # the worker's pool, apart from the test's
    try:
        workers.start(own, concurrency=6)
        for _ in range(5):
            await asyncio.sleep(0.2)
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name = 'tasklease'"
            )
        await wait_until(lambda: _all(conn, ids), "all tasks completed", timeout=60)
    finally:
        await workers.stop(workers.workers[-1][0])
        await own.close()
    await assert_completed_once(conn)
    await assert_histories_are_paths(conn)


async def test_a_task_is_heartbeated_by_its_own_lease(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    """A task's own lease (1 s) far shorter than its action's (60 s): the worker renews it
    by the task's lease, so two healthy workers never take it from each other."""
    task_id = await submit(store, "test_long_lease", '{"seconds": 3}', lease_seconds=1.0)
    only = {"test_long_lease": HANDLERS["test_long_lease"]}
    workers.start(store, only)
    workers.start(store, only)
    await wait_until(done(conn, task_id, S.COMPLETED), "completed", timeout=60)
    assert len(await executions(conn, task_id)) == 1
    assert await triggers(conn, task_id) == ["submit", "claim", "complete"]


@pytest.mark.parametrize(
    ("kind", "state", "error"),
    [
        ("surrogate", "DEAD", "result cannot be encoded as JSON: UnicodeEncodeError"),
        ("nested", "DEAD", "result cannot be encoded as JSON: RecursionError"),
        ("nul", "DEAD", "result cannot be stored"),
        ("error", "DEAD", "RuntimeError: bad bytes \\ud800 and \\x00 in an error"),
    ],
)
async def test_an_outcome_that_cannot_be_stored_as_is_is_recorded_at_once(
    store: Store, conn: asyncpg.Connection, workers: Running, kind: str, state: str, error: str
) -> None:
    """A result or error the database cannot take (a lone surrogate, nesting past what the
    encoder allows, a NUL) is recorded with the reason, not left RUNNING until its lease
    runs out; and the worker's writer keeps recording the other outcomes."""
    task_id = await submit(store, "test_hostile_outcome", json.dumps({"kind": kind}))
    after = await submit(store, "noop", "{}")
    workers.start(store, lease_seconds=600)
    await wait_until(done(conn, task_id, S(state)), f"{kind}: {state}", timeout=30)
    await wait_until(done(conn, after, S.COMPLETED), "the next task completed", timeout=30)
    row = await state_of(conn, task_id)
    assert row["last_error"].startswith(error), row["last_error"]
    assert "reclaim" not in await triggers(conn, task_id)


@pytest.mark.parametrize(("action", "code"), [("test_sys_exit", "0"), ("test_sync_sys_exit", "4")])
async def test_a_handler_calling_sys_exit_fails_its_attempt_not_the_worker(
    store: Store, conn: asyncpg.Connection, workers: Running, action: str, code: str
) -> None:
    task_id = await submit(store, action, "{}", max_attempts=1)
    worker = workers.start(store)
    await wait_until(done(conn, task_id, S.DEAD), "buried", timeout=30)
    row = await state_of(conn, task_id)
    assert row["last_error"].startswith(f"HandlerExited: the handler called sys.exit({code})")
    after = await submit(store, "noop", "{}")
    await wait_until(done(conn, after, S.COMPLETED), "the worker still runs tasks", timeout=30)
    assert not worker._stopping.is_set()
