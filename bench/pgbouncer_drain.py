"""Drain throughput direct, with TASKLEASE_PGBOUNCER's connection options, and through
PgBouncer, interleaved (A B C C B A ...).

    tests/support/pgbouncer.sh start /tmp/pgb 6432 127.0.0.1 5432
    python bench/pgbouncer_drain.py \\
        --direct postgresql://postgres:tasklease@127.0.0.1:5432/postgres \\
        --pooler postgresql://postgres:tasklease@127.0.0.1:6432/postgres --rounds 3

- direct: DATABASE_URL to PostgreSQL, asyncpg's named, cached statements and generic plans
  (the default);
- unnamed: the same server, TASKLEASE_PGBOUNCER=1 (unnamed statements, planned each time):
  what the setting itself costs;
- pgbouncer: through PgBouncer in transaction mode, TASKLEASE_PGBOUNCER=1.

Each round runs `tasklease.engine.bench.drain()` (no-op tasks on a fresh database; workers
busy all along, so polling instead of LISTEN does not matter). Prints each round, then the
median and range of tasks/s and of the machine's CPU per task.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ONE_DRAIN = """
import asyncio, json, sys, tempfile
from pathlib import Path
from tasklease.engine import bench
config = bench.BenchConfig(tasks=int(sys.argv[2]), workers=int(sys.argv[3]))
print(json.dumps(asyncio.run(bench.drain(sys.argv[1], config, Path(tempfile.mkdtemp()),
                                         lambda s: None))))
"""
ROOT = Path(__file__).resolve().parent.parent


def drain(dsn: str, pooled: bool, tasks: int, workers: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": dsn}
    env.pop("TASKLEASE_PGBOUNCER", None)
    if pooled:
        env["TASKLEASE_PGBOUNCER"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", ONE_DRAIN, dsn, str(tasks), str(workers)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--direct", required=True, help="an admin DSN of PostgreSQL itself")
    p.add_argument("--pooler", required=True, help="the same through PgBouncer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=20_000)
    args = p.parse_args()
    modes = {
        "direct": (args.direct, False),
        "unnamed": (args.direct, True),
        "pgbouncer": (args.pooler, True),
    }
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for n in range(args.rounds):
        for mode in list(modes) if n % 2 == 0 else list(reversed(modes)):
            d = drain(*modes[mode], args.tasks, args.workers)
            runs[mode].append(d)
            print(
                f"round {n} {mode}: {d['drain_per_s']:,.0f}/s, "
                f"{d['cpu_us_per_task']:.0f} µs CPU per task",
                flush=True,
            )
    for mode, rs in runs.items():
        rate = [r["drain_per_s"] for r in rs]
        cpu = [r["cpu_us_per_task"] for r in rs]
        print(
            f"{mode}: median {statistics.median(rate):,.0f}/s "
            f"({min(rate):,.0f}-{max(rate):,.0f}), CPU per task {statistics.median(cpu):.0f} µs "
            f"({min(cpu):.0f}-{max(cpu):.0f})"
        )


if __name__ == "__main__":
    main()
