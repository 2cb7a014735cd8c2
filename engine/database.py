"""Which PostgreSQL to use: DATABASE_URL when set, else the embedded server."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tasklease import schema
from tasklease.engine.embedded import Embedded

DEFAULT_DATA_DIR = ".tasklease"


class DatabaseUnavailable(RuntimeError):
    """Said in one line to the user; no traceback."""


def data_dir() -> Path:
    return Path(os.environ.get("TASKLEASE_DATA_DIR", DEFAULT_DATA_DIR)).resolve()


def embedded() -> Embedded:
    return Embedded(data_dir())


def normalize(url: str) -> str:
    """Accept the SQLAlchemy and Heroku spellings too: asyncpg wants postgresql://."""
    return re.sub(r"^(postgres|postgresql)(\+\w+)?://", "postgresql://", url)


def with_database(dsn: str, name: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def resolve() -> tuple[str, Embedded | None]:
    """The DSN to use, and the embedded server behind it (None with DATABASE_URL)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return normalize(url), None
    server = embedded()
    return server.dsn(), server


# --- PgBouncer (transaction pooling) -----------------------------------------------------------
#
# TASKLEASE_PGBOUNCER says that DATABASE_URL goes through a pooler in transaction mode, where a
# server connection is ours only for one transaction: no named prepared statements (each is on
# one server connection), no LISTEN, no session advisory lock or SET. Its value is
#   "1"              poll only: workers poll (--poll-interval), Client.wait polls;
#   postgresql://... a DSN that reaches PostgreSQL itself, used only for LISTEN (one
#                    connection per worker and per waiting client).
# Every connection tasklease opens takes its options from connect_options() below.
PGBOUNCER_ENV = "TASKLEASE_PGBOUNCER"


def pgbouncer() -> str | None:
    """TASKLEASE_PGBOUNCER's value; None when unset, empty or 0 (DATABASE_URL is direct)."""
    value = os.environ.get(PGBOUNCER_ENV, "").strip()
    return None if value in ("", "0") else value


def pooled() -> bool:
    return pgbouncer() is not None


def listen_dsn(dsn: str) -> str | None:
    """Where to LISTEN: `dsn` itself, unless behind a pooler: then the direct DSN
    TASKLEASE_PGBOUNCER names, or None (poll only)."""
    value = pgbouncer()
    if value is None:
        return dsn
    if re.match(r"^(postgres|postgresql)(\+\w+)?://", value):
        return normalize(value)
    return None


def connect_options(application_name: str = "tasklease", **settings: str) -> dict[str, Any]:
    """asyncpg.connect / create_pool keyword arguments for every connection tasklease opens.
    Behind a pooler: unnamed statements (statement_cache_size=0; asyncpg then parses each
    statement in the same round trip as it runs it) and no startup settings but
    application_name, which PgBouncer passes on (it refuses others, such as plan_cache_mode,
    and a SET would leak to the next client of the server connection). Otherwise statements
    are prepared once per connection, the claim too: asyncpg caches none longer than
    max_cacheable_statement_size (15 KiB by default), and the claim is longer (parsed and
    planned again at every claim, it would cost twice its run)."""
    if pooled():
        return {
            "server_settings": {"application_name": application_name},
            "statement_cache_size": 0,
        }
    return {
        "server_settings": {"application_name": application_name, **settings},
        "max_cacheable_statement_size": MAX_CACHED_STATEMENT,
    }


MAX_CACHED_STATEMENT = 64 * 1024  # bytes of SQL text; the claim is about 19 KiB


async def connect(
    dsn: str, application_name: str = "tasklease", **kwargs: Any
) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, **connect_options(application_name), **kwargs)


def sqlalchemy_connect_args(dsn: str, application_name: str = "tasklease") -> dict[str, Any]:
    """create_async_engine(connect_args=...) for SQLAlchemy's asyncpg dialect. It prepares
    every statement under a name: behind a pooler, a unique one, never cached, so that a name
    left on a server connection by another client cannot collide."""
    args: dict[str, Any] = {"dsn": dsn, **connect_options(application_name)}
    if pooled():
        args["prepared_statement_cache_size"] = 0
        args["prepared_statement_name_func"] = lambda: f"__tasklease_{uuid.uuid4().hex}__"
    return args


# What a failed connection attempt can raise; InternalClientError ("cannot switch to state
# N"): a connection whose server end was killed mid-operation.
UNREACHABLE = (
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def schema_problem(conn: asyncpg.Connection) -> str | None:
    """None when the schema is current; else what to do about it."""
    current, head = await schema.current(conn), schema.head()
    if current == head:
        return None
    return (
        f"the database schema is at {current or 'nothing'}, this tasklease needs {head}: "
        "run `tasklease migrate`"
    )


async def check(dsn: str, *, need_schema: bool = True, timeout: float = 10) -> None:
    """Raise DatabaseUnavailable, in words, unless the database answers (and is migrated)."""
    try:
        conn = await connect(dsn, timeout=timeout)
    except UNREACHABLE as exc:
        raise DatabaseUnavailable(
            f"cannot reach the database at {redact(dsn)}: {reason(exc)}"
        ) from None
    try:
        problem = await schema_problem(conn) if need_schema else None
    except UNREACHABLE as exc:
        raise DatabaseUnavailable(
            f"the database at {redact(dsn)} stopped answering: {reason(exc)}"
        ) from None
    finally:
        # a connection cut meanwhile fails to close (BrokenPipeError): it is gone all the same
        with contextlib.suppress(*UNREACHABLE):
            await conn.close()
    if problem:
        raise DatabaseUnavailable(problem)


async def other_clients(dsn: str) -> int:
    conn = await connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return count
    finally:
        await conn.close()


def schema_head() -> str:
    return schema.head()


async def readiness(pool: asyncpg.Pool) -> str | None:
    """None when the database answers and its schema is current; else what is wrong."""
    try:
        async with pool.acquire(timeout=5) as conn:
            return await schema_problem(conn)
    except UNREACHABLE as exc:
        return f"database unreachable: {reason(exc)}"
