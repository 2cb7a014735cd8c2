"""Drain N no-op jobs with pgqueuer, the way its own benchmark does (tools/benchmark.py,
drain strategy): Q queue managers on connections of their own, dequeue batches of B,
uvloop; in one process, or P processes side by side. For docs/benchmarks.md.

pgqueuer is not a dependency of tasklease; run this from a scratch virtual environment:

    python3 -m venv /tmp/pgq && /tmp/pgq/bin/pip install 'pgqueuer==1.6.*' uvloop
    /tmp/pgq/bin/python bench/pgqueuer_drain.py --dsn postgresql://... --jobs 20000

It creates a database of its own next to the one in --dsn and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import uvloop
from pgqueuer import AsyncpgDriver, PgQueuer, Queries
from pgqueuer.models import Job
from pgqueuer.types import QueueExecutionMode


async def consume(db: str, managers: int, batch: int) -> int:
    done = 0
    queues = []
    for _ in range(managers):
        pgq = PgQueuer(AsyncpgDriver(await asyncpg.connect(db)))

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        queues.append(pgq)
    await asyncio.gather(*(q.run(batch_size=batch, mode=QueueExecutionMode.drain) for q in queues))
    return done


async def drain(dsn: str, jobs: int, managers: int, batch: int, processes: int) -> float:
    admin = await asyncpg.connect(dsn)
    name = f"pgqueuer_bench_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE DATABASE {name}")
    db = urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))
    try:
        setup = await asyncpg.connect(db)
        queries = Queries(AsyncpgDriver(setup))
        await queries.install()
        for start in range(0, jobs, 5000):
            n = min(5000, jobs - start)
            await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
        await setup.execute("ANALYZE")
        began = time.perf_counter()
        if processes == 1:
            done = await consume(db, managers, batch)
        else:
            children = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--consume",
                    db,
                    "--managers",
                    str(managers),
                    "--batch",
                    str(batch),
                    stdout=asyncio.subprocess.PIPE,
                )
                for _ in range(processes)
            ]
            outs = [await c.communicate() for c in children]
            done = sum(int(out.decode()) for out, _ in outs)
        elapsed = time.perf_counter() - began
        assert done == jobs, (done, jobs)
        return jobs / elapsed
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn")
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--managers", type=int, default=5)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--consume", metavar="DSN", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.consume:
        print(uvloop.run(consume(args.consume, args.managers, args.batch)))
        return
    for _ in range(args.runs):
        rate = uvloop.run(drain(args.dsn, args.jobs, args.managers, args.batch, args.processes))
        print(
            f"pgqueuer drain: {args.jobs} jobs, {args.processes} process(es) x "
            f"{args.managers} managers, batch {args.batch}: {rate:,.0f} jobs/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
