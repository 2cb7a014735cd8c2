"""The database agrees with the declaration, and migrating is idempotent and concurrent-safe."""

import asyncio
import difflib
from typing import Any

import asyncpg
import pytest

from tasklease import schema
from tasklease.engine.database import with_database
from tasklease.engine.queries import SQL
from tasklease.engine.states import TRIGGERS, TaskState
from tests.conftest import create_database, drop_database, not_in_pooler_pass
from tests.support.db import connect_db
from tests.support.schema_dump import DECLARED

# What a schema is made of, read from the catalogs (alembic_version aside): equal catalogs,
# equal schemas, whatever statements made them.
CATALOG = {
    "types": "SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)::text "
    "FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid "
    "WHERE t.typnamespace = 'public'::regnamespace GROUP BY 1 ORDER BY 1",
    # the columns in order; their numbers differ where a migration dropped a column
    "columns": "SELECT table_name, rank() OVER (PARTITION BY table_name "
    "ORDER BY ordinal_position), column_name, data_type, udt_name, "
    "is_nullable, column_default, is_identity, identity_generation "
    "FROM information_schema.columns WHERE table_schema = 'public' "
    "AND table_name <> 'alembic_version' ORDER BY 1, 2",
    "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
    "FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
    "AND conrelid::regclass::text <> 'alembic_version' ORDER BY 1, 2",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
    "WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY 1, 2",
    "functions": "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p "
    "WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1",
    "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) "
    "FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2",
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1",
    "sequences": "SELECT sequencename, data_type::text, start_value, increment_by "
    "FROM pg_sequences WHERE schemaname = 'public' ORDER BY 1",
}


async def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await connect_db(dsn)
    try:
        return {part: [tuple(r) for r in await conn.fetch(q)] for part, q in CATALOG.items()}
    finally:
        await conn.close()


async def test_the_declared_schema_is_what_the_migrations_make(admin_dsn: str) -> None:
    """schema/schema.sql applied to one empty database, every migration to another: the same
    types, columns, constraints, indexes, functions, triggers, views and sequences."""
    names = [await create_database(admin_dsn, None) for _ in range(2)]
    migrated, declared = (with_database(admin_dsn, name) for name in names)
    try:
        await schema.upgrade(migrated)
        conn = await connect_db(declared)
        try:
            await conn.execute(DECLARED.read_text())
        finally:
            await conn.close()
        want, got = await catalog(migrated), await catalog(declared)
        assert want["columns"] and want["functions"], "the catalogs read nothing"
        for part in CATALOG:
            diff = "\n".join(
                difflib.unified_diff(
                    [repr(row) for row in want[part]],
                    [repr(row) for row in got[part]],
                    "migrations",
                    "schema/schema.sql",
                    lineterm="",
                )
            )
            assert not diff, (
                f"schema/schema.sql is not what the migrations make ({part}); regenerate it "
                f"with `.venv/bin/python -m tests.support.schema_dump`:\n{diff[:4000]}"
            )
    finally:
        for name in names:
            await drop_database(admin_dsn, name)


async def test_enum_equals_task_state(conn: asyncpg.Connection) -> None:
    labels = await conn.fetchval("SELECT enum_range(NULL::task_state)::text[]")
    assert labels == [s.value for s in TaskState]


async def test_trigger_check_equals_declared_triggers(conn: asyncpg.Connection) -> None:
    definition = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'task_transitions'::regclass AND contype = 'c' "
        "AND pg_get_constraintdef(oid) LIKE '%trigger%ANY%'"
    )
    in_db = {part.split("'")[1] for part in definition.split("::text")[:-1]}
    assert in_db == set(TRIGGERS)


async def test_migrate_is_idempotent(db: str) -> None:
    assert await schema.upgrade(db) == schema.head()
    assert await schema.upgrade(db) == schema.head()


async def test_concurrent_migrations_on_an_empty_database(empty_db: str) -> None:
    revisions = await asyncio.gather(*(schema.upgrade(empty_db) for _ in range(4)))
    assert revisions == [schema.head()] * 4
    conn = await connect_db(empty_db)
    try:
        assert await schema.current(conn) == schema.head()
        assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
    finally:
        await conn.close()


async def test_database_refuses_what_the_machine_forbids(conn: asyncpg.Connection) -> None:
    """Constraints back the guards: no attempt past max_attempts, no RUNNING without a lease."""
    task_id = await conn.fetchval(
        "INSERT INTO tasks (action, payload, max_attempts) VALUES ('noop', '{}', 2) RETURNING id"
    )
    for bad in (
        "UPDATE tasks SET attempt = 3 WHERE id = $1",
        "UPDATE tasks SET state = 'RUNNING' WHERE id = $1",
        "UPDATE tasks SET state = 'BOGUS' WHERE id = $1",
    ):
        try:
            await conn.execute(bad, task_id)
        except (asyncpg.CheckViolationError, asyncpg.InvalidTextRepresentationError):
            continue
        raise AssertionError(f"the database accepted: {bad}")


async def test_0009_downgrades_to_0008_and_upgrades_again(db: str) -> None:
    """0009 replaces tasklease_submit (due_at bounded, a key reused with other content
    refused) and adds tasklease_raise; its downgrade puts 0007's function back."""
    assert await schema.downgrade(db, "0008") == "0008"
    conn = await connect_db(db)
    try:
        assert await conn.fetchval("SELECT to_regproc('tasklease_raise')") is None
        first = await conn.fetchval("SELECT tasklease_submit('noop', idempotency_key => 'k')")
        again = await conn.fetchval(
            "SELECT tasklease_submit('noop', '{\"n\": 2}', idempotency_key => 'k')"
        )
        assert again == first  # 0007: any repeat returns the task
        await conn.fetchval("SELECT tasklease_submit('noop', due_at => '0001-01-01Z')")
        assert await schema.upgrade(db) == schema.head()
        with pytest.raises(asyncpg.UniqueViolationError, match=f"used by task {first}"):
            await conn.fetchval(
                "SELECT tasklease_submit('noop', '{\"n\": 2}', idempotency_key => 'k')"
            )
        with pytest.raises(asyncpg.InvalidParameterValueError, match="due_at"):
            await conn.fetchval("SELECT tasklease_submit('noop', due_at => '0001-01-01Z')")
        with pytest.raises(asyncpg.SerializationError, match="the message"):
            await conn.fetchval("SELECT tasklease_raise('40001', 'the message')")
    finally:
        await conn.close()


async def test_0010_downgrades_to_0009_and_upgrades_again(db: str) -> None:
    """0010 replaces the sharded limits (0003-0006: a function, bounds, starts) with the
    limits and limit_tokens tables; its downgrade puts the machinery of 0009 back."""
    assert await schema.downgrade(db, "0009") == "0009"
    conn = await asyncpg.connect(db)
    try:
        assert await conn.fetchval("SELECT to_regclass('limits')") is None
        caps = await conn.fetch(
            "SELECT * FROM tasklease_claim_slots('default', 3, '{noop}', '{2}', '{5}', '{1}', 10)"
        )
        assert {(r["scope"], r["running_left"]) for r in caps} == {("queue", 3), ("action", 2)}
        assert await conn.fetchval("SELECT count(*) FROM action_starts") == 0
        assert await schema.upgrade(db) == schema.head()
        assert await conn.fetchval("SELECT to_regproc('tasklease_claim_slots')") is None
        assert await conn.fetchval("SELECT to_regclass('limit_bounds')") is None
        assert await conn.fetchval("SELECT count(*) FROM limits") == 0
    finally:
        await conn.close()


@not_in_pooler_pass("a server connection cut behind PgBouncer is not the client's")
async def test_a_start_up_check_whose_connection_is_cut_says_so(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker starting while its connections are cut (tasklease chaos
    --cut-connections-every) gets DatabaseUnavailable, in words, not a BrokenPipeError from
    closing the dead connection."""
    from tasklease.engine import database

    real = database.schema_problem

    async def cut_first(conn: asyncpg.Connection) -> str | None:
        admin = await connect_db(db)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        finally:
            await admin.close()
        return await real(conn)

    monkeypatch.setattr(database, "schema_problem", cut_first)
    with pytest.raises(database.DatabaseUnavailable, match="stopped answering"):
        await database.check(db)


async def test_0012_downgrades_to_0011_and_upgrades_again(db: str) -> None:
    """0012 adds WAITING (an enum value PostgreSQL cannot drop: the downgrade makes the type
    again), the edges, workflows and the settling trigger. A downgrade is refused while
    tasks are or were WAITING."""
    conn = await connect_db(db)
    try:
        await conn.execute(
            "INSERT INTO tasks (action, payload, state, waiting_for) "
            "VALUES ('noop', '{}', 'WAITING', 1)"
        )
        with pytest.raises(Exception, match="tasks are or were WAITING"):
            await schema.downgrade(db, "0011")
        await conn.execute("DELETE FROM tasks")
        assert await schema.downgrade(db, "0011") == "0011"
        labels = await conn.fetchval("SELECT enum_range(NULL::task_state)::text[]")
        assert labels == ["PENDING", "RUNNING", "COMPLETED", "FAILED", "DEAD", "CANCELLED"]
        assert await conn.fetchval("SELECT to_regclass('task_dependencies')") is None
        task_id = await conn.fetchval("SELECT tasklease_submit('noop')")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE tasks SET state = 'RUNNING' WHERE id = $1", task_id)
        assert await schema.upgrade(db) == schema.head()
        assert await conn.fetchval("SELECT 'WAITING'::task_state::text") == "WAITING"
    finally:
        await conn.close()


async def test_0013_downgrades_to_0012_and_upgrades_again(db: str) -> None:
    """0013 adds per-key limits (limits.by, limit_key_tokens, tasks.limit_key/key_token);
    its downgrade removes them with the key: limits, and leaves the other limits."""
    conn = await connect_db(db)
    try:
        await conn.execute(SQL["limit_set"], "action:noop", 3, None, True, None)
        await conn.execute(SQL["limit_set"], "key:noop", 2, None, True, "customer")
        assert await schema.downgrade(db, "0012") == "0012"
        assert await conn.fetchval("SELECT to_regclass('limit_key_tokens')") is None
        assert [r["key"] for r in await conn.fetch("SELECT key FROM limits")] == ["action:noop"]
        assert await schema.upgrade(db) == schema.head()
        await conn.execute(SQL["limit_set"], "key:noop", 2, None, True, "customer")
        assert await conn.fetchval("SELECT count(*) FROM limits") == 2
    finally:
        await conn.close()


async def test_0014_downgrades_to_0013_and_upgrades_again(db: str) -> None:
    """0014 drops the full indexes tasks_action_id and tasks_queue_id; its downgrade makes
    them again."""
    conn = await connect_db(db)
    indexes = """SELECT to_regclass('tasks_action_id') IS NOT NULL,
                        to_regclass('tasks_queue_id') IS NOT NULL"""
    try:
        assert tuple(await conn.fetchrow(indexes)) == (False, False)
        assert await schema.downgrade(db, "0013") == "0013"
        assert tuple(await conn.fetchrow(indexes)) == (True, True)
        assert await schema.upgrade(db) == schema.head()
        assert tuple(await conn.fetchrow(indexes)) == (False, False)
    finally:
        await conn.close()
