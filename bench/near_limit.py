"""A global limit just above the load: drains of an action under `global_limit=LIMIT`
against drains with no limit, in turns, with `tasklease bench`'s drain (2 workers x
concurrency 100, 20,000 no-op tasks).

    .venv/bin/python bench/near_limit.py 250 [ROUNDS]

On the server of DATABASE_URL, else the embedded one, as every tasklease command.
docs/benchmarks.md quotes its output. The handler lives in this file: workers import it as
`near_limit` (this directory is put on their PYTHONPATH), with the limit from
TASKLEASE_BENCH_NEAR_LIMIT.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from engine import TaskContext, handler

LIMIT = int(os.environ.get("TASKLEASE_BENCH_NEAR_LIMIT", "250"))
HERE = str(Path(__file__).resolve().parent)


@handler("bench_near", global_limit=LIMIT)
async def bench_near(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under a global limit a little above the load."""


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


async def main(limit: int, rounds: int) -> None:
    from engine import bench
    from engine.cli import database_url

    os.environ["TASKLEASE_BENCH_NEAR_LIMIT"] = str(limit)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    admin, config, logs = database_url(), bench.BenchConfig(), Path(tempfile.mkdtemp())
    kinds = [("none", "noop", ()), ("limited", "bench_near", ("--handlers", "near_limit"))]
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
        f"global_limit={limit}, {config.workers} workers x concurrency {config.concurrency}: "
        f"throughput {statistics.median(ratios):.1f} % of the unlimited drain of the same "
        f"round, CPU per task {statistics.median(cpus):.1f} % (medians of {rounds} rounds)"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4))
