"""Scheduling across several real worker processes on one database: global concurrency
and rate limits, aging, timeouts, snooze and periodic tasks (docs/scheduling.md)."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

import asyncpg
import httpx

from tasklease.engine.store import Limit, NewTask, Store
from tests.support.db import assert_completed_once, assert_histories_are_paths, wait_until
from tests.support.procs import Procs


async def all_completed(conn: asyncpg.Connection, action: str, n: int) -> bool:
    done = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE action = $1 AND state = 'COMPLETED'", action
    )
    return bool(done == n)


async def start_workers(procs: Procs, conn: asyncpg.Connection, n: int, *args: str) -> None:
    """n workers, up and idle, so that one submission wakes them all at once."""
    for i in range(n):
        procs.worker(f"worker-{i}", *args)

    async def up() -> bool:
        return bool(
            await conn.fetchval("SELECT count(*) FROM processes WHERE kind = 'worker'") == n
        )

    await wait_until(up, f"{n} workers to report", 60)


async def most_at_once(conn: asyncpg.Connection, action: str) -> int:
    """The most handler runs of `action` that overlapped in time, over every worker: each
    run is [start, finish] (the machine's clock, shared by every process of the test, each
    run inside the task's RUNNING time); a sweep over the sorted ends counts them."""
    rows = await conn.fetch(
        "SELECT e.at, e.finished_at FROM executions e JOIN tasks t ON t.id = e.task_id "
        "WHERE t.action = $1",
        action,
    )
    assert rows and all(r["finished_at"] is not None for r in rows), rows
    return peak(rows)


def peak(rows: list[asyncpg.Record]) -> int:
    """The most [at, finished_at] intervals that overlap at one instant."""
    events = sorted([(r["at"], 1) for r in rows] + [(r["finished_at"], -1) for r in rows])
    running = most = 0
    for _, step in events:  # a finish sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


async def test_global_limit_is_never_exceeded_across_workers(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """test_limited has global_limit=2; three workers could run 3. (With more slots each,
    the worker whose outcomes free the room tends to take it again at once, and one worker
    may run them all: the limit holds either way, but across processes is what this tests.)"""
    await start_workers(procs, conn, 3, "--concurrency", "1")
    await store.submit_many([NewTask("test_limited", '{"seconds": 0.2}') for _ in range(24)])
    await wait_until(lambda: all_completed(conn, "test_limited", 24), "24 limited tasks", 60)
    assert await most_at_once(conn, "test_limited") == 2
    workers = await conn.fetchval(
        "SELECT count(DISTINCT e.worker) FROM executions e JOIN tasks t ON t.id = e.task_id "
        "WHERE t.action = 'test_limited'"
    )
    assert workers >= 2, "the limit was only ever tested inside one process"
    await assert_completed_once(conn)


async def test_a_per_key_limit_holds_per_customer_across_workers_and_a_flood_blocks_no_one(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """test_per_customer: at most 2 running per customer (limit_by="customer"). Three workers
    of concurrency 4 (12 slots): a flood of 30 tasks of one customer, then 6 of each of three
    others, submitted after it. Per customer, never more than 2 at once, over all workers;
    and the flood holds back no one: every other customer's first run starts before the
    flood's third (its first two hold its 2 tokens; the others take free slots at once)."""
    await start_workers(procs, conn, 3, "--concurrency", "4")
    customers = ["flood"] * 30 + ["b", "c", "d"] * 6
    await store.submit_many(
        [NewTask("test_per_customer", f'{{"customer": "{c}", "seconds": 0.5}}') for c in customers]
    )
    n = len(customers)
    await wait_until(lambda: all_completed(conn, "test_per_customer", n), f"{n} tasks", 90)
    rows = await conn.fetch("""
        SELECT t.payload ->> 'customer' AS customer, e.at, e.finished_at, e.worker
        FROM executions e JOIN tasks t ON t.id = e.task_id
        WHERE t.action = 'test_per_customer'""")
    assert len(rows) == n
    for customer in set(customers):
        assert peak([r for r in rows if r["customer"] == customer]) == 2, customer
    assert len({r["worker"] for r in rows}) >= 2, "the limit was only tested inside one process"
    flood_third = sorted(r["at"] for r in rows if r["customer"] == "flood")[2]
    for customer in "bcd":
        assert min(r["at"] for r in rows if r["customer"] == customer) < flood_third, customer
    await assert_completed_once(conn)


async def test_a_wide_global_limit_is_never_exceeded_and_is_used_whole(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """global_limit=256, three workers of concurrency 100 that could run 300: never more
    than 256 at once, and far more than half of it in use at once."""
    await start_workers(procs, conn, 3, "--concurrency", "100")
    n = 1000
    await store.submit_many([NewTask("test_wide_limited", '{"seconds": 0.4}') for _ in range(n)])
    await wait_until(lambda: all_completed(conn, "test_wide_limited", n), f"{n} tasks", 90)
    most = await most_at_once(conn, "test_wide_limited")
    assert 128 < most <= 256, most
    await assert_completed_once(conn)


async def test_a_limit_lowered_while_tasks_run_is_never_exceeded_once_they_finish(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """test_wide_limited runs up to 256 at once over three workers; an operator lowers its
    limit to 20 (as PUT /limits does). Nothing starts beyond what was RUNNING when it was
    lowered, and once the tasks that ran then have finished, never more than 20 run at once."""
    await start_workers(procs, conn, 3, "--concurrency", "100")
    n = 600
    await store.submit_many([NewTask("test_wide_limited", '{"seconds": 0.5}') for _ in range(n)])

    async def busy() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM executions") >= 150)

    await wait_until(busy, "150 runs started", 60)
    await store.set_limit(Limit("action:test_wide_limited", 20), declared=False)
    lowered_at = await conn.fetchval("SELECT clock_timestamp()")
    await wait_until(lambda: all_completed(conn, "test_wide_limited", n), f"{n} tasks", 120)
    # each run with the time of its claim (the database's): a claim made before the limit
    # was lowered may have taken a token above 20, whenever its handler began
    rows = await conn.fetch("""
        SELECT e.at, e.finished_at, h.at AS claimed_at FROM executions e
        JOIN task_transitions h
          ON h.task_id = e.task_id AND h.trigger = 'claim' AND h.attempt = e.attempt""")
    assert len(rows) == n
    before = [r for r in rows if r["claimed_at"] < lowered_at]
    surplus_gone = max(r["finished_at"] for r in before)
    assert any(r["at"] >= surplus_gone for r in rows), "nothing ran after the old ones"
    assert len(before) >= 150
    # from the moment the last task of before finished: at most 20 at once
    after = [r for r in rows if r["finished_at"] > surplus_gone]
    assert peak([_clip(r, surplus_gone) for r in after]) <= 20
    # and between: never more than held a token when the limit was lowered, that is were
    # RUNNING in the database (claimed before, completed after; a handler that had returned
    # holds its token until its outcome is written)
    running_then = await conn.fetchval(
        "SELECT count(*) FROM task_transitions c JOIN task_transitions d "
        "ON d.task_id = c.task_id AND d.trigger = 'complete' "
        "WHERE c.trigger = 'claim' AND c.at < $1 AND d.at > $1",
        lowered_at,
    )
    assert peak([_clip(r, lowered_at) for r in rows if r["finished_at"] > lowered_at]) <= max(
        running_then, 20
    )
    await assert_completed_once(conn)


def _clip(row: asyncpg.Record, start: datetime) -> dict[str, datetime]:
    return {"at": max(row["at"], start), "finished_at": row["finished_at"]}


async def test_queue_limit_is_never_exceeded_across_workers(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    await start_workers(
        procs, conn, 3, "--concurrency", "4", "--queues", "slow", "--queue-limit", "slow=3"
    )
    # test_limited's own limit (2) would hide the queue's: use two actions of the queue
    tasks = [NewTask("test_limited", '{"seconds": 0.3}', queue="slow") for _ in range(6)]
    tasks += [NewTask("test_sleep", '{"seconds": 0.3}', queue="slow") for _ in range(14)]
    await store.submit_many(tasks)

    async def done() -> bool:
        n = await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'COMPLETED'")
        return bool(n == 20)

    await wait_until(done, "20 tasks of the limited queue", 60)
    # test_sleep records only its start: take each run's end from its completion
    rows = await conn.fetch("""
        SELECT e.at, coalesce(e.finished_at, c.at) AS finished_at
        FROM executions e JOIN task_transitions c ON c.task_id = e.task_id
                                                  AND c.trigger = 'complete'""")
    assert peak(rows) == 3, peak(rows)


async def test_rate_limit_holds_in_every_window_across_workers(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """test_rated allows 5 starts per second over all workers."""
    await start_workers(procs, conn, 3, "--concurrency", "10")
    await store.submit_many([NewTask("test_rated", "{}") for _ in range(20)])
    await wait_until(lambda: all_completed(conn, "test_rated", 20), "20 rated tasks", 60)
    starts = [
        r["at"]
        for r in await conn.fetch(
            "SELECT h.at FROM task_transitions h JOIN tasks t ON t.id = h.task_id "
            "WHERE t.action = 'test_rated' AND h.trigger IN ('claim', 'reclaim') ORDER BY h.at"
        )
    ]
    assert len(starts) == 20
    window = timedelta(seconds=1)
    busiest = max(sum(1 for s in starts if t <= s < t + window) for t in starts)
    assert busiest == 5, busiest
    # 20 starts at 5 per second cannot take less than 3 seconds from first to last
    assert starts[-1] - starts[0] >= timedelta(seconds=3)


async def test_a_wide_rate_limit_holds_in_every_window_across_workers(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """test_wide_rated allows 256 starts per second: more than one claim takes."""
    await start_workers(procs, conn, 3, "--concurrency", "100")
    n = 800
    await store.submit_many([NewTask("test_wide_rated", "{}") for _ in range(n)])
    await wait_until(lambda: all_completed(conn, "test_wide_rated", n), f"{n} rated tasks", 60)
    starts = [
        r["at"]
        for r in await conn.fetch(
            "SELECT h.at FROM task_transitions h JOIN tasks t ON t.id = h.task_id "
            "WHERE t.action = 'test_wide_rated' AND h.trigger IN ('claim', 'reclaim') "
            "ORDER BY h.at"
        )
    ]
    assert len(starts) == n
    window = timedelta(seconds=1)
    busiest = max(sum(1 for s in starts if t <= s < t + window) for t in starts)
    assert 128 < busiest <= 256, busiest
    assert starts[-1] - starts[0] >= timedelta(seconds=3)


async def test_aging_lets_an_old_low_priority_task_through_a_flood(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """Strict priority would leave the priority -5 task behind the 300 priority 5 tasks;
    due for longer than --aging-seconds, it gets its turn while they still wait."""
    low = (await store.submit_many([NewTask("test_sleep", '{"seconds": 0}', priority=-5)]))[0]
    await conn.execute(
        "UPDATE tasks SET due_at = now() - interval '10 seconds' WHERE id = $1", low.task["id"]
    )
    await store.submit_many(
        [NewTask("test_sleep", '{"seconds": 0.05}', priority=5) for _ in range(300)]
    )
    procs.worker("worker-0", "--concurrency", "2", "--aging-seconds", "5")
    procs.worker("worker-1", "--concurrency", "2", "--aging-seconds", "5")

    async def low_done() -> bool:
        state = await conn.fetchval("SELECT state FROM tasks WHERE id = $1", low.task["id"])
        return bool(state == "COMPLETED")

    await wait_until(low_done, "the aged low-priority task to complete", 60)
    waiting = await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'PENDING'")
    assert waiting > 100, "it only ran once the flood was over: no aging happened"


async def test_timeouts_fail_the_attempt_and_say_so(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    procs.worker("worker")
    by_action = (
        await store.submit_many([NewTask("test_timeout", '{"seconds": 5}', max_attempts=2)])
    )[0]
    by_task = (
        await store.submit_many(
            [NewTask("test_sleep", '{"seconds": 5}', timeout_seconds=0.3, max_attempts=1)]
        )
    )[0]

    async def dead(task_id: int) -> bool:
        return bool(await conn.fetchval("SELECT state FROM tasks WHERE id = $1", task_id) == "DEAD")

    await wait_until(lambda: dead(by_action.task["id"]), "the overrunning task to die", 30)
    await wait_until(lambda: dead(by_task.task["id"]), "the task with its own timeout to die")
    history = await conn.fetch(
        "SELECT trigger, detail FROM task_transitions WHERE task_id = $1 ORDER BY id",
        by_action.task["id"],
    )
    assert [h["trigger"] for h in history] == ["submit", "claim", "fail", "claim", "bury"]
    assert "timed out after 0.5s" in history[2]["detail"]
    assert "timed out after 0.5s" in history[4]["detail"]
    last = await conn.fetchval("SELECT last_error FROM tasks WHERE id = $1", by_task.task["id"])
    assert "timed out after 0.3s" in last


async def test_snooze_runs_again_later_without_using_an_attempt(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    procs.worker("worker-0")
    procs.worker("worker-1")
    task = (await store.submit_many([NewTask("test_snooze", '{"times": 2}', max_attempts=1)]))[0]
    await wait_until(lambda: all_completed(conn, "test_snooze", 1), "the snoozing task")
    history = await conn.fetch(
        "SELECT trigger, from_state, to_state, attempt, detail FROM task_transitions "
        "WHERE task_id = $1 ORDER BY id",
        task.task["id"],
    )
    assert [h["trigger"] for h in history] == [
        "submit",
        "claim",
        "snooze",
        "claim",
        "snooze",
        "claim",
        "complete",
    ]
    snoozes = [h for h in history if h["trigger"] == "snooze"]
    assert all((h["from_state"], h["to_state"]) == ("RUNNING", "PENDING") for h in snoozes)
    assert snoozes[0]["detail"] == "snoozed for 0.1s: not ready yet (run 1)"
    # max_attempts is 1: only because a snooze gives the attempt back could it run 3 times
    assert [h["attempt"] for h in history if h["trigger"] == "claim"] == [1, 1, 1]
    await assert_histories_are_paths(conn)


async def test_one_task_per_slot_however_many_schedulers(
    procs: Procs, conn: asyncpg.Connection
) -> None:
    """Three workers each run the scheduler of test_tick (every second)."""
    _, url = procs.api("--handlers", "tests.support.scheduled")
    for n in range(3):
        procs.worker(f"worker-{n}", "--handlers", "tests.support.scheduled")

    async def slots() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE action = 'test_tick' AND state = 'COMPLETED'"
        )
        return bool(n >= 5)

    await wait_until(slots, "five periodic tasks", 60)
    rows = await conn.fetch(
        "SELECT due_at, idempotency_key FROM tasks WHERE action = 'test_tick' ORDER BY due_at"
    )
    dues = [r["due_at"] for r in rows]
    assert len(dues) == len(set(dues)), f"two tasks for one slot: {dues}"
    assert all(d.microsecond == 0 for d in dues), "slots are whole seconds"
    assert all(
        r["idempotency_key"] == f"schedule:test_tick:{r['due_at'].isoformat()}" for r in rows
    )
    # slots follow each other one second apart, a gap only if every scheduler was late
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(dues)]
    assert gaps.count(1.0) >= len(gaps) - 1, gaps
    async with httpx.AsyncClient(base_url=url) as http:
        schedules = (await http.get("/schedules")).json()
    assert [(s["name"], s["every_seconds"], s["missed"]) for s in schedules] == [
        ("test_tick", 1.0, "once")
    ]
    assert schedules[0]["next_run_at"] > schedules[0]["last_slot_at"]
    await assert_completed_once(conn)


async def test_workers_prune_finished_tasks(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    for n in range(2):
        procs.worker(f"worker-{n}", "--retain-finished", "1s", "--retention-interval", "0.3")
    await store.submit_many([NewTask("test_sleep", '{"seconds": 0}') for _ in range(20)])
    dead = (await store.submit_many([NewTask("test_permanent", "{}")]))[0].task["id"]

    async def pruned() -> bool:
        left = await conn.fetchval("SELECT count(*) FROM tasks")
        return bool(left == 1)

    await wait_until(pruned, "the completed tasks to be deleted", 60)
    assert await conn.fetchval("SELECT state FROM tasks") == "DEAD"  # kept 30 days
    history = await conn.fetch("SELECT DISTINCT task_id FROM task_transitions")
    assert [r["task_id"] for r in history] == [dead]
