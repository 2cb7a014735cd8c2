"""tasklease_claim_slots, the function behind global limits: a limit is split into shards,
each under its own advisory lock, so that claimers of one limited key do not wait for each
other, and each shard counts exactly what was started in it (docs/scheduling.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import pytest

from tasklease.engine.states import TaskState
from tasklease.engine.store import ActionLimit, ClaimRules, NewTask, Store
from tests.support.db import connect_db, force_state, submit, wait_until

SLOTS = "SELECT * FROM tasklease_claim_slots($1, $2, $3, $4, $5, $6, $7)"


def running(limit: int) -> tuple[Any, ...]:
    """Arguments for a claim of noop under a concurrency limit, wanting 10."""
    return ("default", None, ["noop"], [limit], [None], [None], 10)


def rated(limit: int, period: float = 1.0, want: int = 10) -> tuple[Any, ...]:
    return ("default", None, ["noop"], [None], [limit], [period], want)


@asynccontextmanager
async def claimer(db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction: the shards it takes stay held until the end."""
    conn = await connect_db(db)
    tr = conn.transaction()
    await tr.start()
    try:
        yield conn
    finally:
        await tr.rollback()
        await conn.close()


async def hold_shards(conn: asyncpg.Connection, *shards: int) -> None:
    """Take the advisory locks of these shards of noop's concurrency limit in `conn`'s
    transaction, so that a claim meanwhile gets one of the others."""
    for shard in shards:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"tasklease.limit:action:noop#{shard}",
        )


async def claim_that_waits(
    watcher: asyncpg.Connection, waiter: asyncpg.Connection, limit: int, what: str
) -> asyncio.Future[asyncpg.Record]:
    """Start `waiter`'s claim and return it once PostgreSQL shows it waiting for a shard's
    advisory lock (seen from `watcher`)."""
    pid = await waiter.fetchval("SELECT pg_backend_pid()")
    waiting = asyncio.ensure_future(waiter.fetchrow(SLOTS, *running(limit)))

    async def blocked() -> bool:
        return bool(
            await watcher.fetchval(
                "SELECT wait_event = 'advisory' FROM pg_stat_activity WHERE pid = $1", pid
            )
        )

    await wait_until(blocked, what, 10)
    return waiting


async def test_claimers_take_different_shards_whose_parts_add_up_to_the_limit(db: str) -> None:
    async with claimer(db) as a, claimer(db) as b, claimer(db) as c:
        rows = [await x.fetchrow(SLOTS, *running(400)) for x in (a, b, c)]
    # 400 = three shards (round(400 / 128)) of 134, 133, 133: each claimer got one while the
    # others held theirs, without waiting
    assert sorted(r["run_slot"] for r in rows) == [0, 1, 2], rows
    assert sorted(r["running_left"] for r in rows) == [133, 133, 134], rows
    assert {r["starts_left"] for r in rows} == {None}


@pytest.mark.parametrize(
    ("limit", "parts"),
    [(191, [191]), (192, [96, 96]), (250, [125, 125]), (500, [125] * 4), (4000, [250] * 16)],
)
async def test_a_limit_has_one_shard_per_128_rounded_up_to_16(
    db: str, limit: int, parts: list[int]
) -> None:
    """round(N / 128) shards, at least 1 and at most 16 (migration 0005; before it a limit
    of 192 to 255 was one shard): as many claimers as shards each get one, without waiting."""
    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(claimer(db)) for _ in parts]
        rows = [await c.fetchrow(SLOTS, *running(limit)) for c in conns]
    assert sorted(r["run_slot"] for r in rows) == list(range(len(parts))), rows
    assert sorted(r["running_left"] for r in rows) == sorted(parts), rows


async def test_a_small_limit_is_one_shard_and_claimers_take_turns(db: str) -> None:
    async with claimer(db) as a:
        first = await a.fetchrow(SLOTS, *running(127))
        assert (first["run_slot"], first["running_left"]) == (0, 127)
        async with claimer(db) as b:
            waiting = await claim_that_waits(a, b, 127, "the second claimer to wait")
            assert not waiting.done()
            await a.execute("COMMIT; BEGIN")  # the first claim ends: its lock goes
            second = await asyncio.wait_for(waiting, 10)
            # it saw the first claim, which may have started 10 (its bound says so)
            assert (second["run_slot"], second["running_left"]) == (0, 117)


async def test_when_every_shard_is_held_a_claimer_waits_for_one(db: str) -> None:
    async with claimer(db) as a, claimer(db) as b:
        held = {(await x.fetchrow(SLOTS, *running(256)))["run_slot"] for x in (a, b)}
        assert held == {0, 1}
        async with claimer(db) as c:
            waiting = await claim_that_waits(a, c, 256, "the third claimer to wait for a shard")
            await a.execute("ROLLBACK; BEGIN")
            await b.execute("ROLLBACK; BEGIN")
            got = await asyncio.wait_for(waiting, 10)
            assert got["run_slot"] in (0, 1) and got["running_left"] == 128


async def test_a_shard_counts_the_running_tasks_started_in_it(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """256 = 2 shards of 128. Tasks without a shard (claimed before limits were sharded), or
    with one the limit no longer has, count in shard 0; finished ones count nowhere."""
    placed = {0: 10, 1: 5, None: 3, 7: 2}
    for slot, n in placed.items():
        for _ in range(n):
            task_id = await submit(store)
            await force_state(conn, task_id, TaskState.RUNNING)
            await conn.execute("UPDATE tasks SET action_slot = $2 WHERE id = $1", task_id, slot)
    done = await submit(store)
    await force_state(conn, done, TaskState.COMPLETED)
    await conn.execute("UPDATE tasks SET action_slot = 1 WHERE id = $1", done)
    seen: dict[int, int] = {}
    async with claimer(db) as a, claimer(db) as b:
        for x in (a, b):
            row = await x.fetchrow(SLOTS, *running(256))
            seen[row["run_slot"]] = row["running_left"]
            # another shard has room: a claim that fills this one may look again at once
            assert row["run_retry"] == 0
    assert seen == {0: 128 - 10 - 3 - 2, 1: 128 - 5}


async def test_a_claim_that_its_shard_cannot_hold_moves_to_the_emptiest_free_one(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """256 = 2 shards of 128: 120 tasks run in shard 0, 5 in shard 1, and both bounds are too
    high to stand for a count. A claim that starts in shard 0 finds room for 8 of the 10 it
    wants: it moves to shard 1 when that one's lock is free, and stays (taking 8, told to look
    again at once) when it is not."""
    for slot, n in {0: 120, 1: 5}.items():
        for _ in range(n):
            task_id = await submit(store)
            await force_state(conn, task_id, TaskState.RUNNING)
            await conn.execute("UPDATE tasks SET action_slot = $2 WHERE id = $1", task_id, slot)

    async def bounds(zero: int, one: int) -> None:
        await conn.execute(
            "INSERT INTO limit_bounds (key, bound, lim) VALUES ('action:noop#0', $1, 256), "
            "('action:noop#1', $2, 256) ON CONFLICT (key) DO UPDATE SET bound = excluded.bound",
            zero,
            one,
        )

    # The first shard tried is random: claim until one starts in shard 0 (at most 30 tries:
    # all start in shard 1 once in 2**30 runs). Every claim ends in shard 1; one that moved
    # there left shard 0's bound at its exact count (counted under its lock).
    moved = tries = 0
    while not moved and tries < 30:
        tries += 1
        await bounds(121, 200)
        async with claimer(db) as a:
            row = await a.fetchrow(SLOTS, *running(256))
            assert (row["run_slot"], row["running_left"]) == (1, 123)
            written = dict(await a.fetch("SELECT key, bound FROM limit_bounds"))
        assert written["action:noop#1"] == 5 + 10
        moved += written["action:noop#0"] == 120
    assert moved > 0

    await bounds(121, 200)
    async with claimer(db) as a, claimer(db) as b:
        await hold_shards(b, 1)
        row = await a.fetchrow(SLOTS, *running(256))
        assert (row["run_slot"], row["running_left"], row["run_retry"]) == (0, 8, 0)


async def test_a_rate_shard_counts_and_clears_its_own_window(
    conn: asyncpg.Connection, db: str
) -> None:
    """256 starts per second = 2 shards of 128, each with its own sliding window."""
    await conn.execute("""
        INSERT INTO action_starts (action, at, slot)
        SELECT 'noop', now(), s FROM unnest(ARRAY[0, 0, 0, 0, 1, 1, NULL, NULL]) AS s;
        INSERT INTO action_starts (action, at, slot)
        SELECT 'noop', now() - interval '5 seconds', s FROM unnest(ARRAY[0, 1, NULL]) AS s;
        INSERT INTO action_starts (action, at, slot) VALUES ('other', now(), 0)""")
    seen: dict[int, int] = {}
    async with claimer(db) as a, claimer(db) as b:
        for x in (a, b):
            row = await x.fetchrow(SLOTS, *rated(256))
            seen[row["rate_slot"]] = row["starts_left"]
            assert row["running_left"] is None
        await a.execute("COMMIT")
        await b.execute("COMMIT")
        await a.execute("BEGIN")
        await b.execute("BEGIN")
    assert seen == {0: 128 - 4 - 2, 1: 128 - 2}
    # each shard's holder deleted its own starts older than the period, strays by shard 0
    left = await conn.fetch(
        "SELECT action, coalesce(slot, -1) AS slot FROM action_starts ORDER BY 1, 2"
    )
    assert [(r["action"], r["slot"]) for r in left] == (
        [("noop", -1)] * 2 + [("noop", 0)] * 4 + [("noop", 1)] * 2 + [("other", 0)]
    )


async def test_a_shard_is_counted_again_when_its_bound_leaves_too_little_room(
    store: Store, conn: asyncpg.Connection
) -> None:
    """Limit 31 (one shard), 5 tasks running. The bound stands for the count while it
    leaves room for the whole claim (10); else the shard is counted again."""
    for _ in range(5):
        task_id = await submit(store)
        await force_state(conn, task_id, TaskState.RUNNING)
        await conn.execute("UPDATE tasks SET action_slot = 0 WHERE id = $1", task_id)
    key = "action:noop#0"

    async def claim_with_bound(bound: int) -> tuple[int, int]:
        await conn.execute(
            "INSERT INTO limit_bounds (key, bound, lim) VALUES ($1, $2, 31) "
            "ON CONFLICT (key) DO UPDATE SET bound = excluded.bound",
            key,
            bound,
        )
        left = (await conn.fetchrow(SLOTS, *running(31)))["running_left"]
        return left, await conn.fetchval("SELECT bound FROM limit_bounds WHERE key = $1", key)

    # 30 + 10 > 31: counted (5), and the bound is now 5 + the 10 this claim may start
    assert await claim_with_bound(30) == (26, 15)
    # 0 + 10 <= 31: the bound stands for the count, none is made. (The function never
    # writes a bound below the truth; this test does, to show that nothing was counted.)
    assert await claim_with_bound(0) == (31, 10)


async def test_a_claim_says_when_a_limit_held_due_work_back(store: Store) -> None:
    """The worker tries such a claim again as soon as its outcomes free some room."""
    rules = ClaimRules(None, None, {"noop": ActionLimit(max_running=3)})
    for _ in range(5):
        await submit(store)
    first = await store.claim("default", {"noop": 30.0}, 10, "w", rules)
    assert (len(first.leased), first.held_back) == (3, True)
    assert first.wait_seconds is not None and first.wait_seconds <= 0.1
    # without a limit in the way the same kind of claim is not held back
    free = await store.claim("default", {"noop": 30.0}, 1, "w", ClaimRules(None, None, {}))
    assert (len(free.leased), free.held_back) == (1, False)
    roomy = ClaimRules(None, None, {"noop": ActionLimit(max_running=100)})
    rest = await store.claim("default", {"noop": 30.0}, 10, "w", roomy)
    assert (len(rest.leased), rest.held_back) == (1, False)


async def running_by_slot(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT action_slot, count(*) FROM tasks WHERE state = 'RUNNING' GROUP BY 1"
    )
    return {r["action_slot"]: r["count"] for r in rows}


async def claim_until_held(store: Store, conn: asyncpg.Connection, limit: int) -> int:
    """Claim noop tasks, 100 at a time, under `limit` until claims stop adding any (the
    shard tried first is random: 40 claims reach every shard). Asserts after each claim that
    the running tasks never exceed the limit; returns how many run in the end."""
    rules = ClaimRules(None, None, {"noop": ActionLimit(max_running=limit)})
    idle = 0
    for _ in range(40):
        got = await store.claim("default", {"noop": 300.0}, 100, "w", rules)
        running = sum((await running_by_slot(conn)).values())
        assert running <= limit, (running, await running_by_slot(conn))
        idle = 0 if got.leased else idle + 1
        if idle == 8:
            break
    return running


@pytest.mark.parametrize(
    ("before", "finished", "after", "plateau"),
    [
        # 400 = 134 + 133 + 133 becomes 500 = 4 x 125. Left running: 134, 133, 83 (350), of
        # which 9 + 8 above the new parts: the other shards count those 17 as theirs, so
        # shard 2 takes 125 - 83 - 17 = 25 and the new shard 3 takes 108 (without: 42 and
        # 125, 517 running)
        (400, {2: 50}, 500, 350 + 25 + 108),
        # 500 = 4 x 125 becomes 400 = 134 + 133 + 133: shard 3's tasks now count in shard 0
        # (75 + 125 = 200, 66 above its part), so shards 1 and 2 (75 each) take nothing
        # (without: 58 each, up to 466 running)
        (500, {0: 50, 1: 50, 2: 50}, 400, 350),
    ],
)
async def test_changing_a_limit_never_lets_its_running_tasks_exceed_it(
    store: Store,
    conn: asyncpg.Connection,
    before: int,
    finished: dict[int, int],
    after: int,
    plateau: int,
) -> None:
    """A new value of a limit re-divides it into shards, while the tasks already running keep
    the shard they started in, which may now hold more than its new part. What the shards
    hold above their parts counts in every other shard (migration 0006), so the running
    tasks never exceed the new limit; once the tasks of the old layout have finished, the
    whole new limit is used."""
    await store.submit_many([NewTask("noop", "{}") for _ in range(1100)])
    assert await claim_until_held(store, conn, before) == before

    for slot, n in finished.items():
        rows = await conn.fetch(
            "SELECT id, lease_token FROM tasks WHERE state = 'RUNNING' AND action_slot = $1 "
            "ORDER BY id LIMIT $2",
            slot,
            n,
        )
        await store.complete_many([(r["id"], r["lease_token"], "{}") for r in rows])
    old = [r["id"] for r in await conn.fetch("SELECT id FROM tasks WHERE state = 'RUNNING'")]
    assert len(old) == 350

    assert await claim_until_held(store, conn, after) == plateau

    rows = await conn.fetch("SELECT id, lease_token FROM tasks WHERE id = ANY($1)", old)
    await store.complete_many([(r["id"], r["lease_token"], "{}") for r in rows])
    assert await claim_until_held(store, conn, after) == after


async def test_a_redivided_rate_counts_what_old_shards_hold_above_their_parts(
    conn: asyncpg.Connection, db: str
) -> None:
    """As for running tasks: 400 starts an hour (134 + 133 + 133) become 500 (4 x 125) with
    134, 133 and 83 starts in the window: shard 2 may start 25, the new shard 3 108."""
    await conn.execute("""
        INSERT INTO action_starts (action, at, slot)
        SELECT 'noop', now(), s FROM unnest(ARRAY[0, 1, 2]) AS s,
            generate_series(1, CASE s WHEN 0 THEN 134 WHEN 1 THEN 133 ELSE 83 END)""")
    seen: dict[int, int] = {}
    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(claimer(db)) for _ in range(4)]
        for c in conns:
            row = await c.fetchrow(SLOTS, *rated(500, 3600, 200))
            seen[row["rate_slot"]] = row["starts_left"]
    assert seen == {0: 0, 1: 0, 2: 25, 3: 108}


async def test_while_workers_disagree_on_a_limit_no_shard_exceeds_its_largest_part(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """A rolling deploy that changes a limit: workers claim under 400 (134 + 133 + 133) and
    under 500 (4 x 125) side by side. Each claim adds to a shard only up to the part its own
    value gives it, and a shard's bound counts every claim in its slot, whichever value it
    was made under; so no slot holds more than its largest part (in all at most 525). Before,
    a bound was kept per number of shards: a claim under 400 trusted its bound of 10 for
    shard 0 after claims under 500 had filled the shard to 125, and took 100 more (225)."""
    await store.submit_many([NewTask("noop", "{}") for _ in range(400)])

    async def claim(limit: int, want: int) -> int:
        rules = ClaimRules(None, None, {"noop": ActionLimit(max_running=limit)})
        await store.claim("default", {"noop": 300.0}, want, "w", rules)
        return (await running_by_slot(conn)).get(0, 0)

    async with claimer(db) as others:  # every claim below gets shard 0
        await hold_shards(others, 1, 2, 3)
        assert await claim(400, 10) == 10
        assert await claim(500, 100) == 110
        assert await claim(500, 100) == 125
        assert await claim(400, 100) == 134
        assert await claim(500, 100) == 134


async def test_a_limit_changed_back_counts_again_before_trusting_its_old_bounds(
    store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """500 (4 x 125), then 400 (3 shards, stopping every worker in between), then 500 again.
    Shard 3's bound was last written under 500, when the shard was empty (5 running, nothing
    beside); under 400 the other shards filled past their parts of 500 (20 above them). Back
    at 500, a claim of 120 in shard 3 must not trust that old bound (5 + 120 <= 125): the
    first claim under 400 set every row of 500 aside, so it counts, and takes 100."""
    await store.submit_many([NewTask("noop", "{}") for _ in range(700)])

    def rules(limit: int) -> ClaimRules:
        return ClaimRules(None, None, {"noop": ActionLimit(max_running=limit)})

    async with claimer(db) as others:  # the first claim gets shard 3
        await hold_shards(others, 0, 1, 2)
        await store.claim("default", {"noop": 300.0}, 5, "w", rules(500))
    assert await running_by_slot(conn) == {3: 5}
    assert await claim_until_held(store, conn, 400) == 400  # its shard 0 counts those 5

    async with claimer(db) as others:
        await hold_shards(others, 0, 1, 2)
        await store.claim("default", {"noop": 300.0}, 120, "w", rules(500))
    assert sum((await running_by_slot(conn)).values()) == 500
