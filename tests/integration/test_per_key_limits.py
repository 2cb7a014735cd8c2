"""Per-key limits (docs/scheduling.md, `key:ACTION`): at most N tasks of an action RUNNING
at once per value of a payload field, by tokens per value that the claim makes as a value
needs them, takes with SKIP LOCKED and that every way out of RUNNING gives back; a value at
its cap is stepped over, so that its backlog holds back no other value."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from tasklease.engine.queries import CLAIM
from tasklease.engine.store import InvalidLimit, Limit, Store
from tests.integration.test_limits import (
    _bury,
    _cancel_running,
    _complete,
    _expire,
    _fail,
    _release,
    _snooze,
    started,
)
from tests.integration.test_limits import claim as claim_plain
from tests.support.db import connect_db, expire_lease, submit, wait_until
from tests.support.workers import HANDLERS, Running


async def claim(conn: asyncpg.Connection | Store, k: int, worker: str = "w") -> list[Any]:
    """One claim of up to k tasks with the limits joined in (task_claim_due_limited)."""
    return await claim_plain(conn, k, worker)


def of(customer: str | None) -> str:
    return "{}" if customer is None else f'{{"customer": "{customer}"}}'


async def running_by_key(conn: asyncpg.Connection) -> Counter[str]:
    rows = await conn.fetch(
        "SELECT limit_key, count(*) AS n FROM tasks "
        "WHERE state = 'RUNNING' AND action = 'noop' GROUP BY limit_key"
    )
    return Counter({r["limit_key"]: r["n"] for r in rows})


async def held(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
    rows = await conn.fetch(
        "SELECT sub, n, task_id FROM limit_key_tokens WHERE task_id IS NOT NULL ORDER BY sub, n"
    )
    return [(r["sub"], r["n"], r["task_id"]) for r in rows]


async def test_each_value_of_the_field_gets_its_own_cap(
    store: Store, conn: asyncpg.Connection
) -> None:
    await store.set_limit(Limit("key:noop", 2, by="customer"), declared=True)
    for customer in ["a"] * 5 + ["b"] * 5 + [None] * 3:
        await submit(store, "noop", of(customer))
    await submit(store, "noop", '{"customer": 7}')  # a number: its text, "7"
    rows = await claim(conn, 20)
    # a task without the field counts under ''
    assert await running_by_key(conn) == {"a": 2, "b": 2, "": 2, "7": 1}
    assert rows[-1]["trigger"] == "held" and rows[-1]["wait_seconds"] == pytest.approx(0.1)
    assert started(await claim(conn, 20)) == []
    # each task holds one token of its value, and records which
    tokens = await conn.fetch(
        "SELECT t.id, t.limit_key, t.key_token, k.task_id FROM tasks t "
        "LEFT JOIN limit_key_tokens k ON k.key = 'key:noop' AND k.sub = t.limit_key "
        "AND k.n = t.key_token WHERE t.state = 'RUNNING'"
    )
    assert len(tokens) == 7 and all(r["task_id"] == r["id"] for r in tokens)
    # tokens numbered 1..2 per value, each at most once (a claim starts looking anywhere)
    numbers: dict[str, list[int]] = {}
    for r in tokens:
        numbers.setdefault(r["limit_key"], []).append(r["key_token"])
    assert {k: sorted(v) for k, v in numbers.items() if k != "7"} == {
        "": [1, 2],
        "a": [1, 2],
        "b": [1, 2],
    }
    assert numbers["7"] in ([1], [2])
    [row] = await store.limits()
    assert (row["key"], row["value"], row["by"], row["used"], row["keys"]) == (
        "key:noop",
        2,
        "customer",
        7,
        4,
    )


async def test_a_value_at_its_cap_does_not_hold_back_the_others(
    store: Store, conn: asyncpg.Connection
) -> None:
    """A flood of one customer's tasks, due first and of higher priority: once that customer
    has its 2 running, the next claim with room starts another customer's task."""
    await store.set_limit(Limit("key:noop", 2, by="customer"), declared=True)
    for _ in range(50):
        await submit(store, "noop", of("flood"), priority=10)
    other = await submit(store, "noop", of("quiet"))
    assert await running_by_key(conn) == {}
    assert len(started(await claim(conn, 2))) == 2  # the flood's 2, by priority
    assert [task for task, _ in started(await claim(conn, 1))] == [other]
    assert await running_by_key(conn) == {"flood": 2, "quiet": 1}


async def test_claimers_in_open_transactions_share_a_value_without_waiting(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """A value's tokens, once made, are taken with SKIP LOCKED: a token another claim has
    taken (uncommitted) is skipped, not waited for."""
    await store.set_limit(Limit("key:noop", 3, by="customer"), declared=True)
    for _ in range(10):
        await submit(store, "noop", of("a"))
    first = started(await claim(conn, 3))  # makes the value's 3 tokens
    for task, token in first:
        assert await store.complete(task, token, "null")
    other = await connect_db(db)
    try:
        async with conn.transaction(), other.transaction():
            a = started(await claim(conn, 2, "a"))
            b = started(await asyncio.wait_for(claim(other, 5, "b"), 10))
            assert (len(a), len(b)) == (2, 1)
        assert await running_by_key(conn) == {"a": 3}
        assert started(await claim(conn, 5, "c")) == []
    finally:
        await other.close()


async def test_concurrent_claims_and_exits_never_exceed_a_cap(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """Eight connections claim and finish tasks of five customers at random, in autocommit,
    so that tokens are made, taken and given back side by side: after every claim, no
    customer has more than 2 RUNNING."""
    await store.set_limit(Limit("key:noop", 2, by="customer"), declared=True)
    customers = [f"c{i}" for i in range(5)]
    for i in range(300):
        await submit(store, "noop", of(customers[i % 5]))
    conns = [await connect_db(db) for _ in range(8)]
    worst: Counter[str] = Counter()
    rng = random.Random(16)

    async def claimer(c: asyncpg.Connection, name: str) -> None:
        mine: list[tuple[int, uuid.UUID]] = []
        for _ in range(40):
            mine += started(await claim(c, rng.randint(1, 4), name))
            for key, n in (await running_by_key(c)).items():
                worst[key] = max(worst[key], n)
            rng.shuffle(mine)
            while mine and rng.random() < 0.6:
                task, token = mine.pop()
                assert await store.complete(task, token, "null")
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(claimer(c, f"w{i}") for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    assert set(worst) == set(customers) and max(worst.values()) == 2, worst
    # every token held is held by a RUNNING task that records it, and no other
    assert sorted(await held(conn)) == sorted(
        (r["limit_key"], r["key_token"], r["id"])
        for r in await conn.fetch("SELECT * FROM tasks WHERE state = 'RUNNING'")
    )


@pytest.mark.parametrize(
    "leave",
    [_complete, _fail, _bury, _release, _snooze, _cancel_running, _expire],
    ids=lambda f: f.__name__.strip("_"),
)
async def test_every_way_out_of_running_gives_the_token_of_its_value_back(
    store: Store, conn: asyncpg.Connection, leave: object
) -> None:
    await store.set_limit(Limit("key:noop", 1, by="customer"), declared=True)
    await submit(store, "noop", of("a"), max_attempts=2)
    await submit(store, "noop", of("a"), max_attempts=2)
    [(task, token)] = started(await claim(conn, 2))
    assert started(await claim(conn, 2)) == []  # the value's one token is held
    assert await leave(store, task, token)  # type: ignore[operator]
    assert await held(conn) == []
    [(second, _)] = started(await claim(conn, 2))
    assert await held(conn) == [("a", 1, second)]


async def test_a_takeover_keeps_the_token_of_its_value(
    store: Store, conn: asyncpg.Connection
) -> None:
    await store.set_limit(Limit("key:noop", 1, by="customer"), declared=True)
    first = await submit(store, "noop", of("a"))
    await submit(store, "noop", of("a"))
    [(task, _)] = started(await claim(conn, 2, "dies"))
    assert task == first
    await expire_lease(conn, task)
    rows = await claim(conn, 2, "heir")
    assert [(r["trigger"], r["id"]) for r in rows[:-1]] == [("reclaim", task)]
    assert await held(conn) == [("a", 1, task)]


async def test_a_lowered_cap_holds_once_the_surplus_is_gone_and_a_raised_one_lets_more_start(
    store: Store, conn: asyncpg.Connection
) -> None:
    await store.set_limit(Limit("key:noop", 3, by="customer"), declared=False)
    for _ in range(20):
        await submit(store, "noop", of("a"))
    tasks = dict(started(await claim(conn, 5)))
    assert len(tasks) == 3
    await store.set_limit(Limit("key:noop", 1), declared=False)  # keeps its field
    by_token = {n: t for _, n, t in await held(conn)}
    # token 3 is above the value: its task ends and nothing starts in its place
    assert await store.complete(by_token[3], tasks[by_token[3]], "null")
    assert started(await claim(conn, 5)) == []
    assert await store.complete(by_token[2], tasks[by_token[2]], "null")
    assert started(await claim(conn, 5)) == []
    assert await store.complete(by_token[1], tasks[by_token[1]], "null")
    assert len(started(await claim(conn, 5))) == 1
    await store.set_limit(Limit("key:noop", 4), declared=False)
    assert len(started(await claim(conn, 5))) == 3
    assert await running_by_key(conn) == {"a": 4}
    # free tokens above a lowered value are deleted when it is written
    await store.set_limit(Limit("key:noop", 0), declared=False)
    assert {n for _, n, _ in await held(conn)} == {1, 2, 3, 4}


async def test_a_cap_of_zero_starts_nothing_of_the_action_and_steps_over_it(
    store: Store, conn: asyncpg.Connection
) -> None:
    await store.set_limit(Limit("key:noop", 0, by="customer"), declared=False)
    for _ in range(10):
        await submit(store, "noop", of("a"), priority=10)
    sleeper = await submit(store, "test_sleep", '{"seconds": 0}')
    assert [task for task, _ in started(await claim(conn, 1))] == [sleeper]
    assert await conn.fetchval("SELECT count(*) FROM limit_key_tokens") == 0


async def test_the_field_is_needed_once_and_tokens_go_with_their_limit(
    store: Store, conn: asyncpg.Connection
) -> None:
    with pytest.raises(InvalidLimit, match="which payload field"):
        await store.set_limit(Limit("key:noop", 2), declared=False)
    await store.set_limit(Limit("key:noop", 2, by="customer"), declared=True)
    await submit(store, "noop", of("a"))
    assert len(started(await claim(conn, 2))) == 1
    assert await store.unset_limits(["key:noop"], declared_only=True) == ["key:noop"]
    assert await conn.fetchval("SELECT count(*) FROM limit_key_tokens") == 0
    assert await store.limits() == []


async def test_a_worker_declares_the_limit_its_code_gives_and_removes_it_once_gone(
    store: Store, workers: Running
) -> None:
    """test_per_customer: limit_by="customer", global_limit=2 is key:test_per_customer (2 per
    customer), not action:test_per_customer; a worker whose code drops limit_by removes it."""

    async def limits() -> dict[str, tuple[int, str | None]]:
        return {r["key"]: (r["value"], r["by"]) for r in await store.limits()}

    async def declared() -> bool:
        return (await limits()).get("key:test_per_customer") == (2, "customer")

    first = workers.start(store)
    await wait_until(declared, "the per-key limit declared", 30)
    assert "action:test_per_customer" not in await limits()
    await workers.stop(first)
    plain = dict(HANDLERS)
    plain["test_per_customer"] = replace(plain["test_per_customer"], limit_by=None)

    async def as_one_limit() -> bool:
        return (await limits()).get("action:test_per_customer") == (2, None)

    workers.start(store, plain)
    await wait_until(as_one_limit, "the action's limit declared", 30)
    assert "key:test_per_customer" not in await limits()


async def test_the_claim_without_limits_starts_nothing_where_one_applies_and_says_so(
    store: Store, conn: asyncpg.Connection
) -> None:
    """task_claim_due (what a worker runs while no limit applies to a queue or its actions)
    starts nothing, not even of an action without a limit, once one has a limit, and says
    'limited'; Store.claim then runs task_claim_due_limited for that queue, until that one
    says 'plain' (no limit left)."""
    await store.set_limit(Limit("key:noop", 2, by="customer"), declared=True)
    for _ in range(5):
        await submit(store, "noop", of("a"), priority=10)
    await submit(store, "test_sleep", '{"seconds": 0}')
    rows = await claim_plain(conn, 3, statement=CLAIM)
    assert started(rows) == [] and rows[-1]["trigger"] == "limited"
    leases = {"noop": 30.0, "test_sleep": 30.0}
    first = await store.claim("default", leases, 3, "w")
    assert (first.leased, first.held_back, first.wait_seconds) == ([], True, 0.0)
    assert store.limited_queues == {"default"}
    second = await store.claim("default", leases, 3, "w")
    assert len(second.leased) == 2 and await running_by_key(conn) == {"a": 2}
    await store.unset_limits(["key:noop"], declared_only=False)
    third = await store.claim("default", leases, 3, "w")
    assert (len(third.leased), third.held_back) == (3, True) and store.limited_queues == set()
    assert (await store.claim("default", leases, 3, "w")).held_back is False
