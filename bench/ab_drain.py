"""Drain throughput of two trees of tasklease, side by side, interleaved (A B B A A B ...).

    git worktree add /tmp/before <commit>
    python bench/ab_drain.py /tmp/before . --rounds 6 --workers 2 [--concurrency 100]

Each round runs `tasklease.engine.tools.bench.drain()` (20,000 no-op tasks on a fresh database)
with each tree's own code (its folder first on PYTHONPATH, its worker processes too), on the
embedded PostgreSQL (TASKLEASE_DATA_DIR picks which) or DATABASE_URL. Prints each round,
then the median and range of tasks/s and of the machine's CPU per task (/proc/stat: the
database, the workers and the bench together).
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
from tasklease.engine import database
try:  # the tools moved to tasklease.engine.tools; older trees have them in the engine
    from tasklease.engine.tools import bench
except ImportError:
    from tasklease.engine import bench
dsn, server = database.resolve()
if server is not None:
    server.ensure_running()
tasks, workers = int(sys.argv[1]), int(sys.argv[2])
concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 100
config = bench.BenchConfig(tasks=tasks, workers=workers, concurrency=concurrency)
print(json.dumps(asyncio.run(bench.drain(dsn, config, Path(tempfile.mkdtemp()), lambda s: None))))
"""


def drain(
    tree: Path,
    tasks: int,
    workers: int,
    env: dict[str, str] | None = None,
    *,
    code: str = ONE_DRAIN,
    args: tuple[str, ...] = (),
) -> dict[str, float]:
    """One drain with `tree`'s code, on DATABASE_URL (in `env`, else this process's) or the
    embedded server: `code` run with the number of tasks, of workers and `args`, printing
    its figures as JSON on its last line."""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tasks), str(workers), *args],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **(env or {})},
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="the first tree (before)")
    p.add_argument("b", type=Path, help="the second tree (after)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=100, help="per worker process (100)")
    args = p.parse_args()
    trees = {"a": args.a.resolve(), "b": args.b.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for n in range(args.rounds):
        for name in ("a", "b") if n % 2 == 0 else ("b", "a"):
            d = drain(trees[name], args.tasks, args.workers, args=(str(args.concurrency),))
            runs[name].append(d)
            print(
                f"round {n} {name} ({trees[name]}): {d['drain_per_s']:,.0f}/s, "
                f"{d['cpu_us_per_task']:.0f} µs CPU per task",
                flush=True,
            )
    for name, rs in runs.items():
        rate = [r["drain_per_s"] for r in rs]
        cpu = [r["cpu_us_per_task"] for r in rs]
        print(
            f"{name} {trees[name]}: median {statistics.median(rate):,.0f}/s "
            f"({min(rate):,.0f}-{max(rate):,.0f}), CPU per task {statistics.median(cpu):.0f} µs "
            f"({min(cpu):.0f}-{max(cpu):.0f})"
        )


if __name__ == "__main__":
    main()
