"""The pooler pass (.ci/run): PgBouncer in transaction mode is really between tasklease and
the test databases, and tasklease works through it with TASKLEASE_PGBOUNCER, also with no
direct connection at all (poll only).

Skipped unless TASKLEASE_TEST_PGBOUNCER_URL names the PgBouncer (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from urllib.parse import urlsplit

import asyncpg
import pytest

from tasklease.engine import database
from tasklease.engine.client import Client
from tasklease.engine.retention import Retention, RetentionConfig
from tasklease.engine.store import Store
from tests.conftest import PGBOUNCER_URL_ENV
from tests.support.db import submit, wait_until
from tests.support.workers import Running

pytestmark = pytest.mark.skipif(
    not os.environ.get(PGBOUNCER_URL_ENV),
    reason=f"the PgBouncer pass only ({PGBOUNCER_URL_ENV} names a PgBouncer; .ci/run)",
)


def admin_console(command: str) -> list[list[str]]:
    """A SHOW command on PgBouncer's admin console (simple query protocol only: psql)."""
    url = urlsplit(os.environ[PGBOUNCER_URL_ENV])
    host, port, user = url.hostname or "127.0.0.1", str(url.port or 6432), url.username or ""
    out = subprocess.run(
        ["psql", "-AtF", "|", "-h", host, "-p", port, "-U", user, "pgbouncer", "-c", command],
        env={**os.environ, "PGPASSWORD": url.password or ""},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return [line.split("|") for line in out.stdout.splitlines()]


async def test_the_test_database_is_reached_through_pgbouncer_in_transaction_mode(
    db: str, store: Store
) -> None:
    assert urlsplit(db).port == urlsplit(os.environ[PGBOUNCER_URL_ENV]).port
    assert database.pooled()
    await store.pool.fetchval("SELECT 1")
    name = urlsplit(db).path.lstrip("/")
    pools = {row[0]: row for row in admin_console("SHOW POOLS")}
    assert name in pools, f"PgBouncer has no pool for {name}: {sorted(pools)}"
    assert pools[name][-1] == "transaction"  # pool_mode, the last column


async def test_named_statements_break_through_it(db: str) -> None:
    """What TASKLEASE_PGBOUNCER avoids: with asyncpg's default (named, cached statements) a
    pool's connections are lent other clients' server connections, where their statements
    do not exist (or exist already)."""
    pool = await asyncpg.create_pool(db, min_size=5, max_size=5)  # asyncpg's defaults
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            await pool.fetchval(f"SELECT $1::int + {i % 5}", i)
        except (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError) as e:
            errors.append(e)

    try:
        await asyncio.gather(*(one(i) for i in range(500)))
    finally:
        await pool.close()
    assert errors, "500 statements on 5 connections, all on their own server connections?"


async def test_poll_only_workers_and_client_wait(
    db: str, store: Store, workers: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TASKLEASE_PGBOUNCER=1: no direct connection at all; workers poll, Client.wait polls,
    and retention's lock holds only for its transaction."""
    monkeypatch.setenv(database.PGBOUNCER_ENV, "1")
    pooled = await Store.connect(db)
    assert pooled.listen_dsn is None
    try:
        workers.start(pooled, poll_interval=0.2)
        async with Client(db) as client:
            task = await client.submit("noop", {})
            done = await asyncio.wait_for(client.wait(task.id, timeout=20), 25)
            assert done.state == "COMPLETED"
        ids = [await submit(store, "test_sleep", '{"seconds": 0.01}') for _ in range(30)]

        async def all_done() -> bool:
            n = await store.pool.fetchval(
                "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state = 'COMPLETED'", ids
            )
            return bool(n == len(ids))

        await wait_until(all_done, "30 tasks completed by a polling worker")
        # twice in a row: each window's lock ends with its transaction, nothing is left held
        for _ in range(2):
            assert await Retention(db, RetentionConfig(pause=0)).round() is not None
    finally:
        await pooled.close()
