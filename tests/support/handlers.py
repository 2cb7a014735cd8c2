"""Handlers used by the tests; workers load them with `--handlers tests.support.handlers`.

Each execution appends a row to `executions` (created by the tests), so a test can
count how often a task ran, whatever process ran it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg
import msgspec

from engine import PermanentError, TaskContext, handler


class Sleep(msgspec.Struct):
    seconds: float = 0.0
    fail: bool = False


async def record(ctx: TaskContext) -> None:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        await conn.execute(
            "INSERT INTO executions (task_id, attempt, worker, token) VALUES ($1, $2, $3, $4)",
            ctx.task_id,
            ctx.attempt,
            ctx.worker,
            ctx.lease_token,
        )
    finally:
        await conn.close()


@handler("test_sleep", lease_seconds=2, max_attempts=5, backoff=[0.2])
async def sleep(ctx: TaskContext, payload: Sleep) -> dict[str, Any]:
    await record(ctx)
    await asyncio.sleep(payload.seconds)
    if payload.fail:
        raise RuntimeError("asked to fail")
    return {"slept": payload.seconds, "attempt": ctx.attempt}


@handler("test_fail", max_attempts=3, backoff=[0.1, 0.2])
async def always_fail(ctx: TaskContext, payload: dict[str, Any]) -> None:
    raise ValueError(f"boom on attempt {ctx.attempt}")


@handler("test_permanent", max_attempts=5)
async def permanent(ctx: TaskContext, payload: dict[str, Any]) -> None:
    raise PermanentError("user 42 does not exist")


@handler("test_sync", lease_seconds=2)
def sync_sleep(ctx: TaskContext, payload: Sleep) -> dict[str, Any]:
    time.sleep(payload.seconds)
    return {"slept": payload.seconds, "thread": True}


@handler("test_unstorable", max_attempts=3)
async def unstorable(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """JSON that PostgreSQL's jsonb refuses (a NUL character)."""
    return {"text": "a\x00b"}


@handler("test_fail_once", max_attempts=1)
async def fail_once(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Fails the first time a task runs (DEAD: it has one attempt), succeeds once requeued."""
    await record(ctx)
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        runs = await conn.fetchval(
            "SELECT count(*) FROM executions WHERE task_id = $1", ctx.task_id
        )
    finally:
        await conn.close()
    if runs == 1:
        raise RuntimeError("the first run of every task fails")
    return {"runs": runs}
