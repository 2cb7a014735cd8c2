"""Retention: finished tasks and their history are deleted once old enough.

COMPLETED and CANCELLED tasks go after `finished_seconds` (default 7 days), DEAD ones after
`dead_seconds` (default 30 days, so that people can still inspect and requeue them); None
keeps them. Every worker runs a `Retention` loop; each window of a round is one transaction
that first takes a transaction-scoped advisory lock, so no two workers ever delete at the same
time. A round that finds the lock taken ends (another worker is pruning). The lock is
transaction-scoped, not held by a session, so that it works through PgBouncer in transaction
mode (TASKLEASE_PGBOUNCER), where a session lock would stay on whichever server connection
took it.

A round walks the primary key in windows of `batch` ids and deletes in each window what is
old enough, in one statement per window (the task rows and their history together), pausing
between windows so that claims and completions keep their pace. It stops at the first window
whose tasks were all created after the cutoff. Claims never read finished tasks (they use
partial indexes of PENDING/FAILED and RUNNING rows only), so claim speed does not depend on
how many pile up; retention keeps the table, its indexes and the history from growing without
bound. Old rows of `processes` go too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from tasklease.engine import database
from tasklease.engine.queries import SQL
from tasklease.engine.store import TRANSIENT_ERRORS

log = logging.getLogger("tasklease.retention")
DAY = 86400.0


@dataclass(frozen=True)
class RetentionConfig:
    finished_seconds: float | None = 7 * DAY
    dead_seconds: float | None = 30 * DAY
    every: float = 60.0  # seconds between rounds
    batch: int = 1000  # ids per window
    pause: float = 0.05  # seconds between windows
    processes_seconds: float = DAY

    @property
    def enabled(self) -> bool:
        return self.finished_seconds is not None or self.dead_seconds is not None


@dataclass
class Pruned:
    tasks: int = 0
    transitions: int = 0
    windows: int = 0


class Retention:
    def __init__(self, dsn: str, config: RetentionConfig) -> None:
        self.dsn = dsn
        self.config = config

    async def round(self) -> Pruned | None:
        """One round, if this process wins the lock; None when another one holds it at the
        start (a round that finds it taken later stops there)."""
        conn = await database.connect(self.dsn)
        try:
            return await self._prune(conn)
        finally:
            await conn.close()

    async def _prune(self, conn: asyncpg.Connection) -> Pruned | None:
        c, pruned, after = self.config, Pruned(), 0
        started = time.monotonic()
        while True:
            async with conn.transaction():
                if not await conn.fetchval(SQL["retention_try_lock"]):
                    if pruned.windows == 0:
                        return None
                    log.info("retention: another worker is pruning; this round stops here")
                    break
                row = await conn.fetchrow(
                    SQL["task_prune_finished"], after, c.batch, c.finished_seconds, c.dead_seconds
                )
            pruned.windows += 1
            pruned.tasks += row["tasks"]
            pruned.transitions += row["transitions"]
            if row["last_id"] is None or row["past_cutoff"]:
                break
            after = row["last_id"]
            if pruned.windows % 100 == 0:
                log.info(
                    "retention: %d tasks deleted so far (%d windows, up to id %d)",
                    pruned.tasks,
                    pruned.windows,
                    after,
                )
            await asyncio.sleep(c.pause)
        await conn.execute(SQL["process_prune"], c.processes_seconds)
        if pruned.tasks:
            log.info(
                "retention: deleted %d finished tasks and %d history rows in %.1fs",
                pruned.tasks,
                pruned.transitions,
                time.monotonic() - started,
            )
        return pruned

    async def run(self) -> None:
        if not self.config.enabled:
            return
        while True:
            await asyncio.sleep(self.config.every)
            try:
                await self.round()
            except TRANSIENT_ERRORS as exc:
                log.warning("retention round skipped (%s)", exc)
