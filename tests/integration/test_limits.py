"""Global limits as rows (docs/scheduling.md): one value per limit in the database, tokens
taken by the claim statement with SKIP LOCKED and given back by every statement that moves
a task out of RUNNING; rate tokens that come free one period after their start."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from tasklease.engine.queries import CLAIM_LIMITED
from tasklease.engine.store import InvalidLimit, Limit, Store
from tests.support.db import expire_lease, submit

ACTIONS = {"noop": 30.0, "test_sleep": 30.0}


async def claim(
    conn: asyncpg.Connection | Store, k: int, worker: str = "w", statement: str = CLAIM_LIMITED
) -> list[Any]:
    """One claim of up to k tasks with the limits joined in (task_claim_due_limited, what a
    worker runs where a limit applies): its rows (the last says 'wait', 'held' or 'plain')."""
    args = ("default", list(ACTIONS), k, worker, list(ACTIONS.values()), None)
    if isinstance(conn, Store):
        return list(await conn.pool.fetch(statement, *args))
    return list(await conn.fetch(statement, *args))


def started(rows: list[Any]) -> list[tuple[int, uuid.UUID]]:
    return [(r["id"], r["lease_token"]) for r in rows if r["trigger"] in ("claim", "reclaim")]


async def running(conn: asyncpg.Connection, action: str = "noop") -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE state = 'RUNNING' AND action = $1", action
    )
    return n


async def held_tokens(conn: asyncpg.Connection, key: str) -> list[int]:
    rows = await conn.fetch(
        "SELECT n FROM limit_tokens WHERE key = $1 AND task_id IS NOT NULL ORDER BY n", key
    )
    return [r["n"] for r in rows]


async def test_a_limit_caps_what_claims_start_and_a_finished_task_gives_its_token_back(
    store: Store, conn: asyncpg.Connection
) -> None:
    await store.set_limit(Limit("action:noop", 3), declared=True)
    for _ in range(10):
        await submit(store, "noop")
    rows = await claim(conn, 10)
    first = started(rows)
    assert len(first) == 3
    assert rows[-1]["trigger"] == "held" and rows[-1]["wait_seconds"] == pytest.approx(0.1)
    assert started(await claim(conn, 10)) == []
    assert await held_tokens(conn, "action:noop") == [1, 2, 3]
    assert await store.complete(*first[0], "null")
    assert len(started(await claim(conn, 10))) == 1
    assert await running(conn) == 3


async def test_claimers_in_open_transactions_share_a_limit_without_waiting(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """A token another claim has taken (uncommitted) is skipped, not waited for."""
    await store.set_limit(Limit("action:noop", 3), declared=True)
    for _ in range(10):
        await submit(store, "noop")
    other = await asyncpg.connect(db)
    try:
        async with conn.transaction(), other.transaction():
            a = started(await claim(conn, 2, "a"))
            b = started(await asyncio.wait_for(claim(other, 5, "b"), 10))
            assert (len(a), len(b)) == (2, 1)
        assert await running(conn) == 3
        assert started(await claim(conn, 5, "c")) == []
    finally:
        await other.close()


async def _complete(store: Store, task: int, token: uuid.UUID) -> bool:
    return await store.complete(task, token, "null")


async def _fail(store: Store, task: int, token: uuid.UUID) -> bool:
    return await store.fail(task, token, 3600, "boom")


async def _bury(store: Store, task: int, token: uuid.UUID) -> bool:
    return await store.bury(task, token, "boom", True)


async def _release(store: Store, task: int, token: uuid.UUID) -> bool:
    return await store.release(task, token)


async def _snooze(store: Store, task: int, token: uuid.UUID) -> bool:
    return await store.snooze(task, token, 3600, None)


async def _cancel_running(store: Store, task: int, token: uuid.UUID) -> bool:
    return await store.request_cancel(task) and await store.cancel_running(task, token)


async def _expire(store: Store, task: int, token: uuid.UUID) -> bool:
    """The lease runs out on the last attempt: the next claim buries it (expire)."""
    async with store.pool.acquire() as c:
        await c.execute("UPDATE tasks SET max_attempts = 1 WHERE id = $1", task)
        await expire_lease(c, task)
        rows = await claim(c, 1)
    return [r["trigger"] for r in rows[:-1]] == ["expire"]


@pytest.mark.parametrize(
    "leave",
    [_complete, _fail, _bury, _release, _snooze, _cancel_running, _expire],
    ids=lambda f: f.__name__.strip("_"),
)
async def test_every_way_out_of_running_gives_the_token_back(
    store: Store,
    conn: asyncpg.Connection,
    leave: Callable[[Store, int, uuid.UUID], Awaitable[bool]],
) -> None:
    await store.set_limit(Limit("action:noop", 1), declared=True)
    await submit(store, "noop", max_attempts=2)
    await submit(store, "noop", max_attempts=2)
    [(task, token)] = started(await claim(conn, 2))
    assert started(await claim(conn, 2)) == []  # the one token is held
    assert await leave(store, task, token)
    assert await held_tokens(conn, "action:noop") == []
    assert len(started(await claim(conn, 2))) == 1
    assert await held_tokens(conn, "action:noop") == [1]


async def test_a_takeover_keeps_its_token(store: Store, conn: asyncpg.Connection) -> None:
    """A crashed worker's task keeps its token while RUNNING: whoever takes it over needs
    no other, and nothing else starts beside it."""
    await store.set_limit(Limit("action:noop", 1), declared=True)
    first = await submit(store, "noop")
    await submit(store, "noop")
    [(task, _)] = started(await claim(conn, 2, "dies"))
    assert task == first
    await expire_lease(conn, task)
    rows = await claim(conn, 2, "heir")
    assert [(r["trigger"], r["id"]) for r in rows[:-1]] == [("reclaim", task)]
    assert await held_tokens(conn, "action:noop") == [1]


async def test_a_rate_limit_gives_n_starts_per_period_and_says_when_the_next_comes(
    store: Store, conn: asyncpg.Connection
) -> None:
    await store.set_limit(Limit("rate:noop", 3, 2.0), declared=True)
    for _ in range(10):
        await submit(store, "noop")
    rows = await claim(conn, 10)
    assert len(started(rows)) == 3
    assert rows[-1]["trigger"] == "held" and 1.5 < rows[-1]["wait_seconds"] <= 2.0
    assert started(await claim(conn, 10)) == []
    # each token comes free one period after its start, whatever became of the task
    spans = await conn.fetch("""
        SELECT t.free_at - h.at AS span FROM limit_tokens t
        JOIN task_transitions h ON h.trigger = 'claim'
        WHERE t.key = 'rate:noop' AND t.free_at > now()""")
    assert len(spans) == 9 and all(1.9 <= s["span"].total_seconds() <= 2.1 for s in spans)
    await conn.execute("UPDATE limit_tokens SET free_at = now() - interval '1 ms'")
    assert len(started(await claim(conn, 10))) == 3


async def test_a_takeover_waits_for_a_rate_token(store: Store, conn: asyncpg.Connection) -> None:
    """A takeover runs the handler again: it is a start, and a rate counts it."""
    await store.set_limit(Limit("rate:noop", 1, 3600.0), declared=True)
    task = await submit(store, "noop")
    assert len(started(await claim(conn, 1))) == 1
    await expire_lease(conn, task)
    rows = await claim(conn, 1)
    assert started(rows) == [] and rows[-1]["trigger"] == "held"
    await conn.execute("UPDATE limit_tokens SET free_at = now() - interval '1 ms'")
    assert [r["trigger"] for r in await claim(conn, 1)][:-1] == ["reclaim"]


async def test_a_lowered_limit_starts_nothing_until_its_surplus_is_gone(
    store: Store, conn: asyncpg.Connection
) -> None:
    """4 running under 4, lowered to 2: tokens 3 and 4 stay with their tasks and are never
    taken again; until they finish, only what the others free (tokens 1 and 2) starts, so
    never more than the 4 that ran when it was lowered; then never more than 2."""
    await store.set_limit(Limit("action:noop", 4), declared=False)
    for _ in range(20):
        await submit(store, "noop")
    tasks = started(await claim(conn, 4))
    by_token = {
        r["n"]: r["task_id"]
        for r in await conn.fetch("SELECT n, task_id FROM limit_tokens WHERE key = 'action:noop'")
    }
    tokens = {task: token for task, token in tasks}
    await store.set_limit(Limit("action:noop", 2), declared=False)
    assert await held_tokens(conn, "action:noop") == [1, 2, 3, 4]
    # a surplus task ends: nothing starts in its place
    assert await store.complete(by_token[3], tokens[by_token[3]], "null")
    assert started(await claim(conn, 4)) == []
    assert await running(conn) == 3
    # one within the new value ends: its token is taken again (3 running, the surplus left)
    assert await store.complete(by_token[1], tokens[by_token[1]], "null")
    again = started(await claim(conn, 4))
    assert len(again) == 1 and await running(conn) == 3
    tokens.update(again)
    # the last surplus task ends: from now on, 2
    assert await store.complete(by_token[4], tokens[by_token[4]], "null")
    assert started(await claim(conn, 4)) == [] and await running(conn) == 2
    # a free token above the value is deleted when the value is next written
    await store.set_limit(Limit("action:noop", 2), declared=False)
    assert {r["n"] for r in await conn.fetch("SELECT n FROM limit_tokens")} == {1, 2}


async def test_raising_a_limit_lets_more_start(store: Store, conn: asyncpg.Connection) -> None:
    await store.set_limit(Limit("queue:default", 1), declared=True)
    for _ in range(5):
        await submit(store, "noop")
    assert len(started(await claim(conn, 5))) == 1
    await store.set_limit(Limit("queue:default", 3), declared=True)
    assert len(started(await claim(conn, 5))) == 2
    assert await running(conn) == 3


async def test_the_queue_and_the_action_limit_both_hold(
    store: Store, conn: asyncpg.Connection
) -> None:
    """A task needs a token of every limit it falls under."""
    await store.set_limit(Limit("queue:default", 3), declared=True)
    await store.set_limit(Limit("action:noop", 1), declared=True)
    for _ in range(5):
        await submit(store, "noop")
        await submit(store, "test_sleep", '{"seconds": 0}')
    assert len(started(await claim(conn, 10))) <= 3
    started_more = started(await claim(conn, 10))
    assert await running(conn, "noop") == 1
    assert await running(conn, "noop") + await running(conn, "test_sleep") == 3, started_more


async def test_a_shut_action_does_not_hold_back_the_others(
    store: Store, conn: asyncpg.Connection
) -> None:
    """An action that may start nothing is stepped over, however much of it is due and
    however high its priority."""
    await store.set_limit(Limit("action:test_sleep", 0), declared=False)
    for _ in range(30):
        await submit(store, "test_sleep", '{"seconds": 0}', priority=10)
    noops = {await submit(store, "noop") for _ in range(3)}
    assert {task for task, _ in started(await claim(conn, 3))} == noops


async def test_a_declared_value_yields_to_an_operators(
    store: Store, conn: asyncpg.Connection
) -> None:
    assert await store.set_limit(Limit("action:noop", 5), declared=True) is not None
    assert await store.set_limit(Limit("action:noop", 2), declared=False) is not None
    assert await store.set_limit(Limit("action:noop", 7), declared=True) is None
    assert await store.unset_limits(["action:noop"], declared_only=True) == []
    [row] = await store.limits()
    assert (row["key"], row["value"], row["declared"], row["used"]) == ("action:noop", 2, False, 0)
    assert await store.unset_limits(["action:noop"], declared_only=False) == ["action:noop"]
    assert await store.limits() == []
    assert await conn.fetchval("SELECT count(*) FROM limit_tokens") == 0


@pytest.mark.parametrize(
    "key, value, per, by, problem",
    [
        ("noop", 1, None, None, "a key is queue:NAME, action:NAME, rate:NAME or key:NAME"),
        ("action:", 1, None, None, "a key is"),
        ("action:x", -1, None, None, "must be 0 to 100000"),
        ("rate:x", 1, None, None, "a rate takes per_seconds"),
        ("action:x", 1, 1.0, None, "a rate takes per_seconds"),
        ("rate:x", 1, 0.0, None, "per_seconds must be above 0"),
        ("rate:x", 1, 1e300, None, "at most 31622400"),
        ("key:x", 1001, None, "customer", "must be 0 to 1000"),
        ("key:x", 1, 1.0, "customer", "a rate takes per_seconds"),
        ("key:x", 1, None, "", "not an empty one"),
        ("action:x", 1, None, "customer", "only a key:NAME limit takes a payload field"),
    ],
)
def test_a_limit_that_cannot_be_is_named(
    key: str, value: int, per: float | None, by: str | None, problem: str
) -> None:
    with pytest.raises(InvalidLimit, match=problem):
        Limit(key, value, per, by)
