"""docs/library.md's example (examples/library.py) runs as the page says, with a worker
process: orders placed in the application's transactions, receipts marked in the handler's."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from examples.library import ORDERS, place_order, place_order_sync
from tasklease import Client, SyncClient, TaskState
from tests.support.db import connect_db
from tests.support.procs import Procs

pytestmark = pytest.mark.slow


async def test_the_library_example_runs(procs: Procs, db: str, conn: asyncpg.Connection) -> None:
    await conn.execute(ORDERS)
    procs.worker("worker", "--handlers", "examples.library")
    async with Client(db, handlers=["examples.library"]) as client:
        mine = await connect_db(db)
        try:
            order = await place_order(client, mine, "teapot")
            with pytest.raises(ZeroDivisionError):
                async with mine.transaction():
                    await client.submit("send_receipt", {"order_id": 999}, connection=mine)
                    _ = 1 / 0  # the application fails: no task either
        finally:
            await mine.close()
        engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with SyncClient(db, handlers=["examples.library"]) as sync, Session(engine) as s:
                sync_order = await asyncio.to_thread(place_order_sync, sync, s, "kettle")
        finally:
            engine.dispose()
        tasks = await conn.fetch("SELECT id, payload FROM tasks ORDER BY id")
        assert [t["payload"] for t in tasks] == [
            f'{{"order_id": {order}}}',
            f'{{"order_id": {sync_order}}}',
        ]
        for t in tasks:
            done = await client.wait(t["id"], timeout=60)
            assert done.state is TaskState.COMPLETED and done.attempt == 1
    rows = await conn.fetch("SELECT item, receipt_sent FROM orders ORDER BY id")
    assert [(r["item"], r["receipt_sent"]) for r in rows] == [("teapot", True), ("kettle", True)]
