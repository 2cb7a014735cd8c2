"""Submission: rows and history rows in one statement, idempotency keys honoured under races."""

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tasklease.engine.store import KeyConflict, KeyTaken, NewTask, Store, submit_on
from tests.support.db import connect_db, triggers, wait_until

LATER = datetime(2030, 1, 1, tzinfo=UTC)


async def test_submit_writes_task_and_history(store: Store, conn: asyncpg.Connection) -> None:
    due = datetime(2026, 1, 20, 12, tzinfo=UTC)
    [s] = await store.submit_many(
        [
            NewTask(
                "email_user",
                '{"user_id": 42}',
                due_at=due,
                priority=3,
                queue="mail",
                max_attempts=2,
            )
        ]
    )
    assert s.created
    t = s.task
    assert (
        t["state"],
        t["attempt"],
        t["max_attempts"],
        t["due_at"],
        t["priority"],
        t["queue"],
    ) == ("PENDING", 0, 2, due, 3, "mail")
    assert await triggers(conn, t["id"]) == ["submit"]


async def test_due_defaults_to_database_now(store: Store, conn: asyncpg.Connection) -> None:
    [s] = await store.submit_many([NewTask("noop", "{}")])
    now = await conn.fetchval("SELECT now()")
    assert abs(now - s.task["due_at"]) < timedelta(seconds=5)


async def test_idempotency_key_returns_the_existing_task(
    store: Store, conn: asyncpg.Connection
) -> None:
    """The same content: the same action, payload as a JSON value (key order and spacing do
    not matter), queue, priority, max_attempts, lease and timeout. due_at is not compared."""
    given = NewTask(
        "noop",
        '{"n": 1, "tags": ["a", "b"]}',
        queue="q",
        priority=3,
        max_attempts=2,
        lease_seconds=30,
        timeout_seconds=9.5,
        idempotency_key="order-7",
    )
    [first] = await store.submit_many([given])
    again = replace(given, payload_json='{ "tags":["a","b"],  "n":1.0 }', due_at=LATER)
    [repeat] = await store.submit_many([again])
    assert first.created and not repeat.created
    assert repeat.task["id"] == first.task["id"]
    assert repeat.task["payload"] == '{"n": 1, "tags": ["a", "b"]}'
    assert repeat.task["due_at"] == first.task["due_at"] != LATER
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 1
    assert await triggers(conn, first.task["id"]) == ["submit"]


DIFFERENT = [
    ({"action": "email_user"}, ("action",)),
    ({"payload_json": '{"n": 2}'}, ("payload",)),
    ({"payload_json": '{"n": "1"}'}, ("payload",)),  # a string is not a number
    ({"payload_json": '{"n": 1, "m": null}'}, ("payload",)),
    ({"queue": "other"}, ("queue",)),
    ({"priority": 4}, ("priority",)),
    ({"max_attempts": 5}, ("max_attempts",)),
    ({"lease_seconds": None}, ("lease_seconds",)),
    ({"timeout_seconds": 10.0}, ("timeout_seconds",)),
    ({"payload_json": "{}", "queue": "other", "priority": 0}, ("payload", "queue", "priority")),
]


@pytest.mark.parametrize(("change", "fields"), DIFFERENT)
async def test_a_key_reused_with_other_content_is_refused_and_writes_nothing(
    store: Store, conn: asyncpg.Connection, change: dict[str, object], fields: tuple[str, ...]
) -> None:
    given = NewTask(
        "noop", '{"n": 1}', queue="q", priority=3, max_attempts=2, lease_seconds=30,
        timeout_seconds=9.5, idempotency_key="order-7",
    )  # fmt: skip
    [first] = await store.submit_many([given])
    with pytest.raises(KeyTaken) as raised:
        await store.submit_many([NewTask("noop", "{}"), replace(given, **change)])  # type: ignore[arg-type]
    assert raised.value.conflicts == [
        KeyConflict(index=1, key="order-7", task_id=first.task["id"], earlier=None, fields=fields)
    ]
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 1
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 1


async def test_a_batch_that_gives_one_key_two_contents_writes_nothing(
    store: Store, conn: asyncpg.Connection
) -> None:
    [held] = await store.submit_many([NewTask("noop", '{"held": 1}', idempotency_key="k0")])
    batch = [
        NewTask("noop", '{"i": 0}'),
        NewTask("noop", '{"i": 1}', idempotency_key="k1"),
        NewTask("noop", '{"i": 1}', idempotency_key="k1", due_at=LATER),  # the same: fine
        NewTask("noop", '{"i": 3}', idempotency_key="k1"),  # not the same as tasks[1]
        NewTask("noop", '{"i": 4}', idempotency_key="k0"),  # not the same as the held task
    ]
    with pytest.raises(KeyTaken) as raised:
        await store.submit_many(batch)
    assert raised.value.conflicts == [
        KeyConflict(index=3, key="k1", task_id=None, earlier=1, fields=("payload",)),
        KeyConflict(index=4, key="k0", task_id=held.task["id"], earlier=None, fields=("payload",)),
    ]
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 1
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 1


async def blocked(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
    )


@pytest.mark.parametrize("same", [True, False])
async def test_a_key_taken_during_a_batch_leaves_none_of_the_batch_behind(
    store: Store, conn: asyncpg.Connection, db: str, same: bool
) -> None:
    """The batch's statement waits on a transaction inserting one of its keys, which commits:
    the statement's snapshot does not see that task, so it cannot tell same from different.
    It fails rather than keep its other task, and runs again, seeing the task."""
    other = await connect_db(db)
    try:
        tx = other.transaction()
        await tx.start()
        await submit_on(
            other.fetch, [NewTask("noop", '{"n": 1}', idempotency_key="k")], own_transaction=False
        )
        batch = [
            NewTask("noop", '{"plain": true}'),
            NewTask("noop", '{"n": 1}', idempotency_key="k"),
        ]
        if not same:
            batch[1] = replace(batch[1], payload_json='{"n": 2}')
        racing = asyncio.create_task(store.submit_many(batch))
        await wait_until(lambda: blocked(conn), "the batch waiting on the key's row")
        await tx.commit()
        if same:
            plain, keyed = await racing
            assert plain.created and not keyed.created
            assert await conn.fetchval("SELECT count(*) FROM tasks") == 2
        else:
            with pytest.raises(KeyTaken):
                await racing
            assert await conn.fetchval("SELECT count(*) FROM tasks") == 1
        assert await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE payload = '{\"plain\": true}'"
        ) == (1 if same else 0)
        assert await conn.fetchval("SELECT count(*) FROM task_transitions") == (2 if same else 1)
    finally:
        await other.close()


async def test_in_the_callers_transaction_a_key_taken_meanwhile_is_a_serialization_failure(
    conn: asyncpg.Connection, db: str
) -> None:
    """The caller's transaction cannot run the statement again: it gets the error that says
    "retry the transaction", and nothing of its batch stays."""
    other, mine = await connect_db(db), await connect_db(db)
    try:
        theirs = other.transaction()
        await theirs.start()
        keyed = NewTask("noop", '{"n": 1}', idempotency_key="k")
        await submit_on(other.fetch, [keyed], own_transaction=False)
        tx = mine.transaction()
        await tx.start()
        racing = asyncio.create_task(
            submit_on(mine.fetch, [NewTask("noop", "{}"), keyed], own_transaction=False)
        )
        await wait_until(lambda: blocked(conn), "the batch waiting on the key's row")
        await theirs.commit()
        with pytest.raises(asyncpg.SerializationError, match="idempotency_key 'k' was taken"):
            await racing
        await tx.rollback()
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 1
    finally:
        await other.close()
        await mine.close()


async def test_racing_submissions_with_one_key_make_one_task(
    store: Store, conn: asyncpg.Connection
) -> None:
    results = await asyncio.gather(
        *(store.submit_many([NewTask("noop", "{}", idempotency_key="race")]) for _ in range(8))
    )
    assert sum(r[0].created for r in results) == 1
    assert len({r[0].task["id"] for r in results}) == 1
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 1


async def test_batch_keeps_input_order_and_resolves_keys(
    store: Store, conn: asyncpg.Connection
) -> None:
    [old] = await store.submit_many([NewTask("noop", '{"old": true}', idempotency_key="k1")])
    batch = [
        NewTask("noop", '{"i": 0}'),
        NewTask("noop", '{"old": true}', idempotency_key="k1"),  # taken before
        NewTask("noop", '{"i": 2}', idempotency_key="k2"),
        NewTask("noop", '{"i": 3}'),
        NewTask("noop", '{"i": 2}', idempotency_key="k2", due_at=LATER),  # repeated within
        NewTask("noop", '{"i": 5}'),
    ]
    out = await store.submit_many(batch)
    assert [s.created for s in out] == [True, False, True, True, False, True]
    assert out[1].task["id"] == old.task["id"] and out[4].task["id"] == out[2].task["id"]
    assert [s.task["payload"] for s in out] == [
        '{"i": 0}',
        '{"old": true}',
        '{"i": 2}',
        '{"i": 3}',
        '{"i": 2}',
        '{"i": 5}',
    ]
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 5
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 5


async def test_batch_is_all_or_nothing(store: Store, conn: asyncpg.Connection) -> None:
    batch = [NewTask("noop", "{}"), NewTask("noop", "{}", max_attempts=0)]  # violates a check
    with pytest.raises(asyncpg.CheckViolationError):
        await store.submit_many(batch)
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
    assert await conn.fetchval("SELECT count(*) FROM task_transitions") == 0


async def test_fetch_keeps_connections_but_never_starves_the_pool(db: str) -> None:
    """Store.fetch keeps connections between calls (at most max_size - 1), and gives them
    back to the pool whenever a call waits for one: many submissions at once beside reads on
    the pool all finish, and close() ends."""
    store = await Store.connect(db, min_size=0, max_size=3)
    try:

        async def submits() -> None:
            for _ in range(20):
                await store.submit_many([NewTask("noop", "{}")])

        async def reads() -> None:
            for _ in range(20):
                await store.counts()

        await asyncio.wait_for(asyncio.gather(*(submits() for _ in range(8)), reads()), 60)
        assert len(store._kept) <= 2
        assert sum(r["tasks"] for r in await store.counts()) == 160
    finally:
        await asyncio.wait_for(store.close(), 30)
