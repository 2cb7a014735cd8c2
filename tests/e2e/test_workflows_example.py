"""docs/workflows.md's example (examples/workflows.py) runs as the page says, on two worker
processes: results are passed on, nothing runs before what it waits for, the report (fan-in)
runs once; an order with nothing to charge cancels what waits for the charge."""

from __future__ import annotations

import asyncpg
import pytest

from examples.workflows import place_order
from tasklease import Client, TaskState
from tests.support.db import wait_until
from tests.support.procs import Procs

pytestmark = pytest.mark.slow
S = TaskState


async def test_the_order_workflow_runs(procs: Procs, db: str, conn: asyncpg.Connection) -> None:
    procs.worker("w1", "--handlers", "examples.workflows")
    procs.worker("w2", "--handlers", "examples.workflows")
    async with Client(db, handlers=["examples.workflows"]) as client:
        charge, email, invoice, archive, report = await place_order(client, 1001, 4200)
        assert [t.state for t in (charge, email, invoice, archive, report)] == [
            S.PENDING,
            S.WAITING,
            S.WAITING,
            S.WAITING,
            S.WAITING,
        ]
        done = await client.wait(archive.id, timeout=60)
        assert done.state is S.COMPLETED
        assert done.result == {"archived": 1001, "invoice": "INV-1001"}
        assert (await client.get(email.id)).result == {"emailed": "receipt for ch_1001"}
        assert (await client.get(invoice.id)).result == {
            "invoice": "INV-1001",
            "total_cents": 4200,
        }
        finished = await client.wait(report.id, timeout=60)
        assert finished.result == {"order_id": 1001, "counts": {"COMPLETED": 4}}
        members = await client.workflow(charge.workflow_id)
        assert [t.id for t in members] == [t.id for t in (charge, email, invoice, archive, report)]

        # nothing to charge: the charge is DEAD, what waits for it is cancelled; the report
        # still runs, once, and counts it
        *cancelled_order, report = await place_order(client, 1002, 0)
        finished = await client.wait(report.id, timeout=60)
        assert finished.result == {"order_id": 1002, "counts": {"DEAD": 1, "CANCELLED": 3}}
        states = [(await client.get(t.id)).state for t in cancelled_order]
        assert states == [S.DEAD, S.CANCELLED, S.CANCELLED, S.CANCELLED]
    claims = await conn.fetch(
        "SELECT task_id, count(*) AS n FROM task_transitions WHERE trigger = 'claim' "
        "GROUP BY task_id"
    )
    assert {r["task_id"]: r["n"] for r in claims}[report.id] == 1


async def test_the_pages_http_batch_runs(procs: Procs, conn: asyncpg.Connection) -> None:
    """The JSON that docs/workflows.md posts to /tasks/batch, as it is on the page."""
    import json
    import re
    from pathlib import Path

    import httpx

    page = (Path(__file__).resolve().parents[2] / "docs" / "workflows.md").read_text()
    block = re.search(r"```json\n(.*?)```", page, re.DOTALL)
    assert block is not None, "docs/workflows.md has no JSON example"
    body = json.loads(block.group(1))
    _, url = procs.api("--handlers", "examples.workflows")
    procs.worker("w1", "--handlers", "examples.workflows")
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/tasks/batch", json=body)
        assert r.status_code == 201, r.text
        made = r.json()
        report = made["on_finish"]["id"]

        async def finished() -> bool:
            return (await http.get(f"/tasks/{report}")).json()["state"] == "COMPLETED"

        await wait_until(finished, "the order's report")
        wf = (await http.get(f"/workflows/{made['workflow_id']}")).json()
    assert wf["finished"] and wf["states"] == {"COMPLETED": 5}
    archive = next(t for t in wf["tasks"] if t["action"] == "archive_order")
    assert archive["result"] == {"archived": 1001, "invoice": "INV-1001"}
