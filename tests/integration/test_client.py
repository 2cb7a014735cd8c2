"""tasklease.Client on a real database: the API's validation, reading, operating, waiting,
and submissions inside the caller's own transaction (asyncpg, SQLAlchemy, psycopg, SQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tasklease import (
    Client,
    IdempotencyConflict,
    InvalidTask,
    NoTransaction,
    SyncClient,
    TaskConflict,
    TaskNotFound,
    TaskSpec,
    TaskState,
)
from tasklease.engine.store import Store
from tests.support.db import connect_db, connect_listener, force_state

S = TaskState
HANDLERS = ["tests.support.handlers"]


@pytest.fixture
async def client(db: str) -> AsyncIterator[Client]:
    async with Client(db, handlers=HANDLERS) as c:
        yield c


async def count_tasks(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM tasks")
    return n


async def test_submit_get_history(client: Client) -> None:
    due = datetime.now(UTC) + timedelta(hours=1)
    task = await client.submit(
        "email_user", {"user_id": 42}, due_at=due, queue="mail", priority=3, max_attempts=2
    )
    assert (task.state, task.queue, task.priority, task.max_attempts) == (S.PENDING, "mail", 3, 2)
    assert task.payload == {"user_id": 42} and task.due_at == due
    assert (await client.get(task.id)).id == task.id
    [first] = await client.history(task.id)
    assert (first.trigger, first.from_state, first.to_state) == ("submit", None, S.PENDING)


async def test_a_struct_payload_and_the_action_default(client: Client) -> None:
    class Email(msgspec.Struct):
        user_id: int

    task = await client.submit("email_user", Email(7))
    assert task.payload == {"user_id": 7}
    [batch] = await client.submit_many([{"payload": {"action": "noop"}}])
    assert batch.action == "noop"


@pytest.mark.parametrize(
    ("action", "payload", "options", "named"),
    [
        ("send_fax", {}, {}, "unknown action 'send_fax'; known actions: "),
        ("email_user", {"user_id": "x"}, {}, "payload does not fit action 'email_user'"),
        ("email_user", {"user_id": 1}, {"priority": 5000}, "priority"),
        ("email_user", {"user_id": 1}, {"max_attempts": 0}, "max_attempts"),
        ("email_user", {"user_id": 1}, {"due_at": datetime(2026, 1, 1)}, "due_at"),
        ("email_user", {"user_id": 1}, {"lease_seconds": 0.001}, "lease_seconds"),
        ("", {"user_id": 1}, {}, "action"),
        ("noop", {}, {"idempotency_key": "schedule:nightly:2026-01-01"}, "reserved"),
        ("noop", {}, {"due_at": datetime(1, 1, 1, tzinfo=UTC)}, "due_at: 0001-01-01T00:00:00"),
        ("noop", {}, {"due_at": datetime(2200, 1, 1, tzinfo=UTC)}, "due_at: 2200-01-01"),
    ],
)
async def test_bad_submissions_are_refused_and_named(
    client: Client,
    conn: asyncpg.Connection,
    action: str,
    payload: dict[str, object],
    options: dict[str, object],
    named: str,
) -> None:
    with pytest.raises(InvalidTask, match=named.replace("(", r"\(")):
        await client.submit(action, payload, **options)  # type: ignore[arg-type]
    assert await count_tasks(conn) == 0


async def test_due_at_out_of_range_names_the_field(
    client: Client, conn: asyncpg.Connection
) -> None:
    with pytest.raises(InvalidTask, match="out of range: from 1970-01-01T00:00:00Z") as raised:
        await client.submit("noop", {}, due_at=datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert raised.value.field == "due_at"
    late = TaskSpec(payload={"action": "noop"}, due_at=datetime(2200, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidTask, match=r"^tasks\[1\]\.due_at: ") as raised:
        await client.submit_many([{"action": "noop", "payload": {}}, late])
    assert raised.value.field == "tasks[1].due_at"
    naive = TaskSpec(payload={"action": "noop"}, due_at=datetime(2030, 1, 1))
    with pytest.raises(InvalidTask, match="has no time zone"):
        await client.submit_many([naive])
    assert await count_tasks(conn) == 0
    first = datetime(1970, 1, 1, tzinfo=UTC)
    last = datetime(2199, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert (await client.submit("noop", {}, due_at=first)).due_at == first
    assert (await client.submit("noop", {}, due_at=last)).due_at == last


async def test_unknown_action_lists_the_known_ones(client: Client) -> None:
    with pytest.raises(InvalidTask) as raised:
        await client.submit("send_fax", {})
    assert raised.value.known_actions is not None and "email_user" in raised.value.known_actions


async def test_a_batch_is_all_or_nothing(client: Client, conn: asyncpg.Connection) -> None:
    with pytest.raises(InvalidTask, match=r"tasks\[1\]"):
        await client.submit_many(
            [{"action": "noop", "payload": {}}, {"action": "nope", "payload": {}}]
        )
    assert await count_tasks(conn) == 0
    tasks = await client.submit_many([{"action": "noop", "payload": {"n": i}} for i in range(5)])
    assert [t.payload["n"] for t in tasks] == list(range(5))


async def test_idempotency_key_returns_the_first_task(client: Client) -> None:
    first = await client.submit("noop", {"n": 1}, idempotency_key="k-1")
    again = await client.submit("noop", {"n": 1}, idempotency_key="k-1")
    assert again.id == first.id
    # max_attempts as resolved: test_fail's own (3) whether given or not; due_at not compared
    failing = await client.submit("test_fail", {}, idempotency_key="k-2")
    later = datetime.now(UTC) + timedelta(days=1)
    again = await client.submit(
        "test_fail", {}, idempotency_key="k-2", max_attempts=3, due_at=later
    )
    assert again.id == failing.id and again.due_at == failing.due_at != later


async def test_a_key_reused_with_other_content_is_a_conflict(
    client: Client, conn: asyncpg.Connection
) -> None:
    first = await client.submit("noop", {"n": 1}, idempotency_key="k1")
    with pytest.raises(
        IdempotencyConflict,
        match=f"^idempotency_key 'k1' is already used by task {first.id} with a different payload$",
    ) as raised:
        await client.submit("noop", {"n": 2}, idempotency_key="k1")
    conflict = raised.value
    assert (conflict.key, conflict.task_id, conflict.index, conflict.fields) == (
        "k1",
        first.id,
        None,
        ("payload",),
    )
    with pytest.raises(IdempotencyConflict, match="different max_attempts") as raised:
        await client.submit("noop", {"n": 1}, idempotency_key="k1", max_attempts=7)
    with pytest.raises(IdempotencyConflict, match="different queue and priority"):
        await client.submit("noop", {"n": 1}, idempotency_key="k1", queue="q", priority=1)
    body = {"action": "noop", "payload": {"n": 1}}
    with pytest.raises(IdempotencyConflict) as raised:
        await client.submit_many(
            [
                body,
                {**body, "idempotency_key": "k1"},
                {**body, "idempotency_key": "k1", "queue": "q"},
            ]
        )
    assert raised.value.index == 2 and raised.value.task_id == first.id
    assert str(raised.value).startswith("tasks[2]: idempotency_key 'k1' is already used by task ")
    with pytest.raises(IdempotencyConflict, match=r"^tasks\[1\]: .* also given to tasks\[0\]"):
        await client.submit_many(
            [{**body, "idempotency_key": "k9"}, {**body, "idempotency_key": "k9", "payload": {}}]
        )
    assert await count_tasks(conn) == 1


async def test_a_conflict_in_the_callers_transaction_leaves_it_usable(
    client: Client, db: str, conn: asyncpg.Connection
) -> None:
    """The conflict is seen before anything is written, without an error in the database:
    the caller may catch it and go on, and commit what else it did."""
    held = await client.submit("noop", {"n": 1}, idempotency_key="k1")
    mine = await connect_db(db)
    try:
        async with mine.transaction():
            kept = await client.submit("noop", {"kept": True}, connection=mine)
            with pytest.raises(IdempotencyConflict) as raised:
                await client.submit_many(
                    [
                        {"action": "noop", "payload": {}},
                        {"action": "noop", "payload": {"n": 2}, "idempotency_key": "k1"},
                    ],
                    connection=mine,
                )
            assert (raised.value.task_id, raised.value.index) == (held.id, 1)
            assert await mine.fetchval("SELECT count(*) FROM tasks") == 2
    finally:
        await mine.close()
    assert (await client.get(kept.id)).payload == {"kept": True}
    assert await count_tasks(conn) == 2


def test_sync_client_conflict_through_a_sqlalchemy_session(db: str) -> None:
    engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with SyncClient(db, handlers=HANDLERS) as client:
            held = client.submit("noop", {"n": 1}, idempotency_key="k1")
            with Session(engine) as session, session.begin():
                same = client.submit("noop", {"n": 1}, idempotency_key="k1", connection=session)
                with pytest.raises(IdempotencyConflict) as raised:
                    client.submit("noop", {"n": 2}, idempotency_key="k1", connection=session)
            assert same.id == held.id and raised.value.task_id == held.id
    finally:
        engine.dispose()


async def test_not_found_and_conflicts(client: Client, conn: asyncpg.Connection) -> None:
    with pytest.raises(TaskNotFound):
        await client.get(999)
    with pytest.raises(TaskNotFound):
        await client.history(999)
    task = await client.submit("noop", {})
    assert (await client.cancel(task.id)).state is S.CANCELLED
    with pytest.raises(TaskConflict, match="CANCELLED") as raised:
        await client.cancel(task.id)
    assert raised.value.task.state is S.CANCELLED
    with pytest.raises(TaskConflict):
        await client.requeue(task.id)
    dead = await client.submit("noop", {})
    await force_state(conn, dead.id, S.DEAD)
    requeued = await client.requeue(dead.id)
    assert (requeued.state, requeued.attempt) == (S.PENDING, 0)


async def test_wait_returns_when_the_task_finishes(client: Client, store: Store) -> None:
    task = await client.submit("noop", {})
    waiting = asyncio.create_task(client.wait(task.id, timeout=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    leased = (await store.claim("default", {"noop": 30.0}, 1, "w")).leased
    assert await store.complete(task.id, leased[0].lease_token, '{"ok": true}')
    done = await waiting
    assert (done.state, done.result) == (S.COMPLETED, {"ok": True})
    # many waiters at once, each woken by its own task's final transition
    tasks = [await client.submit("noop", {}) for _ in range(5)]
    waiters = [asyncio.create_task(client.wait(t.id, timeout=30)) for t in tasks]
    await asyncio.sleep(0.2)
    for t in tasks:
        await client.cancel(t.id)
    assert {w.state for w in await asyncio.gather(*waiters)} == {S.CANCELLED}


async def test_wait_times_out(client: Client) -> None:
    task = await client.submit("noop", {})
    with pytest.raises(TimeoutError, match=f"task {task.id} did not finish within 0.3s"):
        await client.wait(task.id, timeout=0.3)


# --- the caller's transaction ------------------------------------------------------------------


async def listen(db: str) -> tuple[asyncpg.Connection, list[str]]:
    """A connection that collects the 'tasklease' notifications (the workers' wake-ups)."""
    woken: list[str] = []
    conn = await connect_listener(db)
    await conn.add_listener("tasklease", lambda *args: woken.append(args[-1]))
    return conn, woken


async def test_asyncpg_transaction_rolled_back_or_committed(
    client: Client, db: str, conn: asyncpg.Connection
) -> None:
    listener, woken = await listen(db)
    mine = await connect_db(db)
    try:
        tx = mine.transaction()
        await tx.start()
        kept = await client.submit("noop", {"n": 1}, queue="q1", connection=mine)
        await asyncio.sleep(0.2)
        assert await count_tasks(conn) == 0, "visible before the caller committed"
        assert woken == [], "workers woken before the commit"
        await tx.commit()
        assert (await client.get(kept.id)).state is S.PENDING
        for _ in range(50):
            if woken:
                break
            await asyncio.sleep(0.05)
        assert woken == ["q1"]

        tx = mine.transaction()
        await tx.start()
        gone = await client.submit("noop", {"n": 2}, connection=mine)
        await tx.rollback()
        with pytest.raises(TaskNotFound):
            await client.get(gone.id)
        assert await count_tasks(conn) == 1
    finally:
        await mine.close()
        await listener.close()


async def test_a_submit_in_its_own_transaction_wakes_its_queue_after_the_commit(
    client: Client, db: str
) -> None:
    """Not a NOTIFY inside the submission (it would serialise concurrent commits): one sent
    after it, for the tasks created only."""
    listener, woken = await listen(db)

    async def heard(expected: list[str]) -> None:
        for _ in range(50):
            if woken == expected:
                return
            await asyncio.sleep(0.05)
        assert woken == expected

    try:
        await client.submit("noop", {"n": 1}, queue="q2")
        await heard(["q2"])
        await client.submit("noop", {}, queue="q3", idempotency_key="wake-once")
        await heard(["q2", "q3"])
        await client.submit("noop", {}, queue="q3", idempotency_key="wake-once")  # a repeat
        await asyncio.sleep(0.3)
        assert woken == ["q2", "q3"], "a repeat created nothing, so wakes no one"
        await client.submit_many([{"action": "noop", "payload": {}, "queue": q} for q in "ab"])
        await heard(["q2", "q3", "a", "b"])
    finally:
        await listener.close()


async def test_asyncpg_connection_without_a_transaction_is_refused(client: Client, db: str) -> None:
    mine = await connect_db(db)
    try:
        with pytest.raises(NoTransaction, match="no open transaction"):
            await client.submit("noop", {}, connection=mine)
    finally:
        await mine.close()


async def test_sqlalchemy_async_session_and_connection(
    client: Client, db: str, conn: asyncpg.Connection
) -> None:
    engine = create_async_engine(db.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with AsyncSession(engine) as session:
            await session.execute(text("SELECT 1"))
            await client.submit("noop", {"n": "rolled back"}, connection=session)
            await session.rollback()
        async with AsyncSession(engine) as session:
            # nothing run through the session yet: the submit is its first statement
            kept = await client.submit("noop", {"n": "session"}, connection=session)
            assert await count_tasks(conn) == 0
            await session.commit()
        async with engine.connect() as aconn:
            await client.submit_many(
                [{"action": "noop", "payload": {"n": i}} for i in range(3)], connection=aconn
            )
            await aconn.rollback()
        async with engine.begin() as aconn:
            await client.submit("noop", {"n": "connection"}, connection=aconn)
    finally:
        await engine.dispose()
    rows = await conn.fetch("SELECT payload->>'n' AS n FROM tasks ORDER BY id")
    assert [r["n"] for r in rows] == ["session", "connection"]
    assert (await client.get(kept.id)).payload == {"n": "session"}


async def test_sqlalchemy_psycopg_async_session(
    client: Client, db: str, conn: asyncpg.Connection
) -> None:
    engine = create_async_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        async with AsyncSession(engine) as session:
            await client.submit("noop", {"n": "psycopg async"}, connection=session)
            await session.rollback()
        async with AsyncSession(engine) as session:
            task = await client.submit(
                "noop", {"n": "psycopg async"}, idempotency_key="pa", connection=session
            )
            await session.commit()
    finally:
        await engine.dispose()
    assert await count_tasks(conn) == 1
    assert (await client.get(task.id)).idempotency_key == "pa"


def test_sync_client_with_a_sqlalchemy_session_on_psycopg(db: str) -> None:
    engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with SyncClient(db, handlers=HANDLERS) as client:
            with Session(engine) as session:
                session.execute(text("SELECT 1"))
                client.submit("noop", {"n": "rolled back"}, connection=session)
                session.rollback()
            with Session(engine) as session, session.begin():
                kept = client.submit(
                    "email_user",
                    {"user_id": 5},
                    due_at=datetime.now(UTC) - timedelta(seconds=1),
                    connection=session,
                )
                batch = client.submit_many(
                    [{"action": "noop", "payload": {"n": i}} for i in range(2)],
                    connection=session,
                )
            assert client.get(kept.id).payload == {"user_id": 5}
            assert [client.get(t.id).payload["n"] for t in batch] == [0, 1]
            with psycopg.connect(db) as raw:
                assert raw.execute("SELECT count(*) FROM tasks").fetchone() == (3,)
            cancelled = client.cancel(kept.id)
            assert client.wait(cancelled.id, timeout=5).state is S.CANCELLED
    finally:
        engine.dispose()


def test_psycopg_connection_in_autocommit_is_refused(db: str) -> None:
    with (
        SyncClient(db) as client,
        psycopg.connect(db, autocommit=True) as raw,
        pytest.raises(NoTransaction, match="autocommit"),
    ):
        client.submit("noop", {}, connection=raw)


async def test_connection_of_another_kind_is_refused(client: Client) -> None:
    with pytest.raises(TypeError, match="connection= takes an asyncpg connection"):
        await client.submit("noop", {}, connection=object())


# --- tasklease_submit() in SQL -----------------------------------------------------------------


async def test_sql_function_submits_in_the_callers_transaction(
    client: Client, conn: asyncpg.Connection
) -> None:
    async with conn.transaction():
        task_id = await conn.fetchval(
            "SELECT tasklease_submit('email_user', '{\"user_id\": 9}', queue => 'mail', "
            "priority => 2, idempotency_key => 'sql-1')"
        )
    task = await client.get(task_id)
    assert (task.action, task.payload, task.queue, task.priority) == (
        "email_user",
        {"user_id": 9},
        "mail",
        2,
    )
    assert [t.trigger for t in await client.history(task_id)] == ["submit"]
    again = await conn.fetchval(
        "SELECT tasklease_submit('email_user', '{\"user_id\":9}', queue => 'mail', "
        "priority => 2, idempotency_key => 'sql-1', due_at => now() + interval '1 day')"
    )
    assert again == task_id  # the same content (due_at is not compared)
    tx = conn.transaction()
    await tx.start()
    await conn.fetchval("SELECT tasklease_submit('noop')")
    await tx.rollback()
    assert await count_tasks(conn) == 1


@pytest.mark.parametrize(
    ("call", "different"),
    [
        ("tasklease_submit('noop', '{\"n\": 2}', idempotency_key => 'k1')", "payload"),
        ("tasklease_submit('email_user', '{\"n\": 1}', idempotency_key => 'k1')", "action"),
        ("tasklease_submit('noop', '{\"n\": 1}', queue => 'q', idempotency_key => 'k1')", "queue"),
        (
            "tasklease_submit('noop', '{\"n\": 1}', max_attempts => 3, priority => 1, "
            "idempotency_key => 'k1')",
            "priority, max_attempts",
        ),
        (
            "tasklease_submit('noop', '{\"n\": 1}', lease_seconds => 60, "
            "timeout_seconds => 5, idempotency_key => 'k1')",
            "lease_seconds, timeout_seconds",
        ),
    ],
)
async def test_sql_function_refuses_a_key_reused_with_other_content(
    conn: asyncpg.Connection, call: str, different: str
) -> None:
    held = await conn.fetchval(
        "SELECT tasklease_submit('noop', '{\"n\": 1}', idempotency_key => 'k1')"
    )
    same = await conn.fetchval(
        "SELECT tasklease_submit('noop', '{ \"n\":1.0 }', idempotency_key => 'k1', "
        "due_at => '2150-01-01Z')"
    )
    assert same == held
    with pytest.raises(asyncpg.UniqueViolationError) as raised:
        await conn.fetchval(f"SELECT {call}")
    assert raised.value.message == (
        f"tasklease_submit: idempotency_key 'k1' is already used by task {held} "
        f"with a different {different}"
    )
    assert raised.value.detail == f"task_id={held} fields={different.replace(', ', ',')}"
    assert await count_tasks(conn) == 1


@pytest.mark.parametrize(
    "due_at", ["1970-01-01 00:00:00+00", "1970-01-01 01:00:00+01", "2199-12-31 23:59:59.999999+00"]
)
async def test_sql_function_takes_due_times_from_1970_to_2200(
    conn: asyncpg.Connection, due_at: str
) -> None:
    task_id = await conn.fetchval(
        "SELECT tasklease_submit('noop', due_at => $1::text::timestamptz)", due_at
    )
    assert await conn.fetchval(
        "SELECT due_at = $1::text::timestamptz FROM tasks WHERE id = $2", due_at, task_id
    )


@pytest.mark.parametrize(
    ("call", "named"),
    [
        ("tasklease_submit('')", "action must be 1 to 200 characters"),
        ("tasklease_submit('noop', due_at => '-infinity')", "due_at must be from 1970-01-01"),
        ("tasklease_submit('noop', due_at => 'infinity')", "due_at must be from 1970-01-01"),
        ("tasklease_submit('noop', due_at => '0001-01-01Z')", "due_at"),
        ("tasklease_submit('noop', due_at => '1969-12-31 23:59:59.999999Z')", "due_at"),
        ("tasklease_submit('noop', due_at => '2200-01-01Z')", "up to \\(not including\\)"),
        ("tasklease_submit('noop', '[1]')", "payload must be a JSON object, not array"),
        ("tasklease_submit('noop', priority => 5000)", "priority"),
        ("tasklease_submit('noop', max_attempts => 0)", "max_attempts"),
        ("tasklease_submit('noop', lease_seconds => 0.5)", "lease_seconds"),
        ("tasklease_submit('noop', timeout_seconds => 0)", "timeout_seconds"),
        ("tasklease_submit('noop', queue => '')", "queue"),
        ("tasklease_submit('noop', idempotency_key => '')", "idempotency_key"),
        ("tasklease_submit('noop', idempotency_key => 'schedule:n:1')", "reserved"),
    ],
)
async def test_sql_function_refuses_bad_arguments(
    conn: asyncpg.Connection, call: str, named: str
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match=named):
        await conn.fetchval(f"SELECT {call}")
    assert await count_tasks(conn) == 0
