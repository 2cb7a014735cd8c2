"""The database's CPU per claim and per completion statement, at a given claim size.

    .venv/bin/python bench/statement_cpu.py 1 10 100

For each size: a fresh database (`statement_cpu`, created and dropped) on the embedded
server or DATABASE_URL, enough due no-op tasks, one connection with generic plans as the
workers use; 20 claims and completions to warm up, then 4,000 claims of up to SIZE tasks
back to back, then their 4,000 completions. The figure is the CPU time (user + system,
/proc/PID/stat) of that connection's backend, per statement: what the database spends on
the statement itself, its plan's start-up, its writes and its commit (WAL flush included),
on the server's own machine only (read the backend's /proc, so the server must be local).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg

from tasklease import schema
from tasklease.engine.database import resolve, with_database
from tasklease.engine.store import Store

CLAIMS = 4000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_size(admin: asyncpg.Connection, dsn: str, size: int) -> None:
    await admin.execute("DROP DATABASE IF EXISTS statement_cpu WITH (FORCE)")
    await admin.execute("CREATE DATABASE statement_cpu")
    db = with_database(dsn, "statement_cpu")
    try:
        await schema.upgrade(db)
        conn = await asyncpg.connect(db)
        await conn.execute(
            "WITH new AS (INSERT INTO tasks (action, payload) SELECT 'noop', '{}' "
            "FROM generate_series(1, $1) RETURNING id) "
            "INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt) "
            "SELECT id, 'submit', NULL, 'PENDING', 0 FROM new",
            (CLAIMS + 20) * size,
        )
        await conn.execute("ANALYZE tasks")
        await conn.close()
        store = await Store.connect(db, min_size=1, max_size=1, generic_plans=True)
        async with store.pool.acquire() as c:
            pid = await c.fetchval("SELECT pg_backend_pid()")
        leases = {"noop": 30.0}
        for _ in range(20):
            claim = await store.claim("default", leases, size, "w")
            await store.complete_many([(t.id, t.lease_token, "null") for t in claim.leased])
        batches = []
        c0 = cpu_seconds(pid)
        for _ in range(CLAIMS):
            batches.append((await store.claim("default", leases, size, "w")).leased)
        c1 = cpu_seconds(pid)
        for leased in batches:
            await store.complete_many([(t.id, t.lease_token, "null") for t in leased])
        c2 = cpu_seconds(pid)
        await store.close()
        tasks = sum(len(b) for b in batches)
        print(
            f"claims of up to {size}: {tasks / CLAIMS:.0f} tasks a claim; database CPU "
            f"{1e6 * (c1 - c0) / CLAIMS:.0f} µs a claim, {1e6 * (c2 - c1) / CLAIMS:.0f} µs "
            f"a completion statement, {1e6 * (c2 - c0) / tasks:.0f} µs a task"
        )
    finally:
        await admin.execute("DROP DATABASE IF EXISTS statement_cpu WITH (FORCE)")


async def main(sizes: list[int]) -> None:
    dsn, server = resolve()
    if server is not None:
        server.ensure_running()
    admin = await asyncpg.connect(dsn)
    try:
        for size in sizes:
            await one_size(admin, dsn, size)
    finally:
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1, 10, 100]))
