"""Which PostgreSQL to use: DATABASE_URL when set, else the embedded server."""

from __future__ import annotations

import os
import re
from pathlib import Path
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


# What a failed connection attempt can raise.
UNREACHABLE = (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


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
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except UNREACHABLE as exc:
        raise DatabaseUnavailable(
            f"cannot reach the database at {redact(dsn)}: {reason(exc)}"
        ) from None
    try:
        problem = await schema_problem(conn) if need_schema else None
    finally:
        await conn.close()
    if problem:
        raise DatabaseUnavailable(problem)


async def other_clients(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
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
