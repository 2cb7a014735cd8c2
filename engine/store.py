"""The guarded transitions, one method per named statement in queries.sql.

A method that returns None (or False) means its guard matched no row: the caller
lost the race (another worker holds the lease, the task already moved on) and
nothing changed. Callers report it; they never retry it blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from tasklease.engine import database
from tasklease.engine.queries import CLAIM, CLAIM_LIMITED, SQL
from tasklease.engine.registry import MAX_KEY_LIMIT

log = logging.getLogger("tasklease.store")
# Store.wake sends at most one wake-up per this many seconds (the first at once).
WAKE_GAP = 0.005
WAKE_CLOSE_SECONDS = 5.0  # how long Store.close waits for the last one

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
    # two transactions settling dependants (docs/workflows.md) in opposite orders: one is
    # rolled back whole, and its statement succeeds when run again
    asyncpg.DeadlockDetectedError,
)


@dataclass(frozen=True, slots=True)
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
    idempotency_key: str | None
    lease_seconds: float  # the task's own, else its action's
    timeout_seconds: float | None  # the task's own (the action's applies when None)
    dependencies: int  # how many tasks it waited for (docs/workflows.md)
    dependants: int  # how many wait for it: its completion settles them (complete_many)
    # the columns of task_claim_due, in order, before wait_seconds


@dataclass(frozen=True)
class Submitted:
    created: bool
    task: Mapping[str, Any]


@dataclass(frozen=True)
class KeyConflict:
    """The index-th task of a submission (from 0) gives an idempotency key with other content
    (`fields`: action, payload, ...) than the task that holds it (`task_id`), or, task_id None,
    than the earlier task of the same batch that gives it (`earlier`, from 0)."""

    index: int
    key: str
    task_id: int | None
    earlier: int | None
    fields: tuple[str, ...]


class KeyTaken(Exception):
    """task_submit_many wrote nothing: some of its tasks reuse idempotency keys with other
    content. `conflicts` in input order (engine.tasks turns the first into an
    IdempotencyConflict)."""

    def __init__(self, conflicts: Sequence[KeyConflict]) -> None:
        self.conflicts = sorted(conflicts, key=lambda c: c.index)
        first = self.conflicts[0]
        super().__init__(f"tasks[{first.index}]: idempotency_key {first.key!r} reused")


@dataclass(frozen=True)
class NewTask:
    action: str
    payload_json: str
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 5
    due_at: datetime | None = None
    idempotency_key: str | None = None
    lease_seconds: float | None = None
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class Edge:
    """task (its place in a batch, from 0) waits for another task of the batch (`on`, its
    place) or for an existing task (`on_id`)."""

    task: int
    on: int | None
    on_id: int | None
    on_failure: str = "cancel"


class DependencyRefused(Exception):
    """task_submit_graph wrote nothing: a dependency does not exist, or already failed in a
    way that would cancel the dependant at once. The message says which."""


@dataclass(frozen=True)
class Limit:
    """A global limit, the same for every worker (docs/scheduling.md): `key` is
    'queue:NAME' (tasks of the queue RUNNING at once), 'action:NAME' (tasks of the action
    RUNNING at once), 'rate:NAME' (starts of the action per `per_seconds`) or 'key:NAME'
    (tasks of the action RUNNING at once per value of its payload field `by`; None: the
    field already stored for it)."""

    key: str
    value: int
    per_seconds: float | None = None
    by: str | None = None

    def __post_init__(self) -> None:
        kind, _, name = self.key.partition(":")
        if kind not in ("queue", "action", "rate", "key") or not name:
            raise InvalidLimit(
                f"limit {self.key!r}: a key is queue:NAME, action:NAME, rate:NAME or key:NAME"
            )
        top = MAX_KEY_LIMIT if kind == "key" else MAX_LIMIT
        if not 0 <= self.value <= top:
            raise InvalidLimit(f"limit {self.key}: the value must be 0 to {top}")
        if (kind == "rate") != (self.per_seconds is not None):
            raise InvalidLimit(
                f"limit {self.key}: a rate takes per_seconds, a concurrency limit does not"
            )
        if self.per_seconds is not None and not 0 < self.per_seconds <= MAX_PERIOD:
            raise InvalidLimit(
                f"limit {self.key}: per_seconds must be above 0 and at most {MAX_PERIOD}"
            )
        if self.by is not None and (kind != "key" or not self.by):
            raise InvalidLimit(
                f"limit {self.key}: only a key:NAME limit takes a payload field (by), "
                "and not an empty one"
            )


class InvalidLimit(ValueError):
    """A limit that cannot be: the message names what is wrong."""


MAX_LIMIT = 100_000
MAX_PERIOD = 366 * 86400  # a rate's period: at most a year


# The filters GET /tasks accepts, each an equality on one indexed column.
LIST_FILTERS = {
    "state": "state = ${}::task_state",
    "action": "action = ${}",
    "queue": "queue = ${}",
}
FIRST_PAGE = 2**63 - 1


# timestamptz on the wire: microseconds since 2000-01-01 UTC; int64's ends are +-infinity.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_INFINITY, _MINUS_INFINITY = 2**63 - 1, -(2**63)
# What a time PostgreSQL holds and Python cannot (infinity, BC, after 9999) reads as.
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST_US = (EARLIEST - PG_EPOCH) // _MICROSECOND
_LATEST_US = (LATEST - PG_EPOCH) // _MICROSECOND


def decode_timestamptz(value: tuple[int]) -> datetime:
    """A timestamptz, always aware (UTC). asyncpg's own decoder raises OverflowError for a
    time Python cannot hold (BC, after 9999) and gives naive datetime.min/max for -infinity
    and infinity, which break every comparison with an aware time: a row written by SQL must
    not make a page or a claim fail. Such times read as EARLIEST or LATEST."""
    try:
        return PG_EPOCH + timedelta(microseconds=value[0])
    except OverflowError:
        return LATEST if value[0] > 0 else EARLIEST


def encode_timestamptz(value: date) -> tuple[int]:
    """As asyncpg's own encoder: a naive time is local time; datetime.max and datetime.min
    (naive, or EARLIEST and LATEST) are infinity and -infinity, so they read back alike."""
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day).astimezone()
    if value == datetime.max:
        return (_INFINITY,)
    if value == datetime.min:
        return (_MINUS_INFINITY,)
    micros = (value.astimezone(UTC) - PG_EPOCH) // _MICROSECOND
    if micros == _LATEST_US:
        return (_INFINITY,)
    return (_MINUS_INFINITY,) if micros == _EARLIEST_US else (micros,)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=encode_timestamptz,
        decoder=decode_timestamptz,
        format="tuple",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (a round trip per statement): tasklease
    sets no session state (no LISTEN, advisory locks or SET) on pooled connections."""


def _gone(conn: Any) -> bool:
    """Whether a pool connection kept by Store.fetch was closed meanwhile: asyncpg then gives
    it back to the pool itself and detaches its proxy, whose methods raise InterfaceError."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


@dataclass(frozen=True)
class Claim:
    leased: list[Claimed]
    expired: list[int]  # ids whose lease ran out on their last attempt: now DEAD
    wait_seconds: float | None  # until the next task comes due or lease runs out
    held_back: bool = False  # a global limit held due work back


class Store:
    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn  # for connections of their own (the lease keeper, retention)
        self.listen_dsn = database.listen_dsn(dsn)  # None: behind a pooler, poll only
        # connections fetch() keeps out of the pool between its calls; at most max_size - 1,
        # so the pool always has one for everything else
        self._kept: list[Any] = []
        self._keep = max(0, pool.get_max_size() - 1)
        self._acquiring = 0  # fetch() calls waiting for a connection of the pool
        self._to_wake: set[str] = set()  # queues whose workers wake() is to wake
        self._waking: asyncio.Task[None] | None = None
        # queues claimed with the limits joined in (task_claim_due_limited): the claim without
        # says 'limited' when a limit applies to the queue or one of its actions, the one with
        # says 'plain' when none does any more
        self.limited_queues: set[str] = set()

    @classmethod
    async def connect(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, generic_plans: bool = False
    ) -> Store:
        """`generic_plans`: plan each prepared statement once (workers). The claim is a long
        statement whose planning costs about as much as running it; its generic plan reads
        only the claimable indexes (tests/integration/test_query_plans.py checks both).
        Behind a pooler (TASKLEASE_PGBOUNCER) statements are unnamed and planned each time."""
        settings = {"plan_cache_mode": "force_generic_plan"} if generic_plans else {}
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            **database.connect_options("tasklease", **settings),
        )
        return cls(pool, dsn)

    async def close(self) -> None:
        if self._waking is not None and not self._waking.done():
            # the last submissions' wake-up, unless the database does not answer it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._waking, WAKE_CLOSE_SECONDS)
        kept, self._kept = self._kept, []
        for conn in kept:
            await self.pool.release(conn)
        await self.pool.close()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """pool.fetch(), on a connection kept between calls: asyncpg's acquire and release
        (a shielded task per release) cost a caller about as much CPU as a one-task submit's
        statement. A connection whose statement raised, or left in a transaction, goes back
        to the pool, as pool.fetch() would have sent it back."""
        conn = None
        while self._kept and conn is None:
            conn = self._kept.pop()
            if _gone(conn):  # the server closed it meanwhile: the pool will connect anew
                await self.pool.release(conn)  # (nothing to do if asyncpg already did it)
                conn = None
        if conn is None:
            self._acquiring += 1
            try:
                conn = await self.pool.acquire()
            finally:
                self._acquiring -= 1
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        except BaseException:
            await self.pool.release(conn)
            raise
        # kept unless other calls wait for a connection of the pool: then it goes back to
        # the pool, which hands it to the first of them
        if not self._acquiring and len(self._kept) < self._keep and not conn.is_in_transaction():
            self._kept.append(conn)
        else:
            await self.pool.release(conn)
        return rows

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        """All tasks in one statement (one transaction): all are written or none. Their
        workers are woken after the commit (wake)."""
        submitted = await submit_on(self.fetch, tasks)
        self.wake(submitted)
        return submitted

    def wake(self, submitted: Iterable[Submitted]) -> None:
        """NOTIFY the queues of the tasks created, after the commit that wrote them, in a
        statement of its own (queue_wake), sent from a task of this store's: at once if none
        was sent in the last WAKE_GAP seconds, else at the end of it, for all the queues
        gathered meanwhile, so that many submissions share one. A NOTIFY inside each
        submission's transaction would serialise their commits (PostgreSQL holds a lock from
        a notifying commit until its WAL is flushed). close() waits for the last one."""
        self._to_wake.update(s.task["queue"] for s in submitted if s.created)
        if self._to_wake and (self._waking is None or self._waking.done()):
            self._waking = asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        while self._to_wake:
            queues, self._to_wake = sorted(self._to_wake), set()
            try:
                await self.fetch(SQL["queue_wake"], queues)
            except Exception as exc:  # written all the same: workers poll for it
                log.warning("could not wake the workers of %s: %s", ", ".join(queues), exc)
            # the submissions of the next WAKE_GAP share the next one (a caller submitting
            # one task after another would otherwise send one per task)
            await asyncio.sleep(WAKE_GAP)

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

    async def submit_graph(
        self,
        tasks: Sequence[NewTask],
        edges: Sequence[Edge],
        *,
        workflow: bool,
        on_finish: int | None = None,
    ) -> list[Submitted]:
        return await submit_graph_on(
            self.pool.fetch, tasks, edges, workflow=workflow, on_finish=on_finish
        )

    async def dependency_results(self, task_ids: Sequence[int]) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["task_dependency_results"], list(task_ids))

    async def workflow(self, workflow_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SQL["workflow_get"], workflow_id)

    async def workflow_tasks(self, workflow_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["workflow_tasks"], workflow_id)

    async def edges(self, task_ids: Sequence[int]) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["workflow_edges"], list(task_ids))

    async def task_edges(self, task_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["task_edges"], task_id)

    async def get(self, task_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SQL["task_get"], task_id)

    async def history(self, task_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["task_history"], task_id)

    async def get_by_idempotency_key(self, key: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SQL["task_get_by_idempotency_key"], key)

    async def dead_by_action(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["dead_by_action"])

    async def claim(
        self,
        queue: str,
        leases: dict[str, float],
        limit: int,
        worker: str,
        aging_seconds: float | None = None,
    ) -> Claim:
        """Lease up to `limit` tasks of `queue` (claim or reclaim), expire dead leases, and say
        when to look again. `leases`: lease seconds by action, the actions this worker runs.
        `aging_seconds`: how long a task may wait before it is taken ahead of higher
        priorities (None: strict priority). Limits are read by the claim itself: a claim that
        finds it ran the wrong statement (with or without limits) says to look again at once
        (held, 0 s), and the next claim of the queue runs the other."""
        rows = await self.pool.fetch(
            CLAIM_LIMITED if queue in self.limited_queues else CLAIM,
            queue,
            list(leases),
            limit,
            worker,
            list(leases.values()),
            aging_seconds,
        )
        leased, expired, wait, held = [], [], None, False
        for r in rows:
            if r["trigger"] in ("wait", "held"):
                wait, held = r["wait_seconds"], r["trigger"] == "held"
            elif r["trigger"] in ("limited", "plain"):
                wait, held = 0.0, True
                if r["trigger"] == "limited":
                    self.limited_queues.add(queue)
                else:
                    self.limited_queues.discard(queue)
            elif r["trigger"] == "expire":
                expired.append(r["id"])
            else:
                leased.append(Claimed(*r[:14]))
        return Claim(leased, expired, wait, held)

    async def heartbeat(
        self, task_id: int, token: uuid.UUID, lease_seconds: float
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            SQL["task_heartbeat_if_leased"], task_id, token, lease_seconds
        )

    async def complete_many(
        self, items: Sequence[tuple[int, uuid.UUID, str]], *, settle: bool = False
    ) -> set[int]:
        """(id, token, result JSON) each: the ids that moved to COMPLETED. `settle`: some of
        them have dependants, settled by this statement for the batch (else by the trigger
        tasks_settle_dependants, one call per task: docs/workflows.md)."""
        name = "task_complete_settling_many_if_leased" if settle else "task_complete_many_if_leased"
        return await self._moved_many(name, items, 3)

    async def complete_settling_many(self, items: Sequence[tuple[int, uuid.UUID, str]]) -> set[int]:
        return await self.complete_many(items, settle=True)

    async def fail_many(self, items: Sequence[tuple[int, uuid.UUID, float, str]]) -> set[int]:
        """(id, token, retry in seconds, error) each: the ids that moved to FAILED."""
        return await self._moved_many("task_fail_many_if_leased", items, 4)

    async def bury_many(self, items: Sequence[tuple[int, uuid.UUID, str, bool]]) -> set[int]:
        """(id, token, error, permanent) each: the ids that moved to DEAD."""
        return await self._moved_many("task_bury_many_if_leased", items, 4)

    async def complete(self, task_id: int, token: uuid.UUID, result_json: str) -> bool:
        return task_id in await self.complete_many([(task_id, token, result_json)])

    async def fail(self, task_id: int, token: uuid.UUID, retry_in: float, error: str) -> bool:
        return task_id in await self.fail_many([(task_id, token, retry_in, error)])

    async def bury(self, task_id: int, token: uuid.UUID, error: str, permanent: bool) -> bool:
        return task_id in await self.bury_many([(task_id, token, error, permanent)])

    async def release(self, task_id: int, token: uuid.UUID) -> bool:
        return await self._moved("task_release_if_leased", task_id, token)

    async def snooze(
        self, task_id: int, token: uuid.UUID, seconds: float, reason: str | None = None
    ) -> bool:
        return await self._moved("task_snooze_if_leased", task_id, token, seconds, reason)

    async def cancel(self, task_id: int, detail: str | None = None) -> bool:
        return await self._moved("task_cancel_if_waiting", task_id, detail)

    async def cancel_running(self, task_id: int, token: uuid.UUID) -> bool:
        return await self._moved("task_cancel_if_leased", task_id, token)

    async def request_cancel(self, task_id: int) -> bool:
        return await self._moved("task_request_cancel_if_running", task_id)

    async def requeue(self, task_id: int, detail: str | None = None) -> bool:
        return await self._moved("task_requeue_if_dead", task_id, detail)

    async def set_limit(self, limit: Limit, *, declared: bool) -> asyncpg.Record | None:
        """Give a global limit its value (declared by code: an operator's value stays).
        Returns the limit as stored, or None when nothing changed."""
        try:
            return await self.pool.fetchrow(
                SQL["limit_set"], limit.key, limit.value, limit.per_seconds, declared, limit.by
            )
        except asyncpg.CheckViolationError as exc:
            if exc.constraint_name == "limits_by_check":
                raise InvalidLimit(
                    f"limit {limit.key}: which payload field? none is stored for it: "
                    "give one (by, --by FIELD)"
                ) from None
            raise

    async def unset_limits(self, keys: Sequence[str], *, declared_only: bool) -> list[str]:
        rows = await self.pool.fetch(SQL["limit_unset"], list(keys), declared_only)
        return [r["key"] for r in rows]

    async def limits(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["limit_list"])

    async def pause_queue(self, queue: str) -> datetime:
        """Claims in `queue` start nothing until it is resumed. Returns when it was paused."""
        paused_at: datetime = await self.pool.fetchval(SQL["queue_pause"], queue)
        return paused_at

    async def resume_queue(self, queue: str) -> bool:
        """Whether it was paused; its workers are woken."""
        return await self.pool.fetchval(SQL["queue_resume"], queue) is not None

    async def paused_queues(self) -> dict[str, datetime]:
        return {r["queue"]: r["paused_at"] for r in await self.pool.fetch(SQL["queue_paused_list"])}

    async def db_now(self) -> datetime:
        now: datetime = await self.pool.fetchval(SQL["db_now"])
        return now

    async def declare_schedule(self, s: Any, next_run_at: datetime) -> None:
        """Upsert an engine.schedules.Schedule."""
        await self.pool.execute(
            SQL["schedule_declare"],
            s.name,
            s.action,
            s.cron,
            s.every,
            s.timezone,
            msgspec.json.encode(s.payload).decode(),
            s.queue,
            s.priority,
            s.missed,
            next_run_at,
        )

    async def schedules_state(self, names: Sequence[str]) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["schedule_state"], list(names))

    async def advance_schedule(
        self,
        name: str,
        last_slot_at: datetime | None,
        slot: datetime,
        next_run_at: datetime,
        task_id: int | None,
    ) -> bool:
        return await self._moved(
            "schedule_advance_if_at", name, last_slot_at, slot, next_run_at, task_id
        )

    async def schedules(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(SQL["schedule_list"])

    async def requeue_action(
        self, action: str, after: int, limit: int, detail: str | None = None
    ) -> list[int]:
        """DEAD -> PENDING for up to `limit` DEAD tasks of `action` with ids above `after`;
        the ids moved, ascending."""
        rows = await self.pool.fetch(
            SQL["task_requeue_action_if_dead"], action, after, limit, detail
        )
        return [r["id"] for r in rows]

    async def start_ui_session(self, session_id: str, seconds: float) -> None:
        await self.pool.execute(SQL["ui_session_start"], session_id, seconds)

    async def ui_session_alive(self, session_id: str) -> bool:
        return bool(await self.pool.fetchval(SQL["ui_session_alive"], session_id))

    async def end_ui_session(self, session_id: str) -> None:
        await self.pool.execute(SQL["ui_session_end"], session_id)

    async def lease_outcome(self, task_id: int, token: uuid.UUID) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SQL["task_lease_outcome"], task_id, token)

    async def _moved(self, query: str, *args: Any) -> bool:
        return await self.pool.fetchrow(SQL[query], *args) is not None

    async def _moved_many(
        self, query: str, items: Sequence[tuple[Any, ...]], width: int
    ) -> set[int]:
        rows = await self.pool.fetch(SQL[query], *_columns(items, width))
        return {r["id"] for r in rows}


Fetch = Callable[..., Awaitable[Sequence[Mapping[str, Any]]]]


def _task_columns(tasks: Sequence[NewTask]) -> tuple[list[Any], ...]:
    """The submit statements' first parameters: one array per column, a row per task."""
    return (
        [t.action for t in tasks],
        [t.queue for t in tasks],
        [t.priority for t in tasks],
        [t.payload_json for t in tasks],
        [t.max_attempts for t in tasks],
        [t.due_at for t in tasks],
        [t.idempotency_key for t in tasks],
        [t.lease_seconds for t in tasks],
        [t.timeout_seconds for t in tasks],
    )


async def submit_on(
    fetch: Fetch,
    tasks: Sequence[NewTask],
    *,
    own_transaction: bool = True,
    notify: bool | None = None,
) -> list[Submitted]:
    """`task_submit_many` through `fetch` (a pool's, or a connection inside the caller's
    transaction: `own_transaction` False), each task paired with its row. KeyTaken when a
    task reuses an idempotency key with other content: then nothing was written.

    `notify`: whether the statement NOTIFYs the queues at commit; by default only in the
    caller's transaction (in its own, the caller wakes them after: Store.wake).

    A key taken by a transaction that committed during the statement: the statement is run
    again, with a snapshot that sees it. If the statement had inserted other tasks meanwhile,
    it failed instead (serialization_failure) so that none of them stays; in the caller's
    transaction, now aborted, that error is the caller's to handle (retry the transaction)."""
    columns = _task_columns(tasks)
    keyed = any(t.idempotency_key is not None for t in tasks)
    statement = SQL["task_submit_many" if keyed else "task_submit_unkeyed"]
    notifies = not own_transaction if notify is None else notify
    for _ in range(3):
        try:
            rows = await fetch(statement, *columns, notifies)
        except asyncpg.SerializationError:
            if not own_transaction:
                raise
            continue
        conflicts = [r for r in rows if r.get("conflict_index") is not None]
        if conflicts:
            raise KeyTaken(
                [
                    KeyConflict(
                        index=r["conflict_index"],
                        key=str(tasks[r["conflict_index"]].idempotency_key),
                        task_id=r["conflict_task"],
                        earlier=r["conflict_earlier"],
                        fields=tuple(r["conflict_fields"]),
                    )
                    for r in conflicts
                ]
            )
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


async def submit_graph_on(
    fetch: Fetch,
    tasks: Sequence[NewTask],
    edges: Sequence[Edge],
    *,
    workflow: bool,
    on_finish: int | None = None,
    own_transaction: bool = True,
) -> list[Submitted]:
    """`task_submit_graph` through `fetch`: the tasks (none with an idempotency key) in input
    order, with their edges; DependencyRefused when an existing dependency cannot be waited
    for (nothing was written). The graph must be acyclic (engine.workflows checks it).
    Two submissions locking the same existing dependencies in opposite orders may deadlock:
    the one rolled back is run again (in the caller's transaction, now aborted, the error is
    the caller's to handle)."""
    columns = (
        *_task_columns(tasks),  # the tasks of a graph have no idempotency key (engine.tasks)
        [e.task + 1 for e in edges],
        [None if e.on is None else e.on + 1 for e in edges],
        [e.on_id for e in edges],
        [e.on_failure for e in edges],
        workflow,
        None if on_finish is None else on_finish + 1,
    )
    for attempt in range(3):
        try:
            rows = await fetch(SQL["task_submit_graph"], *columns)
            break
        except Exception as exc:  # asyncpg's, or psycopg's on a caller's connection
            if getattr(exc, "sqlstate", None) == "TLDEP":
                raise DependencyRefused(str(exc)) from None
            if not (isinstance(exc, asyncpg.DeadlockDetectedError) and own_transaction):
                raise
            if attempt == 2:
                raise
    return [Submitted(True, r) for r in sorted(rows, key=lambda r: r["id"])]


def _columns(items: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to the aligned arrays that unnest() takes back apart."""
    return [[item[i] for item in items] for i in range(width)] if items else [[]] * width
