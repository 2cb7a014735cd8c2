"""The guarded transitions, one method per named statement in queries.sql.

A method that returns None (or False) means its guard matched no row: the caller
lost the race (another worker holds the lease, the task already moved on) and
nothing changed. Callers report it; they never retry it blindly.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from engine.queries import SQL

# Errors after which the same statement can succeed once the database is back.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.CannotConnectNowError,
    # asyncpg raises this on a pooled connection whose server end was killed mid-operation
    # ("cannot switch to state N"); the pool drops that connection, so a retry works.
    asyncpg.InternalClientError,
)


@dataclass(frozen=True)
class Claimed:
    """A task leased to this worker by claim or reclaim."""

    trigger: str
    from_state: str
    id: int
    action: str
    queue: str
    payload: str
    attempt: int
    max_attempts: int
    lease_token: uuid.UUID
    lease_expires_at: datetime
    idempotency_key: str | None
    due_at: datetime


@dataclass(frozen=True)
class Submitted:
    created: bool
    task: asyncpg.Record


@dataclass(frozen=True)
class NewTask:
    action: str
    payload_json: str
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 5
    due_at: datetime | None = None
    idempotency_key: str | None = None


# The filters GET /tasks accepts, each an equality on one indexed column.
LIST_FILTERS = {
    "state": "state = ${}::task_state",
    "action": "action = ${}",
    "queue": "queue = ${}",
}
FIRST_PAGE = 2**63 - 1


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> Store:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings={"application_name": "tasklease"},
        )
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        """All tasks in one statement (one transaction): all are written or none."""
        columns = (
            [t.action for t in tasks],
            [t.queue for t in tasks],
            [t.priority for t in tasks],
            [t.payload_json for t in tasks],
            [t.max_attempts for t in tasks],
            [t.due_at for t in tasks],
            [t.idempotency_key for t in tasks],
        )
        for _ in range(3):
            rows = await self.pool.fetch(SQL["task_submit_many"], *columns)
            by_key = {r["idempotency_key"]: r for r in rows if r["idempotency_key"] is not None}
            # Unkeyed tasks never conflict: they come back in input order (identity order).
            unkeyed = iter(
                sorted((r for r in rows if r["idempotency_key"] is None), key=lambda r: r["id"])
            )
            result, seen = [], set()
            for t in tasks:
                if t.idempotency_key is None:
                    result.append(Submitted(True, next(unkeyed)))
                elif t.idempotency_key in by_key:
                    row = by_key[t.idempotency_key]
                    first = row["created"] and t.idempotency_key not in seen
                    result.append(Submitted(first, row))
                    seen.add(t.idempotency_key)
                else:
                    break  # a key taken by a submit that committed after our snapshot
            else:
                return result
        raise RuntimeError("idempotency keys neither inserted nor found")

    async def list_tasks(
        self, *, limit: int, before: int | None = None, **filters: str | None
    ) -> list[asyncpg.Record]:
        """Newest first, ids below `before`; filters from LIST_FILTERS, None meaning any."""
        args: list[Any] = [FIRST_PAGE if before is None else before, limit]
        where = ""
        for name, value in filters.items():
            if value is not None:
                args.append(value)
                where += " AND " + LIST_FILTERS[name].format(len(args))
        return await self.pool.fetch(SQL["task_list"].replace("{filters}", where), *args)

    async def counts(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["task_counts"])

    async def queue_lag(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["queue_lag"])

    async def report_process(
        self,
        process_id: str,
        kind: str,
        host: str,
        pid: int,
        queues: Sequence[str],
        concurrency: int,
        running: int,
        counters_json: str,
        stopped: bool = False,
    ) -> None:
        await self.pool.execute(
            SQL["process_report"],
            process_id,
            kind,
            host,
            pid,
            list(queues),
            concurrency,
            running,
            counters_json,
            stopped,
        )

    async def processes(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["process_list"])

    async def get(self, task_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SQL["task_get"], task_id)

    async def history(self, task_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["task_history"], task_id)

    async def claim(
        self,
        queues: Sequence[str],
        leases: dict[str, float],
        limit: int,
        worker: str,
    ) -> tuple[list[Claimed], list[int]]:
        """Lease up to `limit` tasks. Returns (leased tasks, ids that expired to DEAD)."""
        rows = await self.pool.fetch(
            SQL["task_claim_due"], list(queues), list(leases), limit, worker, list(leases.values())
        )
        leased = [Claimed(**dict(r)) for r in rows if r["trigger"] != "expire"]
        expired = [r["id"] for r in rows if r["trigger"] == "expire"]
        return leased, expired

    async def heartbeat(
        self, task_id: int, token: uuid.UUID, lease_seconds: float
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            SQL["task_heartbeat_if_leased"], task_id, token, lease_seconds
        )

    async def complete(self, task_id: int, token: uuid.UUID, result_json: str) -> bool:
        return await self._moved("task_complete_if_leased", task_id, token, result_json)

    async def fail(
        self, task_id: int, token: uuid.UUID, retry_in: float, error: str
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SQL["task_fail_if_leased"], task_id, token, retry_in, error)

    async def bury(self, task_id: int, token: uuid.UUID, error: str, permanent: bool) -> bool:
        return await self._moved("task_bury_if_leased", task_id, token, error, permanent)

    async def release(self, task_id: int, token: uuid.UUID) -> bool:
        return await self._moved("task_release_if_leased", task_id, token)

    async def cancel(self, task_id: int, detail: str | None = None) -> bool:
        return await self._moved("task_cancel_if_waiting", task_id, detail)

    async def cancel_running(self, task_id: int, token: uuid.UUID) -> bool:
        return await self._moved("task_cancel_if_leased", task_id, token)

    async def request_cancel(self, task_id: int) -> bool:
        return await self._moved("task_request_cancel_if_running", task_id)

    async def requeue(self, task_id: int, detail: str | None = None) -> bool:
        return await self._moved("task_requeue_if_dead", task_id, detail)

    async def lease_outcome(self, task_id: int, token: uuid.UUID) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SQL["task_lease_outcome"], task_id, token)

    async def _moved(self, query: str, *args: Any) -> bool:
        return await self.pool.fetchrow(SQL[query], *args) is not None
