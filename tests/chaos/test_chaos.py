"""Kill workers mid-lease, pause one past its lease, cut connections: nothing lost or doubled.

Real `tasklease worker` and `tasklease api` processes on a real database. The long form
of the first test is `tasklease chaos --minutes 10 --workers 6` (docs/reliability.md).
"""

from __future__ import annotations

import signal
from pathlib import Path

import asyncpg

from tasklease.engine.tools import chaos
from tests.support.db import assert_completed_once, assert_histories_are_paths, triggers
from tests.support.db import wait_until as wait
from tests.support.procs import Procs


async def test_killed_workers_lose_nothing_and_double_nothing(
    admin_dsn: str, tmp_path: Path
) -> None:
    config = chaos.ChaosConfig(
        tasks=1000,
        rate=50,
        seconds=6,
        workers=3,
        concurrency=10,
        lease_seconds=2,
        kill_every=0.3,
        terminate_every=2.0,
        seed=7,
    )
    report = await chaos.run(admin_dsn, config, tmp_path, progress=print)
    print("\n".join(report.lines()))
    assert report.ok, report.problems
    assert report.tasks >= 1000 and report.completed == report.tasks
    assert (report.lost, report.double_completions, report.never_executed) == (0, 0, 0)
    assert report.kills >= 10 and report.connection_cuts >= 2
    # kills landed mid-lease: some tasks ran twice and were taken over after their lease
    assert report.executions > report.tasks and report.reclaims > 0
    assert report.running_with_live_lease == 0 and report.duplicate_tasks == 0
    assert report.overlapping_executions == 0


async def test_workflows_under_killed_workers(admin_dsn: str, tmp_path: Path) -> None:
    """Diamonds with a fan-in task each, while workers are SIGKILLed: no dependant is claimed
    before its dependencies complete, none is stranded WAITING, each is made ready once."""
    config = chaos.ChaosConfig(
        tasks=300,
        rate=20,
        seconds=6,
        workers=3,
        concurrency=10,
        lease_seconds=2,
        kill_every=0.3,
        sleep_ms=(20, 150),
        seed=11,
        graphs=100,
    )
    report = await chaos.run(admin_dsn, config, tmp_path, progress=print)
    print("\n".join(report.lines()))
    assert report.ok, report.problems
    assert report.workflows == 100 and report.completed == report.tasks
    assert report.reclaims > 0  # kills landed mid-lease
    assert (report.early_dependants, report.stranded, report.not_ready_once) == (0, 0, 0)
    assert report.kills >= 5 and report.double_completions == 0


def test_overlaps_counts_runs_that_began_before_an_earlier_one_ended() -> None:
    assert chaos.overlaps([(0, 1), (1, 2), (3, 4)]) == 0
    assert chaos.overlaps([(0, 5), (1, 2), (3, 4)]) == 2
    assert chaos.overlaps([(2, 3), (0, 2.5)]) == 1
    assert chaos.worker_pid("vm:4242.ab12") == 4242


async def _executions(conn: asyncpg.Connection, task_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT worker, attempt FROM executions WHERE task_id = $1 ORDER BY id", task_id
    )


async def _submit(conn: asyncpg.Connection, payload: str) -> int:
    task_id: int = await conn.fetchval(
        "WITH t AS (INSERT INTO tasks (action, payload) VALUES ('test_sleep', $1::jsonb) "
        "RETURNING id) INSERT INTO task_transitions (task_id, trigger, to_state, attempt) "
        "SELECT id, 'submit', 'PENDING', 0 FROM t RETURNING task_id",
        payload,
    )
    return task_id


async def test_a_paused_worker_is_fenced_off(procs: Procs, conn: asyncpg.Connection) -> None:
    """SIGSTOP past the 2 s lease: another worker takes the task over. Woken while the other
    still runs it, the first worker's completion is refused by the token guard (it says so);
    the task is completed once, by the other."""
    paused = procs.worker("paused")
    task_id = await _submit(conn, '{"seconds": 1.5}')

    async def started(n: int) -> bool:
        return len(await _executions(conn, task_id)) == n

    await wait(lambda: started(1), "the first worker to start the handler")
    paused.signal_tree(signal.SIGSTOP)
    other = procs.worker("other")
    await wait(lambda: started(2), "the other worker to take the task over")
    # Its handler's sleep is long over: it completes at once and its completion is refused
    # by the token guard, unless its lease keeper, finding the lease lost, stopped the
    # handler first (engine/leases.py): either way its result is dropped and it says so.
    paused.signal_tree(signal.SIGCONT)

    async def dropped() -> bool:
        out = paused.output()
        return "refused: the lease was lost" in out or "result dropped: the lease was lost" in out

    await wait(dropped, "the paused worker to drop its result and log it")

    async def completed() -> bool:
        return bool(
            await conn.fetchval("SELECT state = 'COMPLETED' FROM tasks WHERE id = $1", task_id)
        )

    await wait(completed, "the other worker to complete")
    runs = await _executions(conn, task_id)
    assert [r["attempt"] for r in runs] == [1, 2]
    assert f":{paused.pid}." in runs[0]["worker"] and f":{other.pid}." in runs[1]["worker"]
    assert await triggers(conn, task_id) == ["submit", "claim", "reclaim", "complete"]
    winner = await conn.fetchval("SELECT worker FROM tasks WHERE id = $1", task_id)
    assert f":{other.pid}." in winner
    await assert_completed_once(conn)


async def test_heartbeats_keep_a_long_handler_from_being_taken_over(
    procs: Procs, conn: asyncpg.Connection
) -> None:
    """A 6.5 s handler with a 2 s lease, and an idle rival worker polling all along."""
    holder = procs.worker("holder")
    task_id = await _submit(conn, '{"seconds": 6.5}')

    async def started() -> bool:
        return len(await _executions(conn, task_id)) == 1

    await wait(started, "the holder to start the handler")
    procs.worker("rival")

    async def completed() -> bool:
        return bool(
            await conn.fetchval("SELECT state = 'COMPLETED' FROM tasks WHERE id = $1", task_id)
        )

    await wait(completed, "the long handler to complete")
    runs = await _executions(conn, task_id)
    assert len(runs) == 1 and f":{holder.pid}." in runs[0]["worker"]
    assert await triggers(conn, task_id) == ["submit", "claim", "complete"]
    await assert_histories_are_paths(conn)
