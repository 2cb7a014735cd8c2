"""Shared fixtures: a real PostgreSQL, a migrated template database, one database per test.

The server is the embedded one (under .tasklease/test) unless TASKLEASE_TEST_DATABASE_URL
names another; that role must be allowed to create databases.

TASKLEASE_TEST_PGBOUNCER_URL (the CI's pooler pass: a PgBouncer in transaction mode in front
of that server, tests/support/pgbouncer.sh) puts it between tasklease and each test's
database: `db` and `empty_db` are then the database through PgBouncer, and
TASKLEASE_PGBOUNCER names the database directly, for LISTEN. Databases are created and
dropped directly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from tasklease import schema
from tasklease.engine.database import PGBOUNCER_ENV, normalize, with_database
from tasklease.engine.embedded import Embedded
from tasklease.engine.store import Store
from tests.support.db import connect_db
from tests.support.procs import Procs

REPO = Path(__file__).resolve().parent.parent
TEST_URL_ENV = "TASKLEASE_TEST_DATABASE_URL"
PGBOUNCER_URL_ENV = "TASKLEASE_TEST_PGBOUNCER_URL"
# One row per handler execution (tests/support/handlers.py), whichever process ran it.
EXECUTIONS_TABLE = """
CREATE TABLE executions (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker  text NOT NULL,
    token   uuid NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- set by handlers that say when they finished (tests of concurrency limits)
    finished_at timestamptz
);
-- One row per write of a transactional handler (test_tx_write): committed with the task's
-- completion, or rolled back with it.
CREATE TABLE effects (
    task_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker  text NOT NULL
)"""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Embedded | None]:
    if os.environ.get(TEST_URL_ENV):
        yield None
        return
    server = Embedded(REPO / ".tasklease" / "test")
    started = server.ensure_running()
    yield server
    if started:
        server.stop()


@pytest.fixture(scope="session")
def admin_dsn(pg_server: Embedded | None) -> str:
    if pg_server is None:
        return normalize(os.environ[TEST_URL_ENV])
    return pg_server.dsn()


@pytest.fixture(scope="session")
async def server_version(admin_dsn: str) -> int:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return int(await conn.fetchval("SHOW server_version_num"))
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template(admin_dsn: str) -> AsyncIterator[str]:
    name = f"tasklease_tpl_{os.getpid()}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name}")
        await schema.upgrade(with_database(admin_dsn, name))
        tpl = await asyncpg.connect(with_database(admin_dsn, name))
        try:
            await tpl.execute(EXECUTIONS_TABLE)
        finally:
            await tpl.close()
        yield name
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def create_database(admin_dsn: str, template: str | None) -> str:
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(
            f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")
        )
    finally:
        await conn.close()
    return name


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def db(admin_dsn: str, template: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A migrated database of this test's own; DATABASE_URL points at it."""
    name = await create_database(admin_dsn, template)
    dsn = through_pooler(with_database(admin_dsn, name), monkeypatch)
    monkeypatch.setenv("DATABASE_URL", dsn)
    yield dsn
    await drop_database(admin_dsn, name)


@pytest.fixture
async def empty_db(admin_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A database with no schema at all."""
    name = await create_database(admin_dsn, None)
    yield through_pooler(with_database(admin_dsn, name), monkeypatch)
    await drop_database(admin_dsn, name)


def not_in_pooler_pass(why: str) -> pytest.MarkDecorator:
    """Skip a test in the pooler pass (TASKLEASE_TEST_PGBOUNCER_URL), saying why."""
    return pytest.mark.skipif(
        bool(os.environ.get(PGBOUNCER_URL_ENV)), reason=f"not in the PgBouncer pass: {why}"
    )


def through_pooler(direct: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`direct`, or in the pooler pass the same database through PgBouncer, with
    TASKLEASE_PGBOUNCER naming `direct` (tasklease LISTENs there)."""
    dsn, env = pooled(direct)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return dsn


def pooled(direct: str) -> tuple[str, dict[str, str]]:
    """The DATABASE_URL tasklease processes get for the database `direct`, and the
    environment they need besides: in the pooler pass, through PgBouncer."""
    pooler = os.environ.get(PGBOUNCER_URL_ENV)
    if not pooler:
        return direct, {}
    name = urlsplit(direct).path.lstrip("/")
    return with_database(normalize(pooler), name), {PGBOUNCER_ENV: direct}


@pytest.fixture
async def store(db: str) -> AsyncIterator[Store]:
    s = await Store.connect(db, max_size=10)
    yield s
    await s.close()


@pytest.fixture
async def conn(db: str) -> AsyncIterator[asyncpg.Connection]:
    c = await connect_db(db)
    yield c
    await c.close()


@pytest.fixture
def procs(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    """Start tasklease processes on this test's database; their logs are shown on failure."""
    running = Procs(tmp_path, {"DATABASE_URL": db})
    yield running
    running.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(running.dump())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
