"""Handlers that misbehave cannot make a task run twice at once, nor lose one.

Real `tasklease worker` processes on a real database. Handlers write a line per tick to a
file with this machine's clock, so the runs of one task can be laid side by side even when a
worker cannot reach the database (tests/support/handlers.py: Ticks).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections import defaultdict
from pathlib import Path

import asyncpg
import httpx
import psutil

from tasklease.engine.store import Store
from tests.support.db import assert_completed_once, assert_histories_are_paths, submit, wait_until
from tests.support.procs import Proc, Procs
from tests.support.proxy import Proxy


def runs(path: Path, task_id: int) -> dict[tuple[str, int], tuple[float, float]]:
    """(worker, attempt) -> (first tick, last tick) of each run of the task."""
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            task, attempt, worker, _, at = line.split()
            if int(task) == task_id:
                times[(worker, int(attempt))].append(float(at))
    return {run: (min(ts), max(ts)) for run, ts in times.items()}


def assert_no_overlap(path: Path, task_id: int) -> list[tuple[float, float]]:
    spans = sorted(runs(path, task_id).values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"two runs of task {task_id} at once: {spans}"
    return spans


async def history(conn: asyncpg.Connection, task_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT trigger, to_state, detail, at FROM task_transitions WHERE task_id = $1 ORDER BY id",
        task_id,
    )


async def state(conn: asyncpg.Connection, task_id: int) -> str:
    return str(await conn.fetchval("SELECT state FROM tasks WHERE id = $1", task_id))


async def test_an_async_handler_blocking_the_loop_keeps_its_lease_and_is_named(
    procs: Procs, store: Store, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """`time.sleep(4)` in an async handler with a 1 s lease, a rival worker polling: the
    leases are renewed from the keeper's thread, so the task runs once, and the log and
    /metrics name the handler that blocked the loop."""
    ticks = tmp_path / "ticks"
    fast_reports = {"TASKLEASE_REPORT_SECONDS": "0.5"}
    blocked = procs.start(
        "blocked", "worker", "--handlers", "tests.support.handlers", env=fast_reports
    )
    task_id = await submit(store, "test_block_loop", json.dumps({"path": str(ticks), "seconds": 4}))

    async def started() -> bool:
        return bool(runs(ticks, task_id))

    await wait_until(started, "the handler to start")
    procs.worker("rival")

    async def completed() -> bool:
        return await state(conn, task_id) == "COMPLETED"

    await wait_until(completed, "the blocking handler to complete", timeout=60)
    assert len(runs(ticks, task_id)) == 1, runs(ticks, task_id)
    assert [r["trigger"] for r in await history(conn, task_id)] == ["submit", "claim", "complete"]
    log = blocked.output()
    assert f"handler 'test_block_loop' (task {task_id}) at" in log and "blocks it" in log, log

    async def said_again() -> bool:
        return "event loop runs again after" in blocked.output()

    await wait_until(said_again, "the worker to say its loop runs again")
    _, url = procs.api()

    async def counted() -> bool:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{url}/metrics")).text
        return 'tasklease_event_loop_blocked_total{action="test_block_loop"} 1.0' in text

    await wait_until(counted, "/metrics to count the blocked loop")
    await assert_completed_once(conn)


async def test_a_sync_handler_past_its_timeout_is_not_retried_until_its_thread_returns(
    procs: Procs, store: Store, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """A def handler that ignores ctx.stop_requested runs 2.5 s past a 0.5 s timeout; two
    workers. Its retry starts only once its thread has returned: never two runs at once."""
    ticks = tmp_path / "ticks"
    procs.worker("one", "--concurrency", "2")
    procs.worker("two", "--concurrency", "2")
    payload = {"path": str(ticks), "seconds": 2.5, "ignore_stop": True}
    task_id = await submit(store, "test_sync_ticks", json.dumps(payload), max_attempts=2)

    async def dead() -> bool:
        return await state(conn, task_id) == "DEAD"

    await wait_until(dead, "both attempts to time out", timeout=60)
    spans = assert_no_overlap(ticks, task_id)
    assert len(spans) == 2 and all(end - start >= 2.4 for start, end in spans), spans
    steps = await history(conn, task_id)
    assert [s["trigger"] for s in steps] == ["submit", "claim", "fail", "claim", "bury"]
    assert "TaskTimeout: timed out after 0.5s" in steps[2]["detail"]
    # the failure was recorded once the thread had returned, not at the timeout
    assert steps[2]["at"].timestamp() >= spans[0][1] - 0.05
    await assert_histories_are_paths(conn)


async def test_a_sync_handler_that_looks_at_stop_requested_ends_at_its_timeout(
    procs: Procs, store: Store, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    procs.worker("one")
    payload = json.dumps({"path": str(ticks), "seconds": 30})
    task_id = await submit(store, "test_sync_ticks", payload, max_attempts=2)

    async def dead() -> bool:
        return await state(conn, task_id) == "DEAD"

    await wait_until(dead, "both attempts to time out", timeout=30)
    spans = assert_no_overlap(ticks, task_id)
    assert len(spans) == 2 and all(0.45 < end - start < 5 for start, end in spans), spans
    steps = await history(conn, task_id)
    assert [s["trigger"] for s in steps] == ["submit", "claim", "fail", "claim", "bury"]
    assert "TaskTimeout: timed out after 0.5s" in steps[-1]["detail"]


async def test_a_cancelled_sync_handler_is_recorded_cancelled_once_its_thread_returned(
    procs: Procs, store: Store, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    _, url = procs.api()
    procs.worker("one")
    payload = {"path": str(ticks), "seconds": 2.5, "ignore_stop": True}
    task_id = await submit(store, "test_sync_ticks", json.dumps(payload), timeout_seconds=60)

    async def started() -> bool:
        return bool(runs(ticks, task_id))

    await wait_until(started, "the handler to start")
    async with httpx.AsyncClient() as http:
        assert (await http.post(f"{url}/tasks/{task_id}/cancel")).status_code == 200

    async def cancelled() -> bool:
        return await state(conn, task_id) == "CANCELLED"

    await wait_until(cancelled, "the cancel to be recorded", timeout=30)
    (start, end), *others = runs(ticks, task_id).values()
    assert not others and end - start >= 2.4
    steps = await history(conn, task_id)
    assert [s["trigger"] for s in steps] == ["submit", "claim", "cancel_running"]
    assert steps[-1]["at"].timestamp() >= end - 0.05, "recorded CANCELLED while it still ran"


def worker_child(proc: Proc) -> psutil.Process:
    """The worker process under a `tasklease worker` (engine/supervisor.py)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children()
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"{proc.name} started no worker")


async def partitioned_run(
    procs: Procs,
    store: Store,
    conn: asyncpg.Connection,
    db: str,
    tmp_path: Path,
    action: str,
    payload: dict[str, object],
    **submit_options: float,
) -> Proc:
    """Worker A reaches the database through a proxy that is cut while A runs the task
    (3 s lease); worker B, connected directly, takes the task over when the lease has run
    out. Returns once the task is COMPLETED."""
    ticks = tmp_path / "ticks"
    proxy = Proxy(db)
    try:
        a = procs.start(
            "a",
            "worker",
            "--handlers",
            "tests.support.handlers",
            "--poll-interval",
            "0.05",
            env={"DATABASE_URL": proxy.dsn},
        )
        task_id = await submit(
            store, action, json.dumps({"path": str(ticks), **payload}), **submit_options
        )

        async def started() -> bool:
            return bool(runs(ticks, task_id))

        await wait_until(started, "worker A to start the handler")
        proxy.cut()
        cut_at = time.time()
        procs.worker("b")

        async def completed() -> bool:
            return await state(conn, task_id) == "COMPLETED"

        await wait_until(completed, "worker B to take the task over and complete it", 60)
        spans = runs(ticks, task_id)
        assert len(spans) == 2, spans
        a_run = next(span for (worker, _), span in spans.items() if worker != "b")
        assert a_run[1] - cut_at < 3, "A ran on past its lease"
        assert_no_overlap(ticks, task_id)
        proxy.heal()
        await asyncio.sleep(1)  # whatever A still had to say reaches the database
        await assert_completed_once(conn)
        return a
    finally:
        proxy.close()


async def test_a_partitioned_worker_stops_its_handler_before_its_lease_runs_out(
    procs: Procs, store: Store, conn: asyncpg.Connection, db: str, tmp_path: Path
) -> None:
    """Self-fencing: A cannot renew the lease, so it cancels the async handler at 3/4 of
    the lease, before B (the database's clock) can take the task over."""
    a = await partitioned_run(procs, store, conn, db, tmp_path, "test_ticks", {"seconds": 8})
    assert "stopping its handler before the lease can run out (self-fencing)" in a.output()


async def test_a_partitioned_worker_whose_thread_cannot_stop_ends_itself(
    procs: Procs, store: Store, conn: asyncpg.Connection, db: str, tmp_path: Path
) -> None:
    """A def handler that ignores ctx.stop_requested: A's worker process ends itself at
    7/8 of the lease; its supervisor says so and starts a new worker."""
    a = await partitioned_run(
        procs,
        store,
        conn,
        db,
        tmp_path,
        "test_sync_ticks",
        {"seconds": 8, "ignore_stop": True},
        timeout_seconds=60,  # not the action's 0.5 s: the run must outlast the lease
    )
    out = a.output()
    assert "ending this worker process (status 75)" in out, out
    assert "exited with status 75 without being asked to stop" in out, out


async def test_a_poison_task_ends_dead_saying_why_and_loses_nothing_beside_it(
    procs: Procs, store: Store, conn: asyncpg.Connection
) -> None:
    """A handler that ends its worker process (os._exit(0), then a segfault) on every
    attempt, beside ordinary tasks on two workers: each death is settled by the worker's
    supervisor at once (not after the 60 s lease), the poison tasks end DEAD with the reason
    in their history, every other task completes, and both workers are still there."""
    workers = [procs.worker(f"w{n}", "--concurrency", "4") for n in (1, 2)]
    others: list[int] = []
    for how, why in (("exit", "status 0"), ("segv", "signal SIGSEGV")):
        poison = await submit(store, "test_crash", json.dumps({"how": how}), max_attempts=2)
        batch = [await submit(store, "test_sleep", '{"seconds": 0.5}') for _ in range(6)]
        others += batch

        async def settled(poison: int = poison, batch: list[int] = batch) -> bool:
            done = await conn.fetchval(
                "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state = 'COMPLETED'", batch
            )
            return await state(conn, poison) == "DEAD" and done == len(batch)

        await wait_until(settled, f"the {how} task DEAD and the others COMPLETED", timeout=45)
        steps = await history(conn, poison)
        assert [s["trigger"] for s in steps] == ["submit", "claim", "fail", "claim", "bury"]
        assert f"worker process died ({why}) while running it" in steps[2]["detail"]
        assert (
            f"worker process died ({why}) while running it (attempt 2 of 2)" in (steps[4]["detail"])
        )
    for w in workers:
        assert w.popen.poll() is None, w.output()
    # the workers still run tasks
    more = await submit(store, "test_sleep", '{"seconds": 0}')

    async def done() -> bool:
        return await state(conn, more) == "COMPLETED"

    await wait_until(done, "a task after the poison ones")
    await assert_completed_once(conn)
    await assert_histories_are_paths(conn)
    # stopping is still clean: the supervisor exits with its worker's status
    for w in workers:
        assert w.stop() == 0


async def test_killing_the_supervisor_kills_its_worker(procs: Procs) -> None:
    w = procs.worker("w")
    child = worker_child(w)
    w.signal(signal.SIGKILL)
    child.wait(10)
    assert not child.is_running()
