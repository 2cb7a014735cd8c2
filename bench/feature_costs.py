"""What each optional feature costs a drain, used and unused, in interleaved rounds.

    .venv/bin/python bench/feature_costs.py --rounds 4

Each round drains --tasks no-op tasks (fresh database, 2 workers x 100, this tree's code,
`tasklease.engine.tools.bench.drain`) once per case, each round starting with the next case:

  plain       nothing optional in use: no limit, no schedule, retention off, no API
  schedules   the workers also load a handler declared `every=1` (tests/support/scheduled.py):
              each runs the scheduler service, and one periodic task a second is submitted
              and run beside the drain
  retention   the workers keep finished tasks for an hour (`--retain-finished 3600
              --retention-interval 1`): a retention round a second, which finds nothing
              old enough to delete (the cost of having it on; pruning a backlog while a drain
              runs is `tasklease bench --only retention`)
  dashboard   an API process on the database, and a dashboard tab open on it: the overview
              fragment fetched every 2 s, as htmx does, through the drain

Prints each drain, then per case the median (and range) of its rate as a share of the same
round's plain drain, and of its CPU per task (the machine's, /proc/stat: database, workers,
API and this process). On the embedded PostgreSQL or DATABASE_URL. docs/benchmarks.md
("What each feature costs") quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasklease.engine import database
from tasklease.engine.tools import bench
from tasklease.engine.tools.cluster import Cluster

CASES = ("plain", "schedules", "retention", "dashboard")


def open_tab(log_dir: Path) -> Callable[[str], Any]:
    """An API process on the drain's database and one dashboard tab polling it, until no
    task is left to run."""

    async def tab(dsn: str) -> dict[str, float]:
        api = Cluster(dsn, log_dir, "tasklease.engine.tools.bench", log_level="warning")
        url = api.api() + "/ui/fragments/overview"
        conn = await database.connect(dsn, "tasklease-bench-tab")
        fetched = 0
        try:
            while await conn.fetchval(
                "SELECT EXISTS (SELECT FROM tasks WHERE state = 'PENDING') "
                "OR EXISTS (SELECT FROM tasks WHERE lease_expires_at IS NOT NULL)"
            ):
                try:
                    await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
                    fetched += 1
                except OSError:
                    if fetched:
                        raise
                    await asyncio.sleep(0.1)  # still starting
                    continue
                await asyncio.sleep(2.0)
            return {"fetched": fetched}
        finally:
            await conn.close()
            api.stop()

    return tab


async def one(dsn: str, case: str, tasks: int) -> dict[str, float]:
    config = bench.BenchConfig(tasks=tasks, workers=2)
    log_dir = Path(tempfile.mkdtemp(prefix=f"feature-{case}-"))
    worker_args: tuple[str, ...] = ()
    beside = None
    if case == "schedules":
        worker_args = ("--handlers", "tasklease.engine.tools.bench", "tests.support.scheduled")
    elif case == "retention":
        worker_args = ("--retain-finished", "3600", "--retention-interval", "1")
    elif case == "dashboard":
        beside = open_tab(log_dir)
    return await bench.drain(
        dsn, config, log_dir, lambda s: None, worker_args=worker_args, beside=beside
    )


async def main(args: argparse.Namespace) -> None:
    dsn, server = database.resolve()
    if server is not None:
        server.ensure_running()
    cases = [c for c in CASES if c in args.cases.split(",")]
    ratios: dict[str, list[tuple[float, float]]] = {c: [] for c in cases if c != "plain"}
    for r in range(args.rounds):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        got: dict[str, dict[str, float]] = {}
        for case in order:
            got[case] = await one(dsn, case, args.tasks)
            print(
                f"round {r + 1} {case}: {got[case]['drain_per_s']:,.0f}/s, "
                f"{got[case]['cpu_us_per_task']:.0f} µs CPU per task"
                + (f", {got[case]['fetched']:.0f} refreshes" if "fetched" in got[case] else ""),
                flush=True,
            )
        for case in ratios:
            ratios[case].append(
                (
                    got[case]["drain_per_s"] / got["plain"]["drain_per_s"],
                    got[case]["cpu_us_per_task"] / got["plain"]["cpu_us_per_task"],
                )
            )
    for case, pairs in ratios.items():
        rate = [a for a, _ in pairs]
        cpu = [b for _, b in pairs]
        print(
            f"{case}: drain {100 * statistics.median(rate):.1f} % of plain "
            f"({100 * min(rate):.1f}-{100 * max(rate):.1f}), CPU per task "
            f"{100 * statistics.median(cpu):.1f} % ({100 * min(cpu):.1f}-{100 * max(cpu):.1f})"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tasks", type=int, default=60_000)
    p.add_argument("--cases", default=",".join(CASES), help="plain is always measured")
    a = p.parse_args()
    if "plain" not in a.cases.split(","):
        sys.exit("--cases must include plain")
    asyncio.run(main(a))
