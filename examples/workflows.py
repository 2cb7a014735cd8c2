"""The example of docs/workflows.md, runnable as it is: an order is charged, then its receipt
is e-mailed and its invoice made (side by side), then it is archived with both; a report
runs once when all of it has finished, however each task ended.

    tasklease worker --handlers examples.workflows
    python -m examples.workflows          # submits one order and waits for its archive

tests/e2e/test_workflows_example.py runs it with several worker processes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from tasklease import Client, PermanentError, Task, TaskContext, handler


class Order(msgspec.Struct):
    order_id: int
    amount_cents: int = 0


@handler("charge_card", max_attempts=3)
async def charge_card(ctx: TaskContext, payload: Order) -> dict[str, Any]:
    if payload.amount_cents <= 0:
        raise PermanentError(f"order {payload.order_id}: nothing to charge")
    return {"charge_id": f"ch_{payload.order_id}", "amount_cents": payload.amount_cents}


@handler("email_receipt")
async def email_receipt(ctx: TaskContext, payload: Order) -> dict[str, Any]:
    charge = ctx.results_by_action["charge_card"]  # the charge's result, passed on
    return {"emailed": f"receipt for {charge['charge_id']}"}


@handler("make_invoice")
async def make_invoice(ctx: TaskContext, payload: Order) -> dict[str, Any]:
    charge = ctx.results_by_action["charge_card"]
    return {"invoice": f"INV-{payload.order_id}", "total_cents": charge["amount_cents"]}


@handler("archive_order")
async def archive_order(ctx: TaskContext, payload: Order) -> dict[str, Any]:
    done = ctx.results_by_action  # both of its dependencies' results, read with one query
    return {"archived": payload.order_id, "invoice": done["make_invoice"]["invoice"]}


@handler("order_report")
async def order_report(ctx: TaskContext, payload: Order) -> dict[str, Any]:
    # the fan-in task: it runs once, when every task of the order has finished
    return {"order_id": payload.order_id, "counts": ctx.dependency_counts}


async def place_order(client: Client, order_id: int, amount_cents: int) -> list[Task]:
    """charge -> [email, invoice] -> archive, and a report at the end: one transaction."""
    order = {"order_id": order_id, "amount_cents": amount_cents}
    return await client.submit_many(
        [
            {"ref": "charge", "action": "charge_card", "payload": order},
            {"ref": "email", "action": "email_receipt", "payload": order, "depends_on": ["charge"]},
            {
                "ref": "invoice",
                "action": "make_invoice",
                "payload": order,
                "depends_on": ["charge"],
            },
            {
                "ref": "archive",
                "action": "archive_order",
                "payload": order,
                "depends_on": ["email", "invoice"],
            },
        ],
        on_finish={"action": "order_report", "payload": order},
    )


async def main() -> None:
    async with Client(handlers=["examples.workflows"]) as client:
        charge, _, _, archive, report = await place_order(client, 1001, 4200)
        print(f"workflow {charge.workflow_id}: archive is task {archive.id} ({archive.state})")
        print((await client.wait(archive.id, timeout=60)).result)
        print((await client.wait(report.id, timeout=60)).result)


if __name__ == "__main__":
    asyncio.run(main())
