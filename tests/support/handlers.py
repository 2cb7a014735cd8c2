"""Handlers used by the tests; workers load them with `--handlers tests.support.handlers`.

Each execution appends a row to `executions` (created by the tests), so a test can
count how often a task ran, whatever process ran it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import asyncpg
import msgspec

from tasklease import PermanentError, Snooze, TaskContext, handler
from tests.support.db import connect_db, pooler_safe


class Sleep(msgspec.Struct):
    seconds: float = 0.0
    fail: bool = False


async def record(ctx: TaskContext) -> int:
    """One row in `executions` for this run; returns how many runs the task has had."""
    conn = await connect_db(os.environ["DATABASE_URL"])
    try:
        runs: int = await conn.fetchval(
            "WITH new AS (INSERT INTO executions (task_id, attempt, worker, token) "
            "VALUES ($1, $2, $3, $4)) SELECT count(*) + 1 FROM executions WHERE task_id = $1",
            ctx.task_id,
            ctx.attempt,
            ctx.worker,
            ctx.lease_token,
        )
        return runs
    finally:
        await conn.close()


_pools: dict[str, asyncio.Future[asyncpg.Pool]] = {}


def shared_pool() -> asyncio.Future[asyncpg.Pool]:
    """A few connections per worker process (per test database, for workers run inside
    the tests' process), for handlers that many run at once."""
    dsn = os.environ["DATABASE_URL"]
    if dsn not in _pools:
        _pools[dsn] = asyncio.ensure_future(
            asyncpg.create_pool(dsn, min_size=1, max_size=4, **pooler_safe())
        )
    return _pools[dsn]


async def run_timed(ctx: TaskContext, seconds: float) -> None:
    """Sleep, then record the run with when it started and finished. The times are this
    machine's clock, which every worker process of a test shares (as the database's, which
    runs here too); one short write per run, through a small pool, so that hundreds of runs
    at once do not need hundreds of connections."""
    began = time.time()
    await asyncio.sleep(seconds)
    ended = time.time()
    pool = await shared_pool()
    await pool.execute(
        "INSERT INTO executions (task_id, attempt, worker, token, at, finished_at) "
        "VALUES ($1, $2, $3, $4, to_timestamp($5), to_timestamp($6))",
        ctx.task_id,
        ctx.attempt,
        ctx.worker,
        ctx.lease_token,
        began,
        ended,
    )


@handler("test_sleep", lease_seconds=2, max_attempts=5, backoff=[0.2])
async def sleep(ctx: TaskContext, payload: Sleep) -> dict[str, Any]:
    await record(ctx)
    await asyncio.sleep(payload.seconds)
    if payload.fail:
        raise RuntimeError("asked to fail")
    return {"slept": payload.seconds, "attempt": ctx.attempt}


@handler("test_long_lease", lease_seconds=60)
async def long_lease(ctx: TaskContext, payload: Sleep) -> None:
    """An action with a long lease, for tasks submitted with a short lease of their own."""
    await record(ctx)
    await asyncio.sleep(payload.seconds)


# handlers of test_overlap running in this process: now, and the most at once
OVERLAP = {"now": 0, "most": 0}


@handler("test_overlap")
async def overlap(ctx: TaskContext, payload: Sleep) -> None:
    OVERLAP["now"] += 1
    OVERLAP["most"] = max(OVERLAP["most"], OVERLAP["now"])
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        OVERLAP["now"] -= 1


@handler("test_fail", max_attempts=3, backoff=[0.1, 0.2])
async def always_fail(ctx: TaskContext, payload: dict[str, Any]) -> None:
    raise ValueError(f"boom on attempt {ctx.attempt}")


@handler("test_permanent", max_attempts=5)
async def permanent(ctx: TaskContext, payload: dict[str, Any]) -> None:
    raise PermanentError("user 42 does not exist")


class Hostile(msgspec.Struct):
    kind: str  # what the handler returns or raises that cannot be stored as it is


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@handler("test_hostile_outcome", max_attempts=2, backoff=[0.1])
async def hostile_outcome(ctx: TaskContext, payload: Hostile) -> Any:
    if payload.kind == "surrogate":
        return {"text": "\ud800"}
    if payload.kind == "nested":
        return _nested(100_000)
    if payload.kind == "nul":
        return {"text": "a\u0000b"}
    raise RuntimeError("bad bytes \ud800 and \x00 in an error")


@handler("test_exit", max_attempts=2, lease_seconds=2, backoff=[0.2])
async def exit_process(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """A poison task: it kills the worker process that runs it, on every attempt."""
    os._exit(int(payload.get("status", 3)))


@handler("test_sys_exit", max_attempts=1)
async def sys_exit(ctx: TaskContext, payload: dict[str, Any]) -> None:
    sys.exit(0)


@handler("test_sync_sys_exit", max_attempts=1)
def sync_sys_exit(ctx: TaskContext, payload: dict[str, Any]) -> None:
    sys.exit(4)


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
    runs = await record(ctx)
    if runs == 1:
        raise RuntimeError("the first run of every task fails")
    return {"runs": runs}


# --- scheduling (tests/e2e/test_scheduling.py) ------------------------------------------


@handler("test_limited", global_limit=2, lease_seconds=5)
async def limited(ctx: TaskContext, payload: Sleep) -> None:
    """At most 2 running at once over all workers."""
    await run_timed(ctx, payload.seconds)


class PerCustomer(msgspec.Struct):
    customer: str
    seconds: float = 0.0


@handler("test_per_customer", limit_by="customer", global_limit=2, lease_seconds=5)
async def per_customer(ctx: TaskContext, payload: PerCustomer) -> None:
    """At most 2 running at once per customer over all workers."""
    await run_timed(ctx, payload.seconds)


@handler("test_wide_limited", global_limit=256, lease_seconds=5)
async def wide_limited(ctx: TaskContext, payload: Sleep) -> None:
    """At most 256 running at once over all workers: more than any one claim takes."""
    await run_timed(ctx, payload.seconds)


@handler("test_wide_rated", rate_limit=(256, 1.0), lease_seconds=5)
async def wide_rated(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """At most 256 starts in any second over all workers: more than any one claim takes."""


@handler("test_rated", rate_limit=(5, 1.0), lease_seconds=5)
async def rated(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """At most 5 starts in any second over all workers."""


@handler("test_timeout", timeout=0.5, max_attempts=2, backoff=[0.1])
async def overrun(ctx: TaskContext, payload: Sleep) -> None:
    await asyncio.sleep(payload.seconds)


class SnoozeTimes(msgspec.Struct):
    times: int = 2


@handler("test_snooze", max_attempts=1)
async def snooze(ctx: TaskContext, payload: SnoozeTimes) -> dict[str, int]:
    """Snooze `times` times (0.1 s each), then complete; one attempt is enough for all."""
    runs = await record(ctx)
    if runs <= payload.times:
        raise Snooze(0.1, f"not ready yet (run {runs})")
    return {"runs": runs}


class TxWrite(msgspec.Struct):
    pause_first: float = 0.0  # seconds the first attempt waits inside its transaction
    fail_inside: bool = False


async def _pause_ignoring_stops(seconds: float) -> None:
    """A handler that will not be stopped: a lost lease cancels it, and it sleeps on, so its
    transaction reaches the lease guard (the fence) however it is told to stop."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.sleep(left)
        except asyncio.CancelledError:
            continue


@handler("test_tx_write", max_attempts=3, backoff=[0.1])
async def tx_write(ctx: TaskContext, payload: TxWrite) -> None:
    """One row in `effects` per attempt, written in the transaction that completes the task."""
    async with ctx.transaction() as conn:
        await conn.execute(
            "INSERT INTO effects (task_id, attempt, worker) VALUES ($1, $2, $3)",
            ctx.task_id,
            ctx.attempt,
            ctx.worker,
        )
        if ctx.attempt == 1 and payload.pause_first:
            await _pause_ignoring_stops(payload.pause_first)
        if payload.fail_inside and ctx.attempt == 1:
            raise RuntimeError("failed inside its transaction")
        ctx.set_result({"attempt": ctx.attempt})


@handler("test_tx_session", max_attempts=3, backoff=[0.1])
async def tx_session(ctx: TaskContext, payload: TxWrite) -> None:
    """test_tx_write through SQLAlchemy: ctx.session()."""
    from sqlalchemy import text

    async with ctx.session() as session:
        await session.execute(
            text("INSERT INTO effects (task_id, attempt, worker) VALUES (:t, :a, :w)"),
            {"t": ctx.task_id, "a": ctx.attempt, "w": ctx.worker},
        )
        if payload.fail_inside and ctx.attempt == 1:
            raise RuntimeError("failed inside its transaction")
        ctx.set_result({"attempt": ctx.attempt, "via": "sqlalchemy"})


# --- handlers that misbehave (tests/e2e/test_isolation.py) ------------------------------


class Ticks(msgspec.Struct):
    path: str  # each run appends "<task> <attempt> <worker> <what> <unix time>" lines here
    seconds: float = 0.0
    ignore_stop: bool = False  # a def handler that does not look at ctx.stop_requested


def tick(ctx: TaskContext, path: str, what: str = "tick") -> None:
    """One line in a file on this machine, written with this machine's clock (which every
    process of a test shares): a worker cut off from the database can still write it."""
    with open(path, "a") as f:
        f.write(f"{ctx.task_id} {ctx.attempt} {ctx.worker} {what} {time.time():.6f}\n")


@handler("test_block_loop", lease_seconds=1, max_attempts=20)
async def block_loop(ctx: TaskContext, payload: Ticks) -> dict[str, float]:
    """An async handler that blocks its worker's event loop (time.sleep) for longer than
    its lease."""
    tick(ctx, payload.path, "start")
    time.sleep(payload.seconds)  # noqa: ASYNC251 - the point of the test
    tick(ctx, payload.path, "end")
    return {"slept": payload.seconds}


@handler("test_ticks", lease_seconds=3, max_attempts=5, backoff=[0.1])
async def ticks(ctx: TaskContext, payload: Ticks) -> None:
    """Ticks every 50 ms for `seconds`; a cancellation stops it, as any async handler."""
    deadline = time.monotonic() + payload.seconds
    tick(ctx, payload.path, "start")
    while time.monotonic() < deadline:
        tick(ctx, payload.path)
        await asyncio.sleep(0.05)
    tick(ctx, payload.path, "end")


class TicksUntil(msgspec.Struct):
    path: str  # ticks, as Ticks
    until: str  # the handler returns once this file exists
    seconds: float = 60.0  # or after this long


@handler("test_ticks_until", lease_seconds=3, max_attempts=5, backoff=[0.1])
async def ticks_until(ctx: TaskContext, payload: TicksUntil) -> None:
    """Ticks every 50 ms until the file `until` exists: a test decides when the handler
    ends (for instance while its worker is cut off, so that its outcome is written late)."""
    deadline = time.monotonic() + payload.seconds
    tick(ctx, payload.path, "start")
    while time.monotonic() < deadline and not os.path.exists(payload.until):
        tick(ctx, payload.path)
        await asyncio.sleep(0.05)
    tick(ctx, payload.path, "end")


@handler("test_sync_ticks", lease_seconds=3, timeout=0.5, max_attempts=2, backoff=[0.0])
def sync_ticks(ctx: TaskContext, payload: Ticks) -> None:
    """A def handler ticking every 50 ms for `seconds` (its thread cannot be interrupted);
    unless told to ignore it, it returns once ctx.stop_requested."""
    deadline = time.monotonic() + payload.seconds
    tick(ctx, payload.path, "start")
    while time.monotonic() < deadline and (payload.ignore_stop or not ctx.stop_requested):
        tick(ctx, payload.path)
        time.sleep(0.05)
    tick(ctx, payload.path, "end")


class Crash(msgspec.Struct):
    how: str = "exit"  # exit: os._exit(0); segv: a segmentation fault


@handler("test_crash", lease_seconds=60, max_attempts=2, backoff=[0.2])
async def crash(ctx: TaskContext, payload: Crash) -> None:
    """A poison task that ends the worker process running it, on every attempt. Its lease
    is long: it must not take a lease's time to be settled."""
    await asyncio.sleep(0.3)  # the tasks beside it have started
    if payload.how == "segv":
        import ctypes

        ctypes.string_at(0)
    os._exit(0)


class Flow(msgspec.Struct):
    fail: bool = False  # end DEAD (a permanent error)
    seconds: float = 0.0
    value: Any = None


@handler("test_flow", max_attempts=3, backoff=[0.1])
async def flow(ctx: TaskContext, payload: Flow) -> dict[str, Any]:
    """A workflow's task (tests of docs/workflows.md): records its run, then returns what it
    read of its dependencies (ctx.results, ctx.dependency_counts) and payload.value."""
    await record(ctx)
    if payload.seconds:
        await asyncio.sleep(payload.seconds)
    if payload.fail:
        raise PermanentError("asked to fail")
    return {
        "value": payload.value,
        "results": {str(k): v for k, v in sorted(ctx.results.items())},
        "states": {str(d.id): d.state for d in ctx.dependencies},
        "counts": ctx.dependency_counts,
    }
