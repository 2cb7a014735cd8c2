"""Worker hosts on slow, lossy links: nothing lost, nothing doubled, no two runs at once.

Two worker hosts, one with 20 ms each way and 2 % loss each way on its link, one with
50 ms and 5 %; the API on a clean host. Delay and loss are made by `tc netem` where the
kernel has it, else by the frame forwarder spliced into the link (engine/tools/netns.py): TCP
sees real loss and retransmits. The throughput is printed, not asserted (`-s` shows it;
docs/benchmarks.md has figures with their command).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import asyncpg
import httpx

from tests.e2e.test_isolation import assert_no_overlap, runs
from tests.hosts.conftest import Hosts
from tests.support.db import assert_completed_once, assert_histories_are_paths, wait_until

TASKS = 200


async def test_workers_on_delayed_lossy_links_lose_nothing_and_double_nothing(
    hosts: Hosts, host_conn: asyncpg.Connection, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    slow, slower, api_host = hosts.add("h1", wire=True), hosts.add("h2", wire=True), hosts.add("h3")
    how = slow.impair(delay_ms=20, loss=0.02, seed=1)
    slower.impair(delay_ms=50, loss=0.05, seed=2)
    url = hosts.api(api_host)
    a = hosts.worker(slow, "a", "--concurrency", "20")
    b = hosts.worker(slower, "b", "--concurrency", "20")

    async def both_started() -> bool:
        return all(" started: queues=" in w.output() for w in (a, b))

    await wait_until(both_started, "both workers to start")
    body = {
        "tasks": [
            {
                "action": "test_ticks",
                # long enough that one host alone would take 5 s: the slower host, whose
                # first claim may wait out a retransmission, gets its share
                "payload": {"path": str(ticks), "seconds": 0.5},
                "idempotency_key": f"k{i}",
            }
            for i in range(TASKS)
        ]
    }
    async with httpx.AsyncClient() as http:
        assert (await http.post(f"{url}/tasks/batch", json=body, timeout=60)).status_code == 201

    async def drained() -> bool:
        done = await host_conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'COMPLETED'")
        return bool(done == TASKS)

    await wait_until(drained, f"{TASKS} tasks completed over the impaired links", timeout=180)
    assert await host_conn.fetchval("SELECT count(*) FROM tasks") == TASKS
    await assert_completed_once(host_conn)
    await assert_histories_are_paths(host_conn)
    ids = [r["id"] for r in await host_conn.fetch("SELECT id FROM tasks")]
    for task_id in ids:
        assert runs(ticks, task_id), f"task {task_id} completed but never ran"
        assert_no_overlap(ticks, task_id)
    by_worker = Counter(
        r["worker"].split(":")[1]
        for r in await host_conn.fetch(
            "SELECT worker FROM task_transitions WHERE trigger = 'complete'"
        )
    )
    assert len(by_worker) == 2, f"both hosts complete tasks: {by_worker}"
    counts = {h.name: h.link_counts() for h in (slow, slower)}
    for name, (forwarded, dropped) in counts.items():
        assert forwarded > 0 and dropped > 0, f"{name}'s link forwarded and lost frames: {counts}"
    first, last, reclaims = await host_conn.fetchrow(
        "SELECT min(at) FILTER (WHERE trigger = 'claim'), "
        "max(at) FILTER (WHERE trigger = 'complete'), "
        "count(*) FILTER (WHERE trigger = 'reclaim') FROM task_transitions"
    )
    seconds = (last - first).total_seconds()
    print(
        f"\n{TASKS} tasks over links of 20 ms/2 % and 50 ms/5 % ({how}): "
        f"{TASKS / seconds:.0f} tasks/s ({seconds:.1f} s), completions by worker "
        f"{dict(by_worker)}, {reclaims} reclaims; frames (forwarded, dropped): {counts}"
    )
    assert a.popen.poll() is None and b.popen.poll() is None
