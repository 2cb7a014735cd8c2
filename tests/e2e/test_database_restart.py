"""A worker and the API outlive a restart of the database server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tasklease import schema
from tasklease.engine.embedded import Embedded
from tests.conftest import EXECUTIONS_TABLE, not_in_pooler_pass
from tests.support.db import (
    assert_completed_once,
    assert_histories_are_paths,
    connect_db,
    wait_until,
)
from tests.support.procs import Procs


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Embedded]:
    """A PostgreSQL server of this test's own, since the test stops it."""
    server = Embedded(tmp_path / "pg")
    server.ensure_running()
    yield server
    server.stop()


@not_in_pooler_pass("it restarts a PostgreSQL server of its own, with no PgBouncer in front")
async def test_worker_and_api_survive_a_database_restart(
    own_server: Embedded, tmp_path: Path
) -> None:
    dsn = own_server.dsn()
    await schema.upgrade(dsn)
    conn = await connect_db(dsn)
    await conn.execute(EXECUTIONS_TABLE)
    await conn.close()
    procs = Procs(tmp_path, {"DATABASE_URL": dsn})
    try:
        worker = procs.worker("worker", "--concurrency", "4")
        _, url = procs.api()
        async with httpx.AsyncClient(base_url=url) as http:

            async def submit(n: int, seconds: float) -> list[int]:
                ids = []
                for _ in range(n):
                    r = await http.post(
                        "/tasks", json={"action": "test_sleep", "payload": {"seconds": seconds}}
                    )
                    assert r.status_code == 201, r.text
                    ids.append(r.json()["id"])
                return ids

            conn = await connect_db(dsn)

            async def completed(ids: list[int]) -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state = 'COMPLETED'", ids
                )
                return bool(n == len(ids))

            async def started(ids: list[int]) -> bool:
                n = await conn.fetchval(
                    "SELECT count(DISTINCT task_id) FROM executions WHERE task_id = ANY($1)", ids
                )
                return bool(n == len(ids))

            ids = await submit(30, 0.02)
            await wait_until(lambda: completed(ids), "the first batch to complete")
            # two handlers that finish while the server is away must record their outcome
            # once it is back; the free slots keep the claim loop polling through the outage
            in_flight = await submit(2, 1.0)
            await wait_until(lambda: started(in_flight), "the slow handlers to start")
            await conn.close()
            await asyncio.to_thread(own_server.stop)
            down = await http.post("/tasks", json={"payload": {"action": "noop"}})
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == "2"
            not_ready = await http.get("/readyz")
            assert not_ready.status_code == 503, not_ready.text
            assert not_ready.json()["detail"].startswith("database unreachable")
            assert (await http.get("/healthz")).status_code == 200
            await asyncio.sleep(2)  # the slow handlers finish while the server is away
            await asyncio.to_thread(own_server.ensure_running)

            async def api_back() -> bool:
                ready = (await http.get("/readyz")).status_code == 200
                return ready and (await http.get("/tasks/1")).status_code == 200

            await wait_until(api_back, "the API to reach the database again")
            ids += in_flight + await submit(30, 0.02)
            conn = await connect_db(dsn)
            try:
                await wait_until(lambda: completed(ids), "every task to complete", 60)
                await assert_completed_once(conn)
                await assert_histories_are_paths(conn)
            finally:
                await conn.close()
        assert worker.popen.poll() is None, "the worker died with the database"
        log = worker.output()
        assert "cannot claim" in log and "database reachable again" in log, log
        assert "cannot record" in log and "outcome(s) (" in log, log
    finally:
        procs.stop_all()
