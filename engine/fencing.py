"""Transactional completion: a handler's own writes and its task's completion commit together,
guarded by the lease token.

    async with ctx.transaction() as conn:      # asyncpg, or ctx.session() for SQLAlchemy
        await conn.execute("INSERT INTO invoices ...")
        ctx.set_result({"invoice": 7})

At the end of the block the task moves RUNNING -> COMPLETED in that same transaction, by the
one statement every completion uses (`task_complete_many_if_leased`), and then it commits. If
the lease was lost meanwhile (the task was reclaimed by another worker), the guard matches no
row: the whole transaction, the handler's writes included, is rolled back and LeaseLost is
raised in the handler. The guard runs after the handler's last statement, in the outermost
transaction, so no savepoint of the handler's can catch it; a handler that ends the
transaction itself (a raw COMMIT or ROLLBACK) gets an error and no completion.

A commit whose reply is lost (the connection dropped) is settled by `task_lease_outcome`:
COMPLETED under this token means it committed.

Handlers' transactions use a pool of their own (created on first use, as large as the
worker's concurrency), so a handler holding a transaction can never starve the worker's
claims and heartbeats of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg

from tasklease.engine import database
from tasklease.engine.queries import SQL
from tasklease.engine.registry import LeaseLost
from tasklease.engine.store import TRANSIENT_ERRORS, Store

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

log = logging.getLogger("tasklease.worker")
OUTCOME_TRIES = 5


class Fence:
    def __init__(self, store: Store, max_size: int = 10) -> None:
        self.store = store
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._engine: AsyncEngine | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._engine is not None:
            await self._engine.dispose()

    async def _connections(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.store.dsn,
                    min_size=0,
                    max_size=self.max_size,
                    **database.connect_options("tasklease-handler"),
                )
            return self._pool

    async def _sqlalchemy(self) -> AsyncEngine:
        async with self._lock:
            if self._engine is None:
                from sqlalchemy.ext.asyncio import create_async_engine

                self._engine = create_async_engine(
                    "postgresql+asyncpg://",
                    connect_args=database.sqlalchemy_connect_args(
                        self.store.dsn, "tasklease-handler"
                    ),
                    pool_size=self.max_size,
                    max_overflow=0,
                )
            return self._engine

    @asynccontextmanager
    async def transaction(
        self, task_id: int, token: uuid.UUID, result_json: Callable[[], str]
    ) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._connections()
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                yield conn
                await self._complete(conn, task_id, token, result_json())
            except BaseException:
                if not conn.is_closed() and conn.is_in_transaction():
                    with contextlib.suppress(*TRANSIENT_ERRORS, asyncpg.PostgresError):
                        await tx.rollback()
                raise
            await self._commit(tx.commit, task_id, token)

    @asynccontextmanager
    async def session(
        self, task_id: int, token: uuid.UUID, result_json: Callable[[], str]
    ) -> AsyncIterator[AsyncSession]:
        from sqlalchemy.ext.asyncio import AsyncSession

        async with AsyncSession(await self._sqlalchemy(), expire_on_commit=False) as session:
            try:
                yield session
                await session.flush()
                conn = await session.connection()
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                if not driver.is_in_transaction():  # SQLAlchemy begins on its first statement
                    await conn.exec_driver_sql("SELECT 1")
                await self._complete(driver, task_id, token, result_json())
            except BaseException:
                with contextlib.suppress(Exception):
                    await session.rollback()
                raise
            await self._commit(session.commit, task_id, token)

    async def _complete(
        self, conn: asyncpg.Connection, task_id: int, token: uuid.UUID, result_json: str
    ) -> None:
        if not conn.is_in_transaction():
            raise RuntimeError(
                f"task {task_id}: the handler ended its transaction itself (COMMIT or ROLLBACK "
                "inside ctx.transaction()); nothing was completed"
            )
        moved = await conn.fetch(
            SQL["task_complete_many_if_leased"], [task_id], [token], [result_json]
        )
        if not moved:
            raise LeaseLost(
                f"task {task_id}: the lease was lost (another worker took the task over); "
                "this transaction is rolled back"
            )

    async def _commit(self, commit: Callable[[], Any], task_id: int, token: uuid.UUID) -> None:
        try:
            await commit()
        except TRANSIENT_ERRORS as exc:
            if not await self._committed(task_id, token):
                raise
            log.warning("task %d: commit reply lost (%s), but it committed", task_id, exc)

    async def _committed(self, task_id: int, token: uuid.UUID) -> bool:
        """After a lost commit reply: did the completion (and so the transaction) commit?"""
        for attempt in range(OUTCOME_TRIES):
            try:
                row = await self.store.lease_outcome(task_id, token)
                return row is not None and row["ours"] and row["state"] == "COMPLETED"
            except TRANSIENT_ERRORS:
                await asyncio.sleep(0.5 * 2**attempt)
        return False
