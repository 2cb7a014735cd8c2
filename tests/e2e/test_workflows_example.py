"""docs/workflows.md's example (examples/workflows.py) runs as the page says, on two worker
processes: results are passed on, nothing runs before what it waits for, the report (fan-in)
runs once; an order with nothing to charge cancels what waits for the charge."""

from __future__ import annotations

import asyncpg
import pytest

from examples.workflows import place_order
from tasklease import Client, TaskState
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
