"""EXPLAIN (ANALYZE, BUFFERS) of the claim beside 1,000,000 finished tasks, without and
with global limits (each far above the load, half of each limit's tokens held), and of the
claim with limits (task_claim_due_limited) under a per-key one: 10,000 due tasks of 100
customers, 50 of them at their cap of 2 (100 RUNNING), the others' tokens made.

    .venv/bin/python bench/explain_claim.py

On the server of DATABASE_URL, else the embedded one (started if need be), as every
tasklease command. Creates and drops the database `explain_claim`. docs/benchmarks.md quotes
its output.
"""

from __future__ import annotations

import asyncio

import asyncpg

from tasklease import schema
from tasklease.engine.database import resolve, with_database
from tasklease.engine.queries import CLAIM, CLAIM_LIMITED, SQL

ARGS = ("default", ["noop"], 10, "w", [30.0], 300.0)
LIMITS = {"queue:default": None, "action:noop": None, "rate:noop": 1.0}


async def set_limits(conn: asyncpg.Connection) -> None:
    for key, per in LIMITS.items():
        await conn.execute(SQL["limit_set"], key, 100_000, per, True, None)
    await conn.execute("""
        UPDATE limit_tokens SET task_id = -n WHERE n % 2 = 0 AND key NOT LIKE 'rate:%';
        UPDATE limit_tokens SET free_at = now() + interval '1 hour'
        WHERE n % 2 = 0 AND key LIKE 'rate:%'""")
    await conn.execute("VACUUM ANALYZE limit_tokens")


async def main(admin: str) -> None:
    conn = await asyncpg.connect(admin)
    await conn.execute("DROP DATABASE IF EXISTS explain_claim WITH (FORCE)")
    await conn.execute("CREATE DATABASE explain_claim")
    await conn.close()
    dsn = with_database(admin, "explain_claim")
    await schema.upgrade(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("""
            INSERT INTO tasks (action, payload, state, attempt, result, worker, lease_token,
                               created_at, updated_at, due_at)
            SELECT 'noop', '{}', 'COMPLETED', 1, 'null', 'old', gen_random_uuid(),
                   now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
            FROM generate_series(1, 1000000);
            INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, at)
            SELECT id, t.trigger, t.from_state::task_state, t.to_state::task_state, t.attempt,
                   now() - interval '1 day'
            FROM tasks, (VALUES ('submit', NULL, 'PENDING', 0),
                                ('claim', 'PENDING', 'RUNNING', 1),
                                ('complete', 'RUNNING', 'COMPLETED', 1))
                         AS t(trigger, from_state, to_state, attempt);
            INSERT INTO tasks (action, payload)
            SELECT 'noop', '{}' FROM generate_series(1, 10000)""")
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("VACUUM ANALYZE task_transitions")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for title in ("no limits, aging 300 s", "aging, queue, concurrency and rate limits"):
            if "limits" in title and "no limits" not in title:
                await set_limits(conn)
            # under limits, a worker runs the claim with the limits joined in
            claim = CLAIM if "no limits" in title else CLAIM_LIMITED
            explain = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + claim
            for _ in range(3):  # the last of three, each rolled back
                tr = conn.transaction()
                await tr.start()
                rows = await conn.fetch(explain, *ARGS)
                await tr.rollback()
            print(f"===== {title}")
            print("\n".join(r[0] for r in rows))
        await conn.execute("""
            DELETE FROM limits;
            UPDATE tasks SET payload = jsonb_build_object('customer', 'c' || id % 100)
            WHERE state = 'PENDING';
            INSERT INTO tasks (action, payload, state, attempt, lease_expires_at, lease_token,
                               worker, limit_key, key_token)
            SELECT 'noop', jsonb_build_object('customer', 'c' || (g % 50) * 2), 'RUNNING', 1,
                   now() + interval '1 hour', gen_random_uuid(), 'w', 'c' || (g % 50) * 2,
                   1 + g / 50
            FROM generate_series(0, 99) g""")
        await conn.execute(SQL["limit_set"], "key:noop", 2, None, True, "customer")
        await conn.execute("""
            INSERT INTO limit_key_tokens (key, sub, n, task_id)
            SELECT 'key:noop', limit_key, key_token, id FROM tasks WHERE state = 'RUNNING';
            INSERT INTO limit_key_tokens (key, sub, n)
            SELECT 'key:noop', 'c' || (g % 50) * 2 + 1, 1 + g / 50 FROM generate_series(0, 99) g""")
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("VACUUM ANALYZE limit_key_tokens")
        explain = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + CLAIM_LIMITED
        for _ in range(3):
            tr = conn.transaction()
            await tr.start()
            rows = await conn.fetch(explain, *ARGS)
            await tr.rollback()
        print("===== per-key limit of 2, 100 customers, 50 at their cap (task_claim_due_limited)")
        print("\n".join(r[0] for r in rows))
    finally:
        await conn.close()
        admin_conn = await asyncpg.connect(admin)
        await admin_conn.execute("DROP DATABASE IF EXISTS explain_claim WITH (FORCE)")
        await admin_conn.close()


if __name__ == "__main__":
    admin, server = resolve()
    if server is not None:
        server.ensure_running()
    asyncio.run(main(admin))
