"""Handlers: the `@handler` decorator, the registry it fills, and what a handler receives.

PermanentError      raise it to send the task to DEAD at once, without retries
Snooze(seconds)     raise it to run the task again later; not a failure, no attempt used
any other exception the attempt failed; retried with backoff until max_attempts
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pkgutil
import random
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_type_hints

import msgspec

from tasklease.engine.schedules import SCHEDULES, schedule

if TYPE_CHECKING:
    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncSession

    from tasklease.engine.fencing import Fence

DEFAULT_LEASE_SECONDS = 120.0
MAX_KEY_LIMIT = 1000  # per value of a field: a claim may read that many tokens of a value
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF: tuple[float, ...] = (60, 300, 900)
BACKOFF_GROWTH = 3.0
BACKOFF_CAP = 6 * 3600.0
DEFAULT_JITTER = 0.1

Backoff = Sequence[float] | Callable[[int], float]


class PermanentError(Exception):
    """The task cannot succeed by retrying (bad input, a refused request): bury it now."""


class Snooze(Exception):
    """Run this task again in `seconds` (RUNNING -> PENDING): not a failure, and the
    attempt is given back."""

    def __init__(self, seconds: float, reason: str | None = None) -> None:
        if not seconds >= 0:
            raise ValueError("Snooze needs a delay of 0 seconds or more")
        super().__init__(reason or f"snoozed for {seconds}s")
        self.seconds = float(seconds)
        self.reason = reason


class LeaseLost(Exception):
    """The task's lease was lost before its transaction could commit: the transaction was
    rolled back, and another worker runs (or ran) the task."""


class HandlerError(Exception):
    """A handler declaration or registry lookup is wrong."""


@dataclass(frozen=True)
class Dependency:
    """A task this one waited for (docs/workflows.md), as it was when this attempt started:
    its state (COMPLETED; DEAD or CANCELLED only under on_failure "run") and its result."""

    id: int
    action: str
    state: str
    result: Any
    on_failure: str


class TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """The worker's logger with each line starting `task ID ACTION: `."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        assert self.extra is not None
        return f"task {self.extra['task_id']} {self.extra['action']}: {msg}", kwargs


WORKER_LOG = logging.getLogger("tasklease.worker")


@dataclass
class TaskContext:
    """What a handler receives beside its payload: who the task is, its lease, a logger, and
    ways to heartbeat and to complete the task inside a transaction of its own writes."""

    task_id: int
    action: str
    attempt: int
    max_attempts: int
    lease_token: uuid.UUID
    idempotency_key: str | None
    queue: str
    worker: str
    _heartbeat: Callable[[], Awaitable[bool]] = field(repr=False)
    _fence: Fence | None = field(default=None, repr=False)
    lease_lost: bool = False
    cancel_requested: bool = False
    # set once a ctx.transaction() committed the task's completion
    completed: bool = False
    _result_json: str = field(default="null", repr=False)
    _stop: bool = field(default=False, repr=False)  # set by the worker's loop, read anywhere
    # the tasks it waited for, read with one query before the handler runs (workflows)
    dependencies: list[Dependency] = field(default_factory=list)
    _logger: TaskLogger | None = field(default=None, repr=False)

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """The worker's logger (`tasklease.worker`), each line starting `task ID ACTION: `;
        made on first use."""
        if self._logger is None:
            self._logger = TaskLogger(WORKER_LOG, {"task_id": self.task_id, "action": self.action})
        return self._logger

    @property
    def results(self) -> dict[int, Any]:
        """The results of the dependencies that COMPLETED, by task id."""
        return {d.id: d.result for d in self.dependencies if d.state == "COMPLETED"}

    @property
    def results_by_action(self) -> dict[str, Any]:
        """The results of the dependencies that COMPLETED, by action (the last by id when
        several share one)."""
        return {d.action: d.result for d in self.dependencies if d.state == "COMPLETED"}

    @property
    def dependency_counts(self) -> dict[str, int]:
        """How many dependencies ended in each state (a fan-in task's completed/dead counts)."""
        counts: dict[str, int] = {}
        for d in self.dependencies:
            counts[d.state] = counts.get(d.state, 0) + 1
        return counts

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    @property
    def stop_requested(self) -> bool:
        """True once the worker wants this attempt to end: past its timeout, cancelled, its
        lease lost or not renewable, or the worker stopping. Async handlers are cancelled
        then; a def handler (which a thread cannot be made to leave) should check this in
        its loops and return: until it does, its task stays RUNNING under its lease and is
        not run again anywhere."""
        return self._stop

    async def heartbeat(self) -> bool:
        """Extend the lease now (the worker also does it on its own every lease/3).

        False means the lease is lost: another worker may run the task, and
        whatever this attempt returns will be dropped. Once the attempt has ended (the
        handler returned), it is always False.
        """
        return await self._heartbeat()

    def set_result(self, value: Any) -> None:
        """The result that ctx.transaction() / ctx.session() store with the completion (the
        handler's return value comes too late for them: the task is COMPLETED by then)."""
        self._result_json = msgspec.json.encode(value).decode()

    def transaction(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A transaction (asyncpg) on the tasklease database whose commit also completes this
        task, guarded by its lease: if the lease was lost, everything in it is rolled back
        and LeaseLost is raised. See engine/fencing.py."""
        return self._fenced(lambda fence: fence.transaction)

    def session(self) -> AbstractAsyncContextManager[AsyncSession]:
        """ctx.transaction() as a SQLAlchemy AsyncSession (asyncpg): flushed, then the task is
        completed in its transaction, and it commits."""
        return self._fenced(lambda fence: fence.session)

    @asynccontextmanager
    async def _fenced(self, kind: Callable[[Fence], Callable[..., Any]]) -> AsyncIterator[Any]:
        if self._fence is None:
            raise RuntimeError("ctx.transaction() needs a worker: this context has none")
        if self.completed:
            raise RuntimeError(f"task {self.task_id} was already completed by a transaction")
        try:
            async with kind(self._fence)(
                self.task_id, self.lease_token, lambda: self._result_json
            ) as conn:
                yield conn
        except LeaseLost:
            self.lease_lost = True
            raise
        self.completed = True


HandlerFn = Callable[[TaskContext, Any], Any]


@dataclass(frozen=True)
class Handler:
    action: str
    fn: HandlerFn
    payload_type: type | None
    lease_seconds: float | None
    max_attempts: int
    backoff: Backoff
    jitter: float
    is_async: bool
    timeout: float | None = None
    global_limit: int | None = None
    rate_limit: tuple[int, float] | None = None
    # global_limit is per value of this payload field (the limit key:ACTION), not over all
    limit_by: str | None = None

    def lease(self, default: float) -> float:
        return self.lease_seconds if self.lease_seconds is not None else default

    def decode(self, payload_json: str | bytes) -> Any:
        """The payload as the handler's declared type (or a dict). PermanentError when it
        does not fit: retrying cannot fix it."""
        try:
            return self.validate(payload_json)
        except msgspec.ValidationError as exc:
            raise PermanentError(f"payload does not fit {self.action}: {exc}") from exc

    def validate(self, payload_json: str | bytes) -> Any:
        """Decode as the worker will; msgspec.ValidationError names the field that is wrong."""
        if self.payload_type is None:
            return msgspec.json.decode(payload_json)
        return msgspec.json.decode(payload_json, type=self.payload_type)

    def retry_delay(self, attempt: int) -> float:
        """Seconds until the next attempt after `attempt` (1-based) failed."""
        if callable(self.backoff):
            base = float(self.backoff(attempt))
        else:
            delays = list(self.backoff)
            base = float(delays[min(attempt, len(delays)) - 1])
            if self.backoff is DEFAULT_BACKOFF and attempt > len(delays):
                base = min(delays[-1] * BACKOFF_GROWTH ** (attempt - len(delays)), BACKOFF_CAP)
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


REGISTRY: dict[str, Handler] = {}
RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(action: str, rate: str | tuple[int, float] | None) -> tuple[int, float] | None:
    """ "10/s", "600/min", "1000/h" or (starts, period seconds)."""
    if rate is None:
        return None
    if isinstance(rate, str):
        count, _, unit = rate.partition("/")
        if not count.strip().isdigit() or unit.strip() not in RATE_UNITS:
            raise HandlerError(
                f"{action}: rate_limit {rate!r} is not like '10/s', '600/min' or '1000/h'"
            )
        starts, period = int(count), RATE_UNITS[unit.strip()]
    else:
        starts, period = int(rate[0]), float(rate[1])
    if starts < 1 or period <= 0:
        raise HandlerError(f"{action}: rate_limit needs at least 1 start per positive period")
    return starts, period


def handler(
    action: str,
    *,
    lease_seconds: float | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff: Backoff = DEFAULT_BACKOFF,
    jitter: float = DEFAULT_JITTER,
    timeout: float | None = None,
    global_limit: int | None = None,
    rate_limit: str | tuple[int, float] | None = None,
    limit_by: str | None = None,
    cron: str | None = None,
    every: float | None = None,
    timezone: str = "UTC",
    missed: str = "once",
) -> Callable[[HandlerFn], HandlerFn]:
    """Register a function as the handler of `action`.

    The function takes (ctx, payload). Annotate the payload with a msgspec Struct to
    have it validated at submission and decoded for you. `backoff` is a sequence of
    delays in seconds (the last one repeats) or a function from the attempt number
    to seconds. Sync functions run in a thread, off the event loop.

    `timeout`: seconds an attempt may run before it is stopped and counted as failed.
    `global_limit`: at most this many tasks of the action RUNNING at once, over all
    workers. `rate_limit`: at most N starts per period over all workers ("10/s").
    `limit_by`: a payload field; `global_limit` then holds per value of it (at most that many
    tasks of the action RUNNING at once per customer_id, say; tasks without the field share
    one value), and no longer over all values: `limit_by="customer_id", global_limit=5`.
    `cron` or `every` (seconds) also schedules the action periodically, with an empty
    payload (see `engine.schedule` for more), in `timezone`; `missed` says what happens
    to times missed while no worker ran: "once" (run the latest of them once) or "skip".
    """
    if max_attempts < 1:
        raise HandlerError(f"{action}: max_attempts must be at least 1")
    if lease_seconds is not None and lease_seconds <= 0:
        raise HandlerError(f"{action}: lease_seconds must be positive")
    if not callable(backoff) and not list(backoff):
        raise HandlerError(f"{action}: backoff needs at least one delay")
    if timeout is not None and timeout <= 0:
        raise HandlerError(f"{action}: timeout must be positive")
    if global_limit is not None and global_limit < 1:
        raise HandlerError(f"{action}: global_limit must be at least 1")
    if limit_by is not None:
        if not isinstance(limit_by, str) or not limit_by:
            raise HandlerError(f"{action}: limit_by must name a payload field")
        if global_limit is None:
            raise HandlerError(
                f"{action}: limit_by={limit_by!r} needs global_limit, the cap per value"
            )
        if global_limit > MAX_KEY_LIMIT:
            raise HandlerError(
                f"{action}: global_limit per {limit_by} must be at most {MAX_KEY_LIMIT}"
            )
    rate = parse_rate(action, rate_limit)
    if cron is not None or every is not None:
        schedule(action, action, cron=cron, every=every, timezone=timezone, missed=missed)

    def register(fn: HandlerFn) -> HandlerFn:
        if action in REGISTRY and REGISTRY[action].fn is not fn:
            existing = REGISTRY[action].fn
            raise HandlerError(
                f"action {action!r} is already handled by {existing.__module__}.{existing.__name__}"
            )
        payload_type = _payload_type(fn)
        if (
            limit_by is not None
            and payload_type is not None
            and limit_by not in _payload_fields(payload_type)
        ):
            raise HandlerError(
                f"{action}: limit_by={limit_by!r} is not a field of {payload_type.__name__}"
            )
        REGISTRY[action] = Handler(
            action=action,
            fn=fn,
            payload_type=payload_type,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            backoff=backoff,
            jitter=jitter,
            is_async=inspect.iscoroutinefunction(fn),
            timeout=timeout,
            global_limit=global_limit,
            rate_limit=rate,
            limit_by=limit_by,
        )
        return fn

    return register


def _payload_type(fn: HandlerFn) -> type | None:
    params = list(inspect.signature(fn).parameters)
    if len(params) != 2:
        raise HandlerError(f"{fn.__qualname__} must take (ctx, payload)")
    hint = get_type_hints(fn).get(params[1])
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return hint
    return None


def _payload_fields(payload_type: type) -> set[str]:
    """The names a Struct's fields have in JSON (renamed ones by their JSON name)."""
    return set(getattr(payload_type, "__struct_encode_fields__", ()))


BUILTIN_PACKAGE = "tasklease.handlers"
HANDLERS_ENV = "TASKLEASE_HANDLERS"


def load(modules: Sequence[str] = ()) -> dict[str, Handler]:
    """Import the built-in handlers, the modules named, and those in TASKLEASE_HANDLERS."""
    names = [
        f"{BUILTIN_PACKAGE}.{m.name}"
        for m in pkgutil.iter_modules(importlib.import_module(BUILTIN_PACKAGE).__path__)
    ]
    names += [m for m in modules if m]
    names += [m.strip() for m in os.environ.get(HANDLERS_ENV, "").split(",") if m.strip()]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise HandlerError(f"cannot import handler module {name!r}: {exc}") from exc
    check_schedules(REGISTRY)
    return REGISTRY


def check_schedules(handlers: dict[str, Handler]) -> None:
    """Every schedule names a known action and a payload that fits it: found at start-up,
    not at 3 a.m. when its first task would be buried."""
    for s in SCHEDULES.values():
        h = handlers.get(s.action)
        if h is None:
            raise HandlerError(f"schedule {s.name!r}: no handler for action {s.action!r}")
        try:
            h.validate(msgspec.json.encode(s.payload))
        except msgspec.ValidationError as exc:
            raise HandlerError(
                f"schedule {s.name!r}: payload does not fit {s.action}: {exc}"
            ) from None
