"""The chaos run's check of overlapping executions (engine/tools/chaos.py, _verify), on
runs written by hand: a run whose end was not recorded ends, at the latest, at its
attempt's recorded outcome, else at its worker's kill."""

from __future__ import annotations

import asyncpg
import pytest

from tasklease.engine.tools.chaos import EXECUTIONS, ChaosReport, _verify

WORKER = "host:4242.abcd"


async def runs_and_history(conn: asyncpg.Connection, *, first_attempt_failed: bool) -> None:
    """One task: attempt 1 began at 100 s and its end was never written (the probe's write
    failed in a connection cut); attempt 2 ran from 110 to 111 s by the same worker, which
    completed it. With `first_attempt_failed`, the worker recorded attempt 1's failure at
    101 s."""
    await conn.execute(EXECUTIONS)
    task_id = await conn.fetchval(
        "INSERT INTO tasks (action, payload, state, attempt, result) "
        "VALUES ('chaos_probe', '{}', 'COMPLETED', 2, 'null') RETURNING id"
    )
    history = [
        ("submit", None, "PENDING", 0, None, 99.0),
        ("claim", "PENDING", "RUNNING", 1, WORKER, 100.0),
    ]
    if first_attempt_failed:
        history.append(("fail", "RUNNING", "FAILED", 1, WORKER, 101.0))
    history += [
        ("claim", "FAILED", "RUNNING", 2, WORKER, 110.0),
        ("complete", "RUNNING", "COMPLETED", 2, WORKER, 111.0),
    ]
    for trigger, source, dest, attempt, worker, at in history:
        await conn.execute(
            "INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, "
            "worker, at) VALUES ($1, $2, $3::task_state, $4::task_state, $5, $6, "
            "to_timestamp($7))",
            task_id,
            trigger,
            source,
            dest,
            attempt,
            worker,
            at,
        )
    await conn.execute(
        "INSERT INTO chaos_executions (task_id, attempt, worker, at, finished_at) VALUES "
        "($1, 1, $2, to_timestamp(100.2), NULL), "
        "($1, 2, $2, to_timestamp(110.1), to_timestamp(110.9))",
        task_id,
        WORKER,
    )


@pytest.mark.parametrize("first_attempt_failed, overlapping", [(True, 0), (False, 1)])
async def test_a_run_without_its_end_ends_at_its_outcome_else_at_its_kill(
    conn: asyncpg.Connection, first_attempt_failed: bool, overlapping: int
) -> None:
    await runs_and_history(conn, first_attempt_failed=first_attempt_failed)
    report = ChaosReport(tasks=1)
    # the worker was killed at 200 s, long after both runs
    await _verify(conn, report, killed={4242: 200.0})
    assert report.overlapping_executions == overlapping
    assert report.lost == 0 and report.double_completions == 0
