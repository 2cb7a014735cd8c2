"""docs/library.md's example: an order and its receipt e-mail enqueued in one transaction of
the application's own, and a handler whose write commits together with its completion.

Run the worker with `tasklease worker --handlers examples.library`; the application side
is `place_order` (asyncpg) or `place_order_sync` (SQLAlchemy Session on psycopg).
"""

from __future__ import annotations

import asyncpg
import msgspec
from sqlalchemy import text
from sqlalchemy.orm import Session

from tasklease import Client, SyncClient, TaskContext, handler

ORDERS = """
CREATE TABLE IF NOT EXISTS orders (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item         text NOT NULL,
    receipt_sent boolean NOT NULL DEFAULT false
)"""


class Receipt(msgspec.Struct):
    order_id: int


@handler("send_receipt", max_attempts=3)
async def send_receipt(ctx: TaskContext, payload: Receipt) -> None:
    ...  # send the e-mail (at least once: a retry may send it again)
    async with ctx.transaction() as conn:
        # committed only together with the task's completion, under its lease: never twice
        await conn.execute("UPDATE orders SET receipt_sent = true WHERE id = $1", payload.order_id)
        ctx.set_result({"order": payload.order_id})


async def place_order(client: Client, conn: asyncpg.Connection, item: str) -> int:
    """The order and its task commit together, or neither does."""
    async with conn.transaction():
        order_id: int = await conn.fetchval(
            "INSERT INTO orders (item) VALUES ($1) RETURNING id", item
        )
        await client.submit("send_receipt", Receipt(order_id), connection=conn)
    return order_id


def place_order_sync(client: SyncClient, session: Session, item: str) -> int:
    """The same from sync code, in a SQLAlchemy Session (psycopg 3)."""
    with session.begin():
        order_id: int = session.execute(
            text("INSERT INTO orders (item) VALUES (:item) RETURNING id"), {"item": item}
        ).scalar_one()
        client.submit("send_receipt", Receipt(order_id), connection=session)
    return order_id
