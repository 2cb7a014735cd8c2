"""The database schema: Alembic migrations in plain SQL, applied under an advisory lock.

This package imports nothing else of tasklease.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# Two processes that migrate at once queue on this lock; the second finds nothing to do.
MIGRATE_LOCK = 0x7461736B6C65  # "taskle"


# Alembic and SQLAlchemy are imported only where used: the CLI client commands start faster.
def _config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


async def current(conn: asyncpg.Connection) -> str | None:
    """The revision the database is at, or None before the first migration."""
    exists = await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
    if not exists:
        return None
    rev: str | None = await conn.fetchval("SELECT version_num FROM alembic_version")
    return rev


async def upgrade(dsn: str, revision: str = "head") -> str:
    """Bring the schema to `revision` in one transaction; safe to run from many processes."""
    return await _migrate(dsn, "upgrade", revision)


async def downgrade(dsn: str, revision: str) -> str:
    """Take the schema back to `revision` in one transaction (tests of each downgrade)."""
    return await _migrate(dsn, "downgrade", revision)


async def _migrate(dsn: str, direction: str, revision: str) -> str:
    from alembic import command
    from sqlalchemy import Connection, text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    # One transaction on one connection, so it works through PgBouncer in transaction mode
    # too: no statement cache of asyncpg's, and SQLAlchemy's statements under unique names
    # (a name left on the server connection by another client cannot collide).
    engine = create_async_engine(
        "postgresql+asyncpg://",
        connect_args={
            "dsn": dsn,
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__tasklease_{uuid.uuid4().hex}__",
        },
        poolclass=NullPool,
    )
    cfg = _config()

    def run(sync_conn: Connection) -> None:
        cfg.attributes["connection"] = sync_conn
        getattr(command, direction)(cfg, revision)

    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATE_LOCK})"))
            await conn.run_sync(run)
            rev = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    finally:
        await engine.dispose()
    return str(rev)
