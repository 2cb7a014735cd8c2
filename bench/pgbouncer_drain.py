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

Each round runs `tasklease.engine.tools.bench.drain()` (no-op tasks on a fresh database; workers
busy all along, so polling instead of LISTEN does not matter). Prints each round, then the
median and range of tasks/s and of the machine's CPU per task.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ab_drain import drain as drain_tree  # bench/ is first on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent


def drain(dsn: str, pooled: bool, tasks: int, workers: int) -> dict[str, float]:
    """One drain of this tree on `dsn` (ab_drain's), with TASKLEASE_PGBOUNCER=1 if `pooled`."""
    env = {"DATABASE_URL": dsn, "TASKLEASE_PGBOUNCER": "1" if pooled else ""}
    return drain_tree(ROOT, tasks, workers, env)


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
