"""Drain of N tasks as N/4 diamonds (a -> [b, c] -> d, docs/workflows.md) against N
independent tasks, interleaved (I D D I I D ...), with this tree's code.

    python bench/workflow_drain.py --rounds 8 --tasks 4000 --workers 2

Each round runs `tasklease.engine.tools.bench.drain()` (a fresh database, the tasks inserted in
bulk, ANALYZE, CHECKPOINT; W worker processes x concurrency 100; tasks / (last complete -
first claim), by the database clock) once each way. Prints each round, then medians and
ranges of tasks/s and of the machine's CPU per task, and the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ab_drain import drain as drain_tree  # bench/ is first on sys.path when run as a script

ONE_DRAIN = """
import asyncio, json, sys, tempfile
from pathlib import Path
from tasklease.engine import database
from tasklease.engine.tools import bench
dsn, server = database.resolve()
if server is not None:
    server.ensure_running()
config = bench.BenchConfig(tasks=int(sys.argv[1]), workers=int(sys.argv[2]))
print(json.dumps(asyncio.run(bench.drain(dsn, config, Path(tempfile.mkdtemp()), lambda s: None,
                                         diamonds=sys.argv[3] == "diamonds"))))
"""
TREE = Path(__file__).resolve().parents[1]


def drain(kind: str, tasks: int, workers: int) -> dict[str, float]:
    return drain_tree(TREE, tasks, workers, code=ONE_DRAIN, args=(kind,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=4000)
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"independent": [], "diamonds": []}
    for n in range(args.rounds):
        for kind in ("independent", "diamonds") if n % 2 == 0 else ("diamonds", "independent"):
            d = drain(kind, args.tasks, args.workers)
            runs[kind].append(d)
            print(
                f"round {n} {kind}: {d['drain_per_s']:,.0f}/s, {d['cpu_us_per_task']:.0f} µs "
                f"CPU per task, {d['tasks_per_claim']:.1f} tasks per claim, "
                f"{d['tasks_per_complete']:.1f} per complete",
                flush=True,
            )
    for kind, rs in runs.items():
        rate = [r["drain_per_s"] for r in rs]
        cpu = [r["cpu_us_per_task"] for r in rs]
        print(
            f"{kind}: median {statistics.median(rate):,.0f}/s ({min(rate):,.0f}-{max(rate):,.0f}),"
            f" CPU per task {statistics.median(cpu):.0f} µs ({min(cpu):.0f}-{max(cpu):.0f})"
        )
    ratios = [
        d["drain_per_s"] / i["drain_per_s"]
        for d, i in zip(runs["diamonds"], runs["independent"], strict=True)
    ]
    print(
        f"diamonds / independent, same round: median {statistics.median(ratios):.1%} "
        f"({min(ratios):.1%}-{max(ratios):.1%})"
    )


if __name__ == "__main__":
    main()
