"""Workflows (docs/workflows.md) on the real database: WAITING, the wake-up in the
completing transaction, failure policies, graph checks, results passed on, fan-in."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tasklease import Client, InvalidTask, TaskState
from tasklease.engine.store import Store
from tests.support.db import assert_histories_are_paths, connect_db, wait_until
from tests.support.workers import Running

S = TaskState
HANDLERS = ["tests.support.handlers"]
LEASES = {"noop": 30.0, "test_flow": 30.0}


@pytest.fixture
async def client(db: str) -> AsyncIterator[Client]:
    async with Client(db, handlers=HANDLERS) as c:
        yield c


def diamond(tag: str = "") -> list[dict[str, Any]]:
    """charge -> [email, invoice] -> archive (the order of docs/workflows.md)."""
    return [
        {"ref": f"charge{tag}", "action": "noop", "payload": {}},
        {"ref": f"email{tag}", "action": "noop", "payload": {}, "depends_on": [f"charge{tag}"]},
        {"ref": f"invoice{tag}", "action": "noop", "payload": {}, "depends_on": [f"charge{tag}"]},
        {
            "ref": f"archive{tag}",
            "action": "noop",
            "payload": {},
            "depends_on": [f"email{tag}", f"invoice{tag}"],
        },
    ]


async def states(conn: asyncpg.Connection, *ids: int) -> list[str]:
    rows = await conn.fetch("SELECT id, state FROM tasks WHERE id = ANY($1)", list(ids))
    by_id = {r["id"]: r["state"] for r in rows}
    return [by_id[i] for i in ids]


async def claim(store: Store, n: int = 100) -> dict[int, Any]:
    return {t.id: t.lease_token for t in (await store.claim("default", LEASES, n, "w")).leased}


async def history(conn: asyncpg.Connection, task_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT trigger, from_state, to_state, at, detail FROM task_transitions "
        "WHERE task_id = $1 ORDER BY id",
        task_id,
    )


async def test_a_diamond_runs_in_order_and_wakes_in_the_completing_transaction(
    client: Client, store: Store, conn: asyncpg.Connection
) -> None:
    a, b, c, d = await client.submit_many(diamond())
    assert [t.state for t in (a, b, c, d)] == [S.PENDING, S.WAITING, S.WAITING, S.WAITING]
    assert (d.waiting_for, d.dependencies) == (2, 2)
    assert a.workflow_id is not None and {t.workflow_id for t in (b, c, d)} == {a.workflow_id}

    # only the task without dependencies is claimable
    leased = await claim(store)
    assert set(leased) == {a.id}
    assert await store.complete(a.id, leased[a.id], '{"charged": 42}')
    assert await states(conn, b.id, c.id, d.id) == ["PENDING", "PENDING", "WAITING"]
    done_at = (await history(conn, a.id))[-1]["at"]
    for dependant in (b.id, c.id):
        steps = await history(conn, dependant)
        assert [(s["trigger"], s["to_state"]) for s in steps] == [
            ("submit", "WAITING"),
            ("ready", "PENDING"),
        ]
        assert steps[-1]["at"] == done_at  # now(): the same transaction as the completion

    leased = await claim(store)
    assert set(leased) == {b.id, c.id}
    assert await store.complete(b.id, leased[b.id], "1")
    assert await states(conn, d.id) == ["WAITING"]
    assert await claim(store) == {}
    assert await store.complete(c.id, leased[c.id], "2")
    assert await states(conn, d.id) == ["PENDING"]
    leased = await claim(store)
    assert set(leased) == {d.id}
    assert await store.complete(d.id, leased[d.id], "3")
    await assert_histories_are_paths(conn)


async def test_dependency_results_are_passed_on(
    client: Client, store: Store, workers: Running, conn: asyncpg.Connection
) -> None:
    tasks = await client.submit_many(
        [
            {"ref": "charge", "action": "test_flow", "payload": {"value": {"charged": 42}}},
            {
                "ref": "email",
                "action": "test_flow",
                "payload": {"value": "sent"},
                "depends_on": ["charge"],
            },
            {
                "ref": "invoice",
                "action": "test_flow",
                "payload": {"value": "inv-1"},
                "depends_on": ["charge"],
            },
            {
                "ref": "archive",
                "action": "test_flow",
                "payload": {},
                "depends_on": ["email", "invoice"],
            },
        ]
    )
    charge, email, invoice, archive = tasks
    workers.start(store)
    done = await client.wait(archive.id, timeout=60)
    assert done.state is S.COMPLETED
    assert done.result["results"] == {
        str(email.id): {
            "value": "sent",
            "results": {str(charge.id): _flow({"charged": 42})},
            "states": {str(charge.id): "COMPLETED"},
            "counts": {"COMPLETED": 1},
        },
        str(invoice.id): {
            "value": "inv-1",
            "results": {str(charge.id): _flow({"charged": 42})},
            "states": {str(charge.id): "COMPLETED"},
            "counts": {"COMPLETED": 1},
        },
    }
    # no dependant started before its dependencies completed: its claim follows their
    # completion in the history (one identity, in commit order for one task's chain)
    for dependant, dependencies in (
        (email, [charge]),
        (invoice, [charge]),
        (archive, [email, invoice]),
    ):
        claimed = await conn.fetchval(
            "SELECT min(id) FROM task_transitions WHERE task_id = $1 AND trigger = 'claim'",
            dependant.id,
        )
        for dep in dependencies:
            completed = await conn.fetchval(
                "SELECT id FROM task_transitions WHERE task_id = $1 AND trigger = 'complete'",
                dep.id,
            )
            assert completed < claimed
    runs = await conn.fetchval("SELECT count(*) FROM executions")
    assert runs == 4


def _flow(value: Any) -> dict[str, Any]:
    return {"value": value, "results": {}, "states": {}, "counts": {}}


async def test_cycles_and_bad_graphs_are_refused_and_nothing_is_written(
    client: Client, conn: asyncpg.Connection
) -> None:
    bad: list[tuple[list[dict[str, Any]], str]] = [
        (
            [
                {"ref": "a", "action": "noop", "payload": {}, "depends_on": ["c"]},
                {"ref": "b", "action": "noop", "payload": {}, "depends_on": ["a"]},
                {"ref": "c", "action": "noop", "payload": {}, "depends_on": ["b"]},
            ],
            re.escape("cycle: tasks[0] ('a') -> tasks[2] ('c') -> tasks[1] ('b') -> tasks[0]"),
        ),
        ([{"ref": "a", "action": "noop", "payload": {}, "depends_on": ["a"]}], "itself"),
        ([{"ref": "a", "action": "noop", "payload": {}, "depends_on": ["zz"]}], "ref 'zz'"),
        (
            [
                {"ref": "a", "action": "noop", "payload": {}},
                {"ref": "a", "action": "noop", "payload": {}},
            ],
            "also the ref of tasks\\[0\\]",
        ),
        (
            [
                {"ref": "a", "action": "noop", "payload": {}},
                {"action": "noop", "payload": {}, "depends_on": ["a", "a"]},
            ],
            "twice",
        ),
        (
            [
                {"ref": "a", "action": "noop", "payload": {}},
                {"action": "noop", "payload": {}, "depends_on": ["a", 987654321]},
            ],
            "task 987654321 does not exist",
        ),
    ]
    for tasks, message in bad:
        with pytest.raises(InvalidTask, match=message):
            await client.submit_many(tasks)
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
    assert await conn.fetchval("SELECT count(*) FROM task_dependencies") == 0
    assert await conn.fetchval("SELECT count(*) FROM workflows") == 0


async def test_depending_on_existing_tasks(
    client: Client, store: Store, conn: asyncpg.Connection
) -> None:
    first = await client.submit("noop", {})
    done = await client.submit("noop", {})
    leased = await claim(store)
    assert await store.complete(done.id, leased[done.id], "7")
    # one dependency already completed: waits only for the other
    later = await client.submit("noop", {}, depends_on=[first.id, done.id])
    assert (later.state, later.waiting_for, later.dependencies) == (S.WAITING, 1, 2)
    assert later.workflow_id is None
    assert await store.complete(first.id, leased[first.id], "8")
    assert await states(conn, later.id) == ["PENDING"]
    # all completed already: PENDING at once
    again = await client.submit("noop", {}, depends_on=[first.id])
    assert (again.state, again.waiting_for) == (S.PENDING, 0)
    # a cancelled dependency with on_failure=cancel would cancel it at once: refused
    gone = await client.submit("noop", {})
    await client.cancel(gone.id)
    with pytest.raises(InvalidTask, match=f"task {gone.id} is CANCELLED"):
        await client.submit("noop", {}, depends_on=[gone.id])
    runs_anyway = await client.submit("noop", {}, depends_on=[gone.id], on_failure="run")
    assert runs_anyway.state is S.PENDING
    await assert_histories_are_paths(conn)


async def test_failure_policies(client: Client, store: Store, conn: asyncpg.Connection) -> None:
    # cancel (default): DEAD charge abandons email and invoice, and archive by cascade
    a, b, c, d = await client.submit_many(diamond("1"))
    leased = await claim(store)
    assert await store.bury(a.id, leased[a.id], "card declined", True)
    assert await states(conn, b.id, c.id, d.id) == ["CANCELLED"] * 3
    assert [s["trigger"] for s in await history(conn, d.id)] == ["submit", "abandon"]

    # run: the dependants run anyway, and see the dependency's state
    a, b, c, d = await client.submit_many(diamond("2"), on_failure="run")
    leased = await claim(store)
    assert await store.bury(a.id, leased[a.id], "card declined", True)
    assert await states(conn, b.id, c.id, d.id) == ["PENDING", "PENDING", "WAITING"]

    # hold: WAITING while the dependency is DEAD; requeued and completed, they go on
    a, b, c, d = await client.submit_many(diamond("3"), on_failure="hold")
    leased = await claim(store)
    leased = {i: t for i, t in leased.items() if i == a.id}
    assert await store.bury(a.id, leased[a.id], "card declined", True)
    assert await states(conn, b.id, c.id, d.id) == ["WAITING"] * 3
    await client.requeue(a.id)
    leased = await claim(store)
    assert a.id in leased
    assert await store.complete(a.id, leased[a.id], "1")
    assert await states(conn, b.id, c.id) == ["PENDING", "PENDING"]

    # per edge: archive runs even if the invoice fails, not if the email does
    tasks = diamond("4")
    tasks[3]["depends_on"] = ["email4", {"task": "invoice4", "on_failure": "run"}]
    a, b, c, d = await client.submit_many(tasks)
    leased = await claim(store)
    assert await store.complete(a.id, leased[a.id], "1")
    leased = await claim(store)
    assert await store.bury(c.id, leased[c.id], "no printer", True)
    assert await states(conn, d.id) == ["WAITING"]
    assert await store.complete(b.id, leased[b.id], "1")
    assert await states(conn, d.id) == ["PENDING"]

    # an operator cancels a WAITING task: its dependants are abandoned
    a, b, c, d = await client.submit_many(diamond("5"))
    await client.cancel(b.id)
    assert await states(conn, b.id, c.id, d.id) == ["CANCELLED", "WAITING", "CANCELLED"]
    await assert_histories_are_paths(conn)


async def test_fan_in_runs_once_with_counts(
    client: Client, store: Store, workers: Running, conn: asyncpg.Connection
) -> None:
    members = [{"action": "test_flow", "payload": {"fail": i % 3 == 0}} for i in range(9)]
    submitted = await client.submit_many(members, on_finish={"action": "test_flow", "payload": {}})
    *tasks, finish = submitted
    assert finish.state is S.WAITING and finish.dependencies == 9
    workers.start(store)
    workers.start(store)
    done = await client.wait(finish.id, timeout=60)
    assert done.result["counts"] == {"COMPLETED": 6, "DEAD": 3}
    assert await conn.fetchval("SELECT count(*) FROM executions WHERE task_id = $1", finish.id) == 1
    row = await conn.fetchrow("SELECT on_finish FROM workflows WHERE id = $1", tasks[0].workflow_id)
    assert row["on_finish"] == finish.id


async def test_concurrent_last_completions_wake_the_dependant_exactly_once(
    client: Client, store: Store, db: str
) -> None:
    """Two members complete at the same moment on two connections: the row lock orders the
    count-downs, exactly one sees 0 and writes `ready`."""
    for _ in range(25):
        *members, finish = await client.submit_many(
            [{"action": "noop", "payload": {}} for _ in range(2)],
            on_finish={"action": "noop", "payload": {}},
        )
        leased = await claim(store)
        tokens = [leased[m.id] for m in members]
        stores = [await Store.connect(db, max_size=1) for _ in members]
        try:
            moved = await asyncio.gather(
                *(s.complete(m.id, t, "1") for s, m, t in zip(stores, members, tokens, strict=True))
            )
        finally:
            for s in stores:
                await s.close()
        assert moved == [True, True]
        conn = await connect_db(db)
        try:
            readies = await conn.fetchval(
                "SELECT count(*) FROM task_transitions WHERE task_id = $1 AND trigger = 'ready'",
                finish.id,
            )
            assert readies == 1
            assert await states(conn, finish.id) == ["PENDING"]
        finally:
            await conn.close()
        leased = await claim(store)
        assert await store.complete(finish.id, leased[finish.id], "1")


async def test_submission_racing_the_dependencys_completion_is_never_stranded(
    client: Client, store: Store, conn: asyncpg.Connection, db: str
) -> None:
    """A task submitted to wait for a RUNNING task while that task completes: either the
    submission sees it completed, or the completion sees the new edge. Never stranded."""
    other = await Store.connect(db, max_size=2)
    try:
        for _ in range(30):
            dep = await client.submit("noop", {})
            leased = await claim(store)
            completing = store.complete(dep.id, leased[dep.id], "1")
            submitting = client.submit("noop", {}, depends_on=[dep.id])
            _, waiting = await asyncio.gather(completing, submitting)
            assert await states(conn, waiting.id) == ["PENDING"]
            await claim(store)  # take it out of the way
    finally:
        await other.close()


async def test_a_dependant_of_an_expired_lease_is_settled_by_the_claim(
    client: Client, store: Store, conn: asyncpg.Connection
) -> None:
    """A worker killed on the last attempt: the claim expires the lease (RUNNING -> DEAD) and
    the trigger abandons the dependant in that transaction; the claim is unchanged."""
    a, b = await client.submit_many(
        [
            {"ref": "a", "action": "noop", "payload": {}, "max_attempts": 1},
            {"action": "noop", "payload": {}, "depends_on": ["a"]},
        ]
    )
    await claim(store)
    await conn.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1s' WHERE id = $1", a.id
    )
    result = await store.claim("default", LEASES, 10, "w2")
    assert result.expired == [a.id]
    assert await states(conn, a.id, b.id) == ["DEAD", "CANCELLED"]
    await assert_histories_are_paths(conn)


async def test_wait_sees_waiting_as_unfinished(
    client: Client, workers: Running, store: Store
) -> None:
    _, b = await client.submit_many(
        [
            {"ref": "a", "action": "test_flow", "payload": {"seconds": 0.2}},
            {"action": "test_flow", "payload": {}, "depends_on": ["a"]},
        ]
    )
    workers.start(store)
    await wait_until(lambda: _finished(client, b.id), "the dependant to finish")
    assert (await client.get(b.id)).state is S.COMPLETED


async def _finished(client: Client, task_id: int) -> bool:
    return (await client.get(task_id)).finished


async def test_idempotency_keys_are_refused_in_a_workflow(
    client: Client, conn: asyncpg.Connection
) -> None:
    """Not supported yet (docs/workflows.md): refused, never silently dropped."""
    with pytest.raises(InvalidTask, match="idempotency_key: not supported in a workflow"):
        await client.submit_many(
            [
                {"ref": "a", "action": "noop", "payload": {}, "idempotency_key": "k"},
                {"action": "noop", "payload": {}, "depends_on": ["a"]},
            ]
        )
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 0


async def test_a_graph_in_the_callers_transaction_asyncpg_and_psycopg(
    client: Client, db: str, conn: asyncpg.Connection
) -> None:
    """Transactional enqueue of a whole graph: it exists if and only if the caller commits."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    mine = await connect_db(db)
    try:
        async with mine.transaction():
            kept = await client.submit_many(diamond("x"), connection=mine)
            assert kept[3].state is S.WAITING
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 4
        with pytest.raises(ZeroDivisionError):
            async with mine.transaction():
                await client.submit_many(diamond("y"), connection=mine)
                _ = 1 / 0  # the application fails: no graph either
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 4
        assert await conn.fetchval("SELECT count(*) FROM task_dependencies") == 4
    finally:
        await mine.close()
    engine = create_async_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        async with AsyncSession(engine) as session:
            made = await client.submit_many(
                diamond("p"), on_finish={"action": "noop", "payload": {}}, connection=session
            )
            await session.commit()
    finally:
        await engine.dispose()
    assert [t.state for t in made] == [S.PENDING, S.WAITING, S.WAITING, S.WAITING, S.WAITING]
    wf = await client.workflow(made[0].workflow_id)
    assert [t.id for t in wf] == [t.id for t in made]
    edges = await conn.fetchval(
        "SELECT count(*) FROM task_dependencies WHERE task_id = ANY($1)", [t.id for t in made]
    )
    assert edges == 4 + 4


async def _blocked_on_a_lock(conn: asyncpg.Connection) -> bool:
    waiting = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    return bool(waiting)


@pytest.mark.parametrize("settle", [False, True], ids=["by-trigger", "settling-statement"])
async def test_a_completion_that_waited_for_a_submissions_lock_sees_its_dependant(
    client: Client, store: Store, conn: asyncpg.Connection, db: str, settle: bool
) -> None:
    """The submission counts itself on the dependency's row (its lock) and commits while the
    completion waits for that lock: the trigger's fresh snapshot sees the new edge."""
    dep = await client.submit("noop", {})
    leased = await claim(store)
    mine = await connect_db(db)
    try:
        tx = mine.transaction()
        await tx.start()
        waiting = await client.submit("noop", {}, depends_on=[dep.id], connection=mine)
        assert waiting.state is S.WAITING
        completing = asyncio.ensure_future(
            store.complete_many([(dep.id, leased[dep.id], "1")], settle=settle)
        )
        await wait_until(lambda: _blocked_on_a_lock(conn), "the completion to wait for the lock")
        await tx.commit()
        assert await completing == {dep.id}
    finally:
        await mine.close()
    assert await states(conn, waiting.id) == ["PENDING"]
    assert [s["trigger"] for s in await history(conn, waiting.id)] == ["submit", "ready"]


@pytest.mark.parametrize("settle", [False, True], ids=["by-trigger", "settling-statement"])
async def test_a_submission_that_waited_for_a_completions_lock_sees_it_completed(
    client: Client, store: Store, conn: asyncpg.Connection, db: str, settle: bool
) -> None:
    """The completion holds the dependency's row lock: the submission waits, then reads the
    committed COMPLETED row and starts PENDING, its edge already satisfied."""
    dep = await client.submit("noop", {})
    leased = await claim(store)
    mine = await connect_db(db)
    try:
        tx = mine.transaction()
        await tx.start()
        moved = await mine.fetch(_complete_sql(settle), [dep.id], [leased[dep.id]], ["1"])
        assert [r["id"] for r in moved] == [dep.id]
        submitting = asyncio.ensure_future(client.submit("noop", {}, depends_on=[dep.id]))
        await wait_until(lambda: _blocked_on_a_lock(conn), "the submission to wait for the lock")
        await tx.commit()
        submitted = await submitting
    finally:
        await mine.close()
    assert (submitted.state, submitted.waiting_for) == (S.PENDING, 0)
    satisfied = await conn.fetchval(
        "SELECT satisfied FROM task_dependencies WHERE task_id = $1", submitted.id
    )
    assert satisfied is True


def _complete_sql(settle: bool) -> str:
    from tasklease.engine.queries import SQL

    return SQL[
        "task_complete_settling_many_if_leased" if settle else "task_complete_many_if_leased"
    ]


async def test_a_long_chain_is_abandoned_in_one_go_and_its_run_edges_settled(
    client: Client, store: Store, conn: asyncpg.Connection
) -> None:
    """A failure cascades down a chain of 2,000 tasks without nesting a trigger call per
    link (PostgreSQL's stack would run out); a task waiting on a link under on_failure=run
    is made ready."""
    n = 2000
    chain: list[dict[str, Any]] = [
        {"ref": f"t{i}", "action": "noop", "payload": {}, "max_attempts": 1}
        | ({"depends_on": [f"t{i - 1}"]} if i else {})
        for i in range(n)
    ]
    chain.append(
        {"action": "noop", "payload": {}, "depends_on": [{"task": "t1500", "on_failure": "run"}]}
    )
    tasks = await client.submit_many(chain)
    leased = await claim(store)
    assert set(leased) == {tasks[0].id}
    assert await store.bury(tasks[0].id, leased[tasks[0].id], "fatal", True)
    counts = dict(await conn.fetch("SELECT state, count(*) FROM tasks GROUP BY 1"))
    assert counts == {"DEAD": 1, "CANCELLED": n - 1, "PENDING": 1}
    assert [s["trigger"] for s in await history(conn, tasks[-1].id)] == ["submit", "ready"]
    await assert_histories_are_paths(conn)


async def test_a_missing_dependency_is_named_through_psycopg_too(
    client: Client, db: str, conn: asyncpg.Connection
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        async with AsyncSession(engine) as session:
            with pytest.raises(InvalidTask, match="task 987654321 does not exist"):
                await client.submit("noop", {}, depends_on=[987654321], connection=session)
    finally:
        await engine.dispose()
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 0


async def test_the_claim_says_how_many_wait_for_a_task_so_the_worker_settles_them_at_once(
    client: Client, store: Store, conn: asyncpg.Connection
) -> None:
    """A worker completes a batch holding a task with dependants with the settling statement
    (engine/executor.py), the others with the plain one: the claim tells it which."""
    charge, email, invoice, archive = await client.submit_many(diamond())
    alone = await client.submit("noop", {})
    leased = {t.id: t for t in (await store.claim("default", LEASES, 10, "w")).leased}
    assert {i: t.dependants for i, t in leased.items()} == {charge.id: 2, alone.id: 0}
    assert await store.complete_many(
        [(charge.id, leased[charge.id].lease_token, "1")], settle=True
    ) == {charge.id}
    assert await states(conn, email.id) == ["PENDING"] == await states(conn, invoice.id)
    assert await states(conn, archive.id) == ["WAITING"]
    # the settling statement counted the edges it settled: the trigger is not called for them
    assert await conn.fetchval("SELECT dependants FROM tasks WHERE id = $1", charge.id) == 0
