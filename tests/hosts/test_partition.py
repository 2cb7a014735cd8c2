"""A worker host cut off from the database by its network link, then healed.

Worker A runs in host h1, worker B in host h2, the database in host db; all reach it over
veth links through a switch (tests/hosts/conftest.py). A's link is cut on the switch's side
(`ip link set PORT down`: no FIN, no RST, its packets simply vanish) while A runs two tasks:
one whose handler goes on (A must stop it by itself, self-fencing, before B can take it
over), one whose handler ends during the cut (A's outcome cannot be written; once the link
is healed it is refused, because B has taken the task over and completed it). The handlers
write their ticks to a file with this machine's clock, which every host shares, so the
runs of a task can be laid side by side.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import pytest

from tasklease.engine.store import Store
from tests.e2e.test_isolation import assert_no_overlap, history, runs, state
from tests.hosts.conftest import Hosts
from tests.support.db import assert_completed_once, assert_histories_are_paths, submit, wait_until


async def test_a_cut_worker_host_is_taken_over_fenced_and_its_late_outcome_refused(
    hosts: Hosts, host_store: Store, host_conn: asyncpg.Connection, tmp_path: Path
) -> None:
    ticks, release = tmp_path / "ticks", tmp_path / "release"
    h1, h2 = hosts.add("h1"), hosts.add("h2")
    a = hosts.worker(h1, "a", "--concurrency", "4")
    long_task = await submit(
        host_store, "test_ticks", json.dumps({"path": str(ticks), "seconds": 10})
    )
    short_task = await submit(
        host_store,
        "test_ticks_until",
        json.dumps({"path": str(ticks), "until": str(release)}),
    )

    async def both_started() -> bool:
        return bool(runs(ticks, long_task)) and bool(runs(ticks, short_task))

    await wait_until(both_started, "worker A (host h1) to start both handlers")
    h1.cut()
    cut_at = time.time()
    release.touch()  # the short handler ends now, while A cannot reach the database
    b = hosts.worker(h2, "b")

    async def completed() -> bool:
        return all([await state(host_conn, t) == "COMPLETED" for t in (long_task, short_task)])

    await wait_until(completed, "worker B (host h2) to take both tasks over", timeout=60)
    h1.heal()

    async def refused() -> bool:
        return "refused: the lease was lost" in a.output()

    await wait_until(refused, "A's late outcome to be refused once its link is back", 90)

    a_worker = b_worker = ""
    for task in (long_task, short_task):
        spans = runs(ticks, task)
        assert len(spans) == 2, spans
        (a_worker, _), (b_worker, _) = sorted(spans, key=lambda run: spans[run][0])
        assert a_worker != b_worker
        assert_no_overlap(ticks, task)  # A's run ended before B's began
        steps = await history(host_conn, task)
        assert [s["trigger"] for s in steps] == ["submit", "claim", "reclaim", "complete"]
        workers = await host_conn.fetch(
            "SELECT trigger, worker FROM task_transitions WHERE task_id = $1 ORDER BY id", task
        )
        assert [w["worker"] for w in workers][1:] == [a_worker, b_worker, b_worker], workers
    # A stopped the long handler by itself, before its lease could run out
    a_long = next(
        span for (worker, _), span in runs(ticks, long_task).items() if worker == a_worker
    )
    assert a_long[1] - cut_at < 3, "A ran on past its 3 s lease"
    out = a.output()
    assert "stopping its handler before the lease can run out (self-fencing)" in out, out
    # ... and said that the short task's outcome, written late, was refused
    assert f"task {short_task}" in next(
        line for line in out.splitlines() if "refused: the lease was lost" in line
    ), out
    await asyncio.sleep(0.5)
    await assert_completed_once(host_conn)
    await assert_histories_are_paths(host_conn)
    assert b.popen.poll() is None and a.popen.poll() is None


@pytest.mark.long  # ~30 s: a worker on a link this slow takes long to claim at all
async def test_a_claim_answered_after_its_lease_ran_out_is_not_run(
    hosts: Hosts, host_store: Store, host_conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """The database's answers to host h1 take 4.5 s (its requests go through at once): A's
    claim is committed at once, with a 3 s lease, but A hears of it only after B (host h2)
    has taken the task over. A must not start the handler then: the lease it was given
    is gone. (Found by `tasklease chaos --hosts 3`: a claim answered late across a cut link
    ran its handler for a moment beside the run of the worker that had taken it over.)"""
    ticks = tmp_path / "ticks"
    h1, h2 = hosts.add("h1", wire=True), hosts.add("h2")
    a = hosts.worker(h1, "a")

    warm_up = await submit(host_store, "noop")

    async def a_ready() -> bool:  # connected, statements prepared
        return await state(host_conn, warm_up) == "COMPLETED"

    await wait_until(a_ready, "worker A to run a first task")
    h1.impair(0, 0, down_ms=4500)
    task_id = await submit(host_store, "test_ticks", json.dumps({"path": str(ticks), "seconds": 3}))

    async def claimed() -> bool:
        return bool(await host_conn.fetchval(
            "SELECT count(*) FROM task_transitions WHERE task_id = $1 AND trigger = 'claim'",
            task_id,
        ))  # fmt: skip

    await wait_until(claimed, "worker A's claim to be committed", timeout=60)
    b = hosts.worker(h2, "b")

    async def completed() -> bool:
        return await state(host_conn, task_id) == "COMPLETED"

    await wait_until(completed, "worker B to take the task over and complete it", timeout=60)

    async def a_heard() -> bool:  # with the fix it says so; without, it runs the handler
        out = a.output()
        return "claim answered too late" in out or f"task {task_id} test_ticks: PENDING" in out

    await wait_until(a_heard, "worker A to hear of its claim, late", timeout=30)
    await asyncio.sleep(0.3)  # a handler A started would have ticked by now
    h1.clear()
    assert_no_overlap(ticks, task_id)
    spans = runs(ticks, task_id)
    assert len(spans) == 1, f"only B ran the task: {spans}"
    assert "claim answered too late (4.5s after it was sent, lease 3s); not running it" in (
        a.output()
    )
    steps = await host_conn.fetch(
        "SELECT trigger, worker FROM task_transitions WHERE task_id = $1 ORDER BY id", task_id
    )
    assert [s["trigger"] for s in steps] == ["submit", "claim", "reclaim", "complete"]
    ((b_worker, _),) = spans
    assert steps[1]["worker"] != b_worker == steps[2]["worker"] == steps[3]["worker"]
    await assert_completed_once(host_conn)
    assert b.popen.poll() is None and a.popen.poll() is None
