"""Pausing a queue (docs/scheduling.md): a claim in a paused queue starts nothing, neither a
due task nor a takeover; submissions go on; resuming wakes the workers."""

from __future__ import annotations

import asyncio

import asyncpg

from tasklease.engine.store import Store
from tests.support.db import LEASES, connect_listener, expire_lease, submit, wait_until
from tests.support.workers import Running


async def claim(store: Store, queue: str = "default") -> list[asyncpg.Record]:
    claimed = await store.claim(queue, LEASES, 10, "w")
    return [*claimed.leased]


async def test_a_paused_queue_starts_nothing_and_resumes(
    store: Store, conn: asyncpg.Connection
) -> None:
    running = await submit(store, "noop")
    assert [c.id for c in await claim(store)] == [running]
    await expire_lease(conn, running)  # its worker died: a takeover is due
    first = await store.pause_queue("default")
    assert await store.pause_queue("default") == first  # pausing twice: the first time stays
    waiting = await submit(store, "noop")  # submissions are accepted while paused
    await submit(store, "noop", queue="other")
    answer = await store.claim("default", LEASES, 10, "w")
    assert (answer.leased, answer.expired, answer.wait_seconds) == ([], [], None)
    assert [c.action for c in await claim(store, "other")] == ["noop"]  # others go on
    assert await store.paused_queues() == {"default": first}

    listener = await connect_listener(store.dsn)  # behind a pooler: the direct DSN
    woken: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("tasklease", lambda *a: woken.put_nowait(a[3]))
    try:
        assert await store.resume_queue("default")
        assert await asyncio.wait_for(woken.get(), 10) == "default"
    finally:
        await listener.close()
    assert not await store.resume_queue("default")  # not paused any more
    after = await store.claim("default", LEASES, 10, "w")
    assert sorted((c.id, c.trigger) for c in after.leased) == [
        (running, "reclaim"),
        (waiting, "claim"),
    ]


async def test_a_worker_sees_the_pause_at_its_next_claim(
    store: Store, conn: asyncpg.Connection, workers: Running
) -> None:
    await store.pause_queue("default")
    task = await submit(store, "noop")
    workers.start(store, concurrency=2)
    await asyncio.sleep(1.5)  # several claims of the worker, none of which starts it
    assert await conn.fetchval("SELECT state FROM tasks WHERE id = $1", task) == "PENDING"
    await store.resume_queue("default")

    async def done() -> bool:
        state = await conn.fetchval("SELECT state FROM tasks WHERE id = $1", task)
        return bool(state == "COMPLETED")

    await wait_until(done, "the task, once its queue is resumed", 30)
