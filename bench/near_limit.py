"""A global limit just above the load: drains of an action under `global_limit=LIMIT`
against drains of the same handler without one, in turns, with `tasklease bench`'s drain
(2 workers x concurrency 100, 20,000 tasks that do nothing, or sleep --work-ms).

    .venv/bin/python bench/near_limit.py 250 [ROUNDS] [--work-ms 50]

On the server of DATABASE_URL, else the embedded one, as every tasklease command.
docs/benchmarks.md quotes its output. The handlers live in this file: workers import it as
`near_limit` (this directory is put on their PYTHONPATH), with the limit and the work from
TASKLEASE_BENCH_NEAR_LIMIT and TASKLEASE_BENCH_NEAR_WORK_MS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from tasklease import TaskContext, handler

LIMIT = int(os.environ.get("TASKLEASE_BENCH_NEAR_LIMIT", "250"))
WORK = float(os.environ.get("TASKLEASE_BENCH_NEAR_WORK_MS", "0")) / 1000
HERE = str(Path(__file__).resolve().parent)


@handler("bench_near", global_limit=LIMIT)
async def bench_near(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """Under a global limit a little above the load."""
    if WORK:
        await asyncio.sleep(WORK)


@handler("bench_free")
async def bench_free(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """The same, without a limit."""
    if WORK:
        await asyncio.sleep(WORK)


async def running_tasks(dsn: str) -> dict[str, float]:
    """Beside a drain: how many tasks the database holds RUNNING (what a limit counts),
    sampled every 10 ms until none is left to run. A task is RUNNING from its claim until its
    outcome is written, which is batched: so more than the slots."""
    conn = await asyncpg.connect(dsn)
    seen: list[int] = []
    try:
        while True:
            for _ in range(50):
                seen.append(
                    await conn.fetchval(
                        "SELECT count(*) FROM tasks "
                        "WHERE lease_expires_at IS NOT NULL AND state = 'RUNNING'"
                    )
                )
                await asyncio.sleep(0.01)
            if max(seen) and not await conn.fetchval(
                "SELECT count(*) FROM tasks WHERE state <> 'COMPLETED'"
            ):
                break
    finally:
        await conn.close()
    busy = [n for n in seen if n]
    return {"running_median": statistics.median(busy), "running_max": max(busy)}


async def main(limit: int, rounds: int, work_ms: float) -> None:
    from tasklease.engine.cli import database_url
    from tasklease.engine.tools import bench

    os.environ["TASKLEASE_BENCH_NEAR_LIMIT"] = str(limit)
    os.environ["TASKLEASE_BENCH_NEAR_WORK_MS"] = str(work_ms)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    admin, config, logs = database_url(), bench.BenchConfig(), Path(tempfile.mkdtemp())
    # the same workers (both handlers) in both drains; only the action differs
    both = ("--handlers", "near_limit")
    kinds = [("none", "bench_free", both), ("limited", "bench_near", both)]
    ratios, cpus = [], []
    for n in range(rounds):
        got = {}
        for kind, action, args in kinds if n % 2 == 0 else kinds[::-1]:
            got[kind] = await bench.drain(
                admin,
                config,
                logs,
                lambda _: None,
                action=action,
                worker_args=args,
                beside=running_tasks,
            )
        ratios.append(100 * got["limited"]["drain_per_s"] / got["none"]["drain_per_s"])
        cpus.append(100 * got["limited"]["cpu_us_per_task"] / got["none"]["cpu_us_per_task"])
        print(
            f"round {n + 1}: "
            + ", ".join(
                f"{k} {d['drain_per_s']:,.0f} tasks/s {d['cpu_us_per_task']:,.0f} us CPU/task "
                f"(RUNNING in the database: median {d['running_median']:,.0f}, "
                f"max {d['running_max']:,.0f})"
                for k, d in got.items()
            ),
            flush=True,
        )
    print(
        f"global_limit={limit}, {config.workers} workers x concurrency {config.concurrency}, "
        f"{work_ms:g} ms of work a task: "
        f"throughput {statistics.median(ratios):.1f} % of the unlimited drain of the same "
        f"round, CPU per task {statistics.median(cpus):.1f} % (medians of {rounds} rounds)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("limit", type=int, help="the action's global_limit")
    parser.add_argument("rounds", type=int, nargs="?", default=4, help="rounds (4)")
    parser.add_argument("--work-ms", type=float, default=0.0, help="sleep per task (0)")
    args = parser.parse_args()
    asyncio.run(main(args.limit, args.rounds, args.work_ms))
