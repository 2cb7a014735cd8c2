"""tasklease from Python, straight on the database: submit, read, cancel, requeue, wait.

    async with Client() as client:          # DATABASE_URL, else the embedded PostgreSQL
        task = await client.submit("email_user", {"user_id": 42})
        done = await client.wait(task.id, timeout=30)

Submissions are checked as the HTTP API checks them (engine.tasks: bounds, known action,
payload schema) against the handlers this process has registered (the built-in ones, the
modules named in `handlers=` or TASKLEASE_HANDLERS, and any imported before).

Transactional enqueue: `submit(..., connection=conn)` writes the task inside the caller's open
transaction, on an asyncpg connection, a SQLAlchemy AsyncSession / AsyncConnection (asyncpg or
psycopg) or a SQLAlchemy Session / psycopg 3 connection (sync). The task exists if and only
if the caller commits; workers are woken by a NOTIFY sent at that commit.

`wait` listens on the `tasklease_done` channel (one LISTEN connection per client), so it
reads the task again only when it may have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import msgspec

from tasklease.engine import database, operations, registry, workflows
from tasklease.engine.store import (
    DependencyRefused,
    Fetch,
    KeyTaken,
    NewTask,
    Store,
    submit_graph_on,
    submit_on,
)
from tasklease.engine.tasks import (
    IdempotencyConflict,
    InvalidTask,
    OnFailure,
    Task,
    TaskSpec,
    Transition,
    prepare,
    spec,
)

T = TypeVar("T")
DONE_CHANNEL = "tasklease_done"


class TaskNotFound(LookupError):
    """No task has this id."""


class TaskConflict(Exception):
    """The task's state does not allow the operation; `task` is the task as it is."""

    def __init__(self, message: str, task: Task) -> None:
        super().__init__(message)
        self.task = task


# How often wait() looks at the task when it cannot LISTEN (behind a pooler, poll only).
WAIT_POLL_SECONDS = 0.5


class NoTransaction(ValueError):
    """`connection=` was given a connection with no open transaction."""


class Client:
    def __init__(
        self, dsn: str | None = None, *, handlers: Sequence[str] = (), max_size: int = 10
    ) -> None:
        self._dsn = dsn
        self._handler_modules = tuple(handlers)
        self._max_size = max_size
        self._store: Store | None = None
        self._waiting: dict[int, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening: asyncio.Event = asyncio.Event()

    async def connect(self) -> Client:
        """Open the pool (starting or joining the embedded PostgreSQL without a DSN) and load
        the handlers that submissions are checked against."""
        if self._store is None:
            dsn = database.normalize(self._dsn) if self._dsn else await _resolve()
            await database.check(dsn)
            registry.load(self._handler_modules)
            self._store = await Store.connect(dsn, min_size=1, max_size=self._max_size)
        return self

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the client is not connected: `await client.connect()` first")
        return self._store

    # --- submitting --------------------------------------------------------------------------

    async def submit(
        self,
        action: str,
        payload: Mapping[str, Any] | msgspec.Struct | None = None,
        *,
        due_at: datetime | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        queue: str = "default",
        priority: int = 0,
        lease_seconds: float | None = None,
        timeout_seconds: float | None = None,
        depends_on: Sequence[int] | None = None,
        on_failure: OnFailure | None = None,
        connection: Any = None,
    ) -> Task:
        """Submit one task; a repeated idempotency key returns the task that holds it.
        InvalidTask names what is wrong with a submission; IdempotencyConflict says that the
        key is held by a task with other content (nothing is written). `depends_on`: ids of
        tasks it waits for (it is WAITING until they complete; docs/workflows.md)."""
        fields = {
            "action": action,
            "payload": _builtins(payload),
            "due_at": due_at,
            "idempotency_key": idempotency_key,
            "max_attempts": max_attempts,
            "queue": queue,
            "priority": priority,
            "lease_seconds": lease_seconds,
            "timeout_seconds": timeout_seconds,
            "depends_on": list(depends_on) if depends_on is not None else None,
            "on_failure": on_failure,
        }
        one = spec(_spec_fields(fields))
        new = prepare(one, registry.REGISTRY)
        if workflows.is_graph([one]):
            plan = workflows.plan([one], batch=False)
            [task] = await self._write_graph([new], plan, connection)
            return task
        [task] = await self._write([new], connection, batch=False)
        return task

    async def submit_many(
        self,
        tasks: Iterable[Mapping[str, Any] | TaskSpec],
        *,
        on_failure: OnFailure | None = None,
        on_finish: Mapping[str, Any] | TaskSpec | None = None,
        connection: Any = None,
    ) -> list[Task]:
        """Submit tasks given as POST /tasks bodies (or TaskSpecs) together: all or none.
        IdempotencyConflict names the first task that reuses a key with other content.

        A graph (docs/workflows.md): tasks name others of the batch they wait for by `ref`
        (`{"ref": "charge", ...}`, `{"depends_on": ["charge"], ...}`) or existing tasks by id;
        `on_failure` is the batch's default failure policy; `on_finish` a task that runs once
        every task of the batch has finished: it comes last in the list returned. The tasks'
        `workflow_id` is the workflow made."""
        specs = [t if isinstance(t, TaskSpec) else spec(_spec_fields(t)) for t in tasks]
        new = [prepare(t, registry.REGISTRY, i) for i, t in enumerate(specs)]
        finish = None
        if on_finish is not None:
            finish = on_finish if isinstance(on_finish, TaskSpec) else spec(_spec_fields(on_finish))
        if workflows.is_graph(specs, finish):
            plan = workflows.plan(specs, on_failure=on_failure, on_finish=finish)
            if finish is not None:
                new.append(prepare(finish, registry.REGISTRY, len(new)))
            return await self._write_graph(new, plan, connection)
        return await self._write(new, connection, batch=True) if new else []

    async def _write_graph(
        self, new: Sequence[NewTask], plan: workflows.Plan, connection: Any
    ) -> list[Task]:
        fetch = self.store.pool.fetch if connection is None else await fetcher(connection)
        try:
            submitted = await submit_graph_on(
                fetch,
                new,
                plan.edges,
                workflow=plan.workflow,
                on_finish=plan.on_finish,
                own_transaction=connection is None,
            )
        except DependencyRefused as exc:
            raise InvalidTask(str(exc), field="depends_on") from None
        return [Task.from_row(s.task) for s in submitted]

    async def workflow(self, workflow_id: int) -> list[Task]:
        """The members of a workflow, by id (each with its state); TaskNotFound if none."""
        if await self.store.workflow(workflow_id) is None:
            raise TaskNotFound(f"no workflow {workflow_id}")
        return [Task.from_row(r) for r in await self.store.workflow_tasks(workflow_id)]

    async def _write(self, new: Sequence[NewTask], connection: Any, *, batch: bool) -> list[Task]:
        fetch = self.store.fetch if connection is None else await fetcher(connection)
        try:
            submitted = await submit_on(fetch, new, own_transaction=connection is None)
        except KeyTaken as taken:
            raise IdempotencyConflict.of(taken.conflicts[0], batch=batch) from None
        if connection is None:
            self.store.wake(submitted)  # in the caller's transaction: NOTIFY at its commit
        return [Task.from_row(s.task) for s in submitted]

    # --- reading and operating ---------------------------------------------------------------

    async def get(self, task_id: int) -> Task:
        row = await self.store.get(task_id)
        if row is None:
            raise TaskNotFound(f"no task {task_id}")
        return Task.from_row(row)

    async def history(self, task_id: int) -> list[Transition]:
        """The task's transitions, oldest first."""
        rows = await self.store.history(task_id)
        if not rows:
            await self.get(task_id)  # TaskNotFound
        return [Transition(**dict(r)) for r in rows]

    async def cancel(self, task_id: int) -> Task:
        """PENDING/FAILED -> CANCELLED now; RUNNING: its worker is asked to stop the handler
        (see `cancel_requested_at`, and `wait`). TaskConflict when it already finished."""
        outcome, row = await operations.cancel(self.store, task_id)
        return self._answer(task_id, outcome, row, "PENDING, FAILED, WAITING or RUNNING tasks")

    async def requeue(self, task_id: int) -> Task:
        """DEAD -> PENDING, attempts reset, due now. TaskConflict unless DEAD."""
        outcome, row = await operations.requeue(self.store, task_id)
        return self._answer(task_id, outcome, row, "DEAD tasks")

    @staticmethod
    def _answer(task_id: int, outcome: operations.Outcome, row: Any, allowed: str) -> Task:
        if outcome is operations.Outcome.NOT_FOUND or row is None:
            raise TaskNotFound(f"no task {task_id}")
        task = Task.from_row(row)
        if outcome is operations.Outcome.CONFLICT:
            raise TaskConflict(f"task {task_id} is {task.state}: only {allowed} can be", task)
        return task

    async def wait(self, task_id: int, timeout: float | None = None) -> Task:
        """The task once it is COMPLETED, DEAD or CANCELLED; TimeoutError after `timeout`
        seconds. Woken by the NOTIFY its final transition sends, not by polling; behind a
        pooler with no direct DSN to listen on (TASKLEASE_PGBOUNCER=1), it polls every
        WAIT_POLL_SECONDS."""
        event = asyncio.Event()
        self._waiting.setdefault(task_id, set()).add(event)
        listening = self.store.listen_dsn is not None
        try:
            async with asyncio.timeout(timeout):
                if listening:
                    await self._listen()
                while True:
                    task = await self.get(task_id)
                    if task.finished:
                        return task
                    if listening:
                        await event.wait()
                        event.clear()
                    else:
                        await asyncio.sleep(WAIT_POLL_SECONDS)
        except TimeoutError:
            raise TimeoutError(f"task {task_id} did not finish within {timeout}s") from None
        finally:
            events = self._waiting.get(task_id, set())
            events.discard(event)
            if not events:
                self._waiting.pop(task_id, None)

    async def _listen(self) -> None:
        """Start the LISTEN connection once, and return when it listens."""
        if self._listener is None or self._listener.done():
            self._listening.clear()
            self._listener = asyncio.create_task(self._listen_loop())
        waiting = asyncio.ensure_future(self._listening.wait())
        await asyncio.wait([waiting, self._listener], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if self._listener.done():
            self._listener.result()  # raises what stopped it

    async def _listen_loop(self) -> None:
        delay = 0.2
        while True:
            try:
                assert self.store.listen_dsn is not None
                conn = await database.connect(self.store.listen_dsn)
            except database.UNREACHABLE:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                dropped = asyncio.Event()
                conn.add_termination_listener(lambda _, d=dropped: d.set())
                await conn.add_listener(DONE_CHANNEL, self._notified)
                self._listening.set()
                self._wake_all()  # whatever finished while nobody listened
                delay = 0.2
                await dropped.wait()
            except database.UNREACHABLE:
                pass
            finally:
                self._listening.clear()
                if not conn.is_closed():
                    await conn.close()

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        for text in payload.split(","):
            for event in self._waiting.get(int(text), ()):
                event.set()

    def _wake_all(self) -> None:
        for events in self._waiting.values():
            for event in events:
                event.set()


async def _resolve() -> str:
    dsn, server = database.resolve()
    if server is not None:
        await asyncio.to_thread(server.ensure_running)
    return dsn


def _builtins(payload: Mapping[str, Any] | msgspec.Struct | None) -> Any:
    if payload is None:
        return {}
    if isinstance(payload, msgspec.Struct):
        return msgspec.to_builtins(payload)
    return dict(payload)


def _spec_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Unset (None) options take their defaults, as in the API's JSON."""
    return {k: v for k, v in fields.items() if v is not None or k == "payload"}


# --- the caller's own connection -------------------------------------------------------------


def _psycopg_sql(sql: str) -> str:
    """$1 -> %(p1)s: psycopg's placeholders (a parameter may appear more than once)."""
    return re.sub(r"\$(\d+)", r"%(p\1)s", sql.replace("%", "%%"))


def _psycopg_args(args: Sequence[Any]) -> dict[str, Any]:
    return {f"p{i}": a for i, a in enumerate(args, 1)}


async def fetcher(connection: Any) -> Fetch:
    """A `fetch(sql, *args)` that runs inside `connection`'s open transaction."""
    if isinstance(connection, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
        if not connection.is_in_transaction():
            raise NoTransaction(
                "connection= has no open transaction: use `async with conn.transaction():`, "
                "or submit without connection="
            )
        return connection.fetch
    kind = type(connection).__module__.split(".")[0]
    if kind == "sqlalchemy":
        return await _sqlalchemy_fetcher(connection)
    if kind == "psycopg":
        return _psycopg_fetcher(connection)
    raise TypeError(
        f"connection= takes an asyncpg connection, a SQLAlchemy Session, AsyncSession, "
        f"Connection or AsyncConnection, or a psycopg connection; not {type(connection)!r}"
    )


def _sync_driver(connection: Any) -> Any:
    """The psycopg connection under a SQLAlchemy sync Session or Connection (its transaction
    begun), else None."""
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    if isinstance(connection, Session):
        connection = connection.connection()
    return connection.connection.driver_connection if isinstance(connection, Connection) else None


async def _sqlalchemy_fetcher(connection: Any) -> Fetch:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if (driver := _sync_driver(connection)) is not None:
        return _psycopg_fetcher(driver)
    if isinstance(connection, AsyncSession):
        connection = await connection.connection()
    if isinstance(connection, AsyncConnection):
        driver = (await connection.get_raw_connection()).driver_connection
        if isinstance(driver, asyncpg.Connection):
            if not driver.is_in_transaction():  # SQLAlchemy begins on its first statement
                await connection.exec_driver_sql("SELECT 1")
            return driver.fetch
        return _psycopg_fetcher(driver)
    raise TypeError(f"connection=: a SQLAlchemy {type(connection).__name__} is not supported")


def _psycopg_fetcher(conn: Any) -> Fetch:
    import psycopg
    from psycopg.rows import dict_row

    if conn.autocommit:
        raise NoTransaction("connection= is a psycopg connection in autocommit mode")
    if isinstance(conn, psycopg.AsyncConnection):

        async def fetch_async(sql: str, *args: Any) -> list[dict[str, Any]]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_psycopg_sql(sql), _psycopg_args(args))
                return await cur.fetchall()

        return fetch_async

    async def fetch(sql: str, *args: Any) -> list[dict[str, Any]]:
        # a sync connection: its caller is sync code (SyncClient), which waits meanwhile
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(_psycopg_sql(sql), _psycopg_args(args))
            return cur.fetchall()

    return fetch


# --- sync ------------------------------------------------------------------------------------


class SyncClient:
    """Client for sync code: the same methods, run on an event loop in a thread of its own.

    with SyncClient() as client:
        with Session(engine) as session, session.begin():
            session.add(order)
            client.submit("email_user", {"user_id": 42}, connection=session)
    """

    def __init__(self, dsn: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tasklease-client", daemon=True
        )
        self._thread.start()
        self._client = Client(dsn, **options)
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._call(self._client.close())
            self._stop_loop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, action: str, payload: Any = None, **options: Any) -> Task:
        return self._call(self._client.submit(action, payload, **self._sync(options)))

    def submit_many(
        self, tasks: Iterable[Mapping[str, Any] | TaskSpec], **options: Any
    ) -> list[Task]:
        return self._call(self._client.submit_many(list(tasks), **self._sync(options)))

    def get(self, task_id: int) -> Task:
        return self._call(self._client.get(task_id))

    def workflow(self, workflow_id: int) -> list[Task]:
        return self._call(self._client.workflow(workflow_id))

    def history(self, task_id: int) -> list[Transition]:
        return self._call(self._client.history(task_id))

    def cancel(self, task_id: int) -> Task:
        return self._call(self._client.cancel(task_id))

    def requeue(self, task_id: int) -> Task:
        return self._call(self._client.requeue(task_id))

    def wait(self, task_id: int, timeout: float | None = None) -> Task:
        return self._call(self._client.wait(task_id, timeout))

    @staticmethod
    def _sync(options: dict[str, Any]) -> dict[str, Any]:
        """A sync Session is opened here, in the caller's thread, and then handed over as its
        psycopg connection (thread-safe), so SQLAlchemy is used on one thread only."""
        connection = options.get("connection")
        if type(connection).__module__.startswith("sqlalchemy"):
            driver = _sync_driver(connection)
            options["connection"] = connection if driver is None else driver
        return options
