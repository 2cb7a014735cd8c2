"""docs/scheduling.md's examples (examples/scheduling.py) run as the page says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from tests.support.db import wait_until
from tests.support.procs import Procs


async def test_the_scheduling_examples_run(procs: Procs, conn: asyncpg.Connection) -> None:
    _, url = procs.api("--handlers", "examples.scheduling")
    procs.worker("worker", "--handlers", "examples.scheduling")

    async def worker_up() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM processes WHERE kind = 'worker'"))

    await wait_until(worker_up, "the worker to start")
    ready_at = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    async with httpx.AsyncClient(base_url=url) as http:
        submitted = [
            (await http.post("/tasks", json=body)).json()
            for body in (
                {"action": "send_email", "payload": {"to": "ada@example.com"}},
                {"action": "build_report", "payload": {"name": "q3"}, "timeout_seconds": 30},
                {"action": "wait_for_export", "payload": {"ready_at": ready_at}},
                {"action": "send_invoice", "payload": {"customer_id": "c1", "amount": 10}},
            )
        ]
        assert [t["state"] for t in submitted] == ["PENDING"] * 4, submitted

        async def all_done() -> bool:
            states = [(await http.get(f"/tasks/{t['id']}")).json()["state"] for t in submitted]
            return states == ["COMPLETED"] * 4

        await wait_until(all_done, "the example tasks to complete")
        export = (await http.get(f"/tasks/{submitted[2]['id']}/transitions")).json()
        assert "snooze" in [h["trigger"] for h in export]
        schedules = {s["name"]: s for s in (await http.get("/schedules")).json()}
        limits = {lim["key"]: lim for lim in (await http.get("/limits")).json()}
    assert (limits["key:send_invoice"]["value"], limits["key:send_invoice"]["by"]) == (
        5,
        "customer_id",
    )
    assert set(schedules) == {"nightly_report", "status-ping"}
    nightly = schedules["nightly_report"]
    assert (nightly["cron"], nightly["timezone"], nightly["missed"]) == (
        "0 3 * * *",
        "Europe/Paris",
        "once",
    )
    assert schedules["status-ping"]["payload"] == {"target": "status-page"}
    assert datetime.fromisoformat(nightly["next_run_at"]) > datetime.now(UTC)
