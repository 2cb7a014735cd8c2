"""The worker: claims due tasks, runs their handlers, records each outcome under its lease.

One claim loop per process leases up to `concurrency` tasks at a time. Each leased
task runs as an asyncio task with a heartbeat beside it that extends the lease
every lease/3 seconds. The outcome is decided in `decide` and written by one
guarded statement; a write that matches no row means the lease was lost (the task
was taken over), so the result is dropped and logged, never forced.

Stopping (SIGTERM/SIGINT): stop claiming, let running handlers finish within the
grace period, then cancel the rest and hand their tasks back (`release`). A second
signal skips what is left of the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.registry import (
    DEFAULT_LEASE_SECONDS,
    Handler,
    PermanentError,
    TaskContext,
)
from engine.reporting import REPORT_EVERY, Counters, Reporter, process_id
from engine.states import BY_TRIGGER
from engine.store import TRANSIENT_ERRORS, Claimed, Store

log = logging.getLogger("tasklease.worker")


@dataclass
class WorkerConfig:
    concurrency: int = 10
    queues: tuple[str, ...] = ("default",)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    poll_interval: float = 0.5
    grace_seconds: float = 30.0
    worker_id: str = field(default_factory=process_id)
    report_every: float = REPORT_EVERY


# What to write once a handler has finished (or was stopped).
@dataclass(frozen=True)
class Complete:
    result_json: str


@dataclass(frozen=True)
class Fail:
    retry_in: float
    error: str


@dataclass(frozen=True)
class Bury:
    error: str
    permanent: bool


@dataclass(frozen=True)
class Release:
    pass


@dataclass(frozen=True)
class CancelRunning:
    pass


@dataclass(frozen=True)
class Drop:
    reason: str


Decision = Complete | Fail | Bury | Release | CancelRunning | Drop


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def decide(
    handler: Handler, ctx: TaskContext, outcome: asyncio.Task[Any], releasing: bool
) -> Decision:
    """The policy: from how the handler ended to the transition to record."""
    if outcome.cancelled():
        if releasing:
            return Release()
        if ctx.cancel_requested:
            return CancelRunning()
        if ctx.lease_lost:
            return Drop("the lease was lost while the handler ran")
        return Fail(handler.retry_delay(ctx.attempt), "handler was cancelled")
    exc = outcome.exception()
    if exc is None:
        try:
            return Complete(msgspec.json.encode(outcome.result()).decode())
        except (TypeError, msgspec.EncodeError) as err:
            return Bury(f"result is not JSON: {err}", permanent=True)
    if isinstance(exc, PermanentError):
        return Bury(describe(exc), permanent=True)
    if ctx.is_last_attempt:
        return Bury(
            f"{describe(exc)} (attempt {ctx.attempt} of {ctx.max_attempts})", permanent=False
        )
    return Fail(handler.retry_delay(ctx.attempt), describe(exc))


class _TaskLogger(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        assert self.extra is not None
        return f"task {self.extra['task_id']} {self.extra['action']}: {msg}", kwargs


@dataclass
class _Execution:
    claimed: Claimed
    handler: Handler
    ctx: TaskContext
    lease_seconds: float
    started: float = field(default_factory=time.monotonic)
    handler_task: asyncio.Task[Any] | None = None
    releasing: bool = False


class Worker:
    def __init__(self, store: Store, handlers: dict[str, Handler], config: WorkerConfig) -> None:
        self.store = store
        self.handlers = handlers
        self.config = config
        self.leases = {a: h.lease(config.lease_seconds) for a, h in handlers.items()}
        self.running: dict[asyncio.Task[None], _Execution] = {}
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix="tasklease-handler"
        )
        self.counters = Counters()
        self.stats = self.counters.transitions
        self.reporter = Reporter(
            store,
            self.counters,
            kind="worker",
            process=config.worker_id,
            queues=config.queues,
            concurrency=config.concurrency,
            running=lambda: len(self.running),
            every=config.report_every,
        )

    def stop(self) -> None:
        """Stop claiming and wind down; called a second time, skip the grace period."""
        if self._stopping.is_set():
            self._force.set()
        self._stopping.set()

    async def run(self) -> None:
        log.info(
            "worker %s started: queues=%s concurrency=%d actions=%s",
            self.config.worker_id,
            ",".join(self.config.queues),
            self.config.concurrency,
            ",".join(sorted(self.handlers)),
        )
        self.reporter.start()
        try:
            await self._claim_loop()
        finally:
            await self._drain()
            self._executor.shutdown(wait=False, cancel_futures=True)
            await self.reporter.stop()
            log.info(
                "worker %s stopped: %s",
                self.config.worker_id,
                " ".join(f"{k}={v}" for k, v in self.stats.items()),
            )

    async def _claim_loop(self) -> None:
        errors = 0
        while not self._stopping.is_set():
            free = self.config.concurrency - len(self.running)
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_for(self._slot_freed, self._stopping, timeout=None)
                continue
            try:
                leased, expired = await self.store.claim(
                    self.config.queues, self.leases, free, self.config.worker_id
                )
            except TRANSIENT_ERRORS as exc:
                errors += 1
                delay = min(0.25 * 2**errors, 10.0)
                log.warning("cannot claim (%s); retrying in %.1fs", describe(exc), delay)
                await self._wait_for(self._stopping, timeout=delay)
                continue
            if errors:
                log.info("database reachable again")
                errors = 0
            self.counters.count("expire", len(expired))
            for task_id in expired:
                log.warning(
                    "task %d: lease expired on its last attempt: RUNNING -> DEAD (expire)", task_id
                )
            for claimed in leased:
                self._start(claimed)
            if len(leased) < free:
                await self._wait_for(self._stopping, timeout=self.config.poll_interval)

    @staticmethod
    async def _wait_for(*events: asyncio.Event, timeout: float | None) -> None:
        """Until one of the events is set, or the timeout passes."""
        waiters = {asyncio.ensure_future(e.wait()) for e in events}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _start(self, claimed: Claimed) -> None:
        handler = self.handlers[claimed.action]
        lease_seconds = self.leases[claimed.action]
        ctx = TaskContext(
            task_id=claimed.id,
            action=claimed.action,
            attempt=claimed.attempt,
            max_attempts=claimed.max_attempts,
            lease_token=claimed.lease_token,
            idempotency_key=claimed.idempotency_key,
            queue=claimed.queue,
            worker=self.config.worker_id,
            logger=_TaskLogger(log, {"task_id": claimed.id, "action": claimed.action}),
            _heartbeat=lambda: self._heartbeat(ex),
        )
        ex = _Execution(claimed, handler, ctx, lease_seconds)
        self.counters.count(claimed.trigger)
        ctx.logger.info(
            "%s -> RUNNING (%s, attempt %d/%d)",
            claimed.from_state,
            claimed.trigger,
            claimed.attempt,
            claimed.max_attempts,
        )
        task = asyncio.create_task(self._execute(ex), name=f"task-{claimed.id}")
        self.running[task] = ex
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.running.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("execution crashed", exc_info=task.exception())

    async def _execute(self, ex: _Execution) -> None:
        ex.handler_task = asyncio.create_task(self._invoke(ex))
        beat = asyncio.create_task(self._heartbeat_loop(ex))
        try:
            await asyncio.wait([ex.handler_task])
        finally:
            beat.cancel()
        if not ex.handler_task.cancelled():
            self.counters.observe(ex.claimed.action, time.monotonic() - ex.started)
        exc = None if ex.handler_task.cancelled() else ex.handler_task.exception()
        if exc is not None and not isinstance(exc, PermanentError):
            ex.ctx.logger.warning(
                "attempt %d failed: %s\n%s",
                ex.ctx.attempt,
                describe(exc),
                "".join(traceback.format_exception(exc)).rstrip(),
            )
        await self._record(ex, decide(ex.handler, ex.ctx, ex.handler_task, ex.releasing))

    async def _invoke(self, ex: _Execution) -> Any:
        payload = ex.handler.decode(ex.claimed.payload)
        if ex.handler.is_async:
            return await ex.handler.fn(ex.ctx, payload)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, ex.handler.fn, ex.ctx, payload)

    async def _heartbeat(self, ex: _Execution) -> bool:
        """Extend the lease; on a lost lease or a cancel request, stop the handler."""
        row = await self.store.heartbeat(ex.claimed.id, ex.claimed.lease_token, ex.lease_seconds)
        if row is None:
            if not ex.ctx.lease_lost:
                ex.ctx.lease_lost = True
                ex.ctx.logger.warning(
                    "lease lost (taken over after it expired); stopping the handler"
                )
                self._stop_handler(ex)
            return False
        if row["cancel_requested"] and not ex.ctx.cancel_requested:
            ex.ctx.cancel_requested = True
            ex.ctx.logger.info("cancellation requested; stopping the handler")
            self._stop_handler(ex)
        return True

    def _stop_handler(self, ex: _Execution) -> None:
        if ex.handler_task is not None and not ex.handler_task.done():
            ex.handler_task.cancel()

    async def _heartbeat_loop(self, ex: _Execution) -> None:
        interval = ex.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._heartbeat(ex):
                    return
            except TRANSIENT_ERRORS as exc:
                ex.ctx.logger.warning("heartbeat failed (%s); will try again", describe(exc))

    async def _record(self, ex: _Execution, decision: Decision) -> None:
        task_id, token, ctx, store = ex.claimed.id, ex.claimed.lease_token, ex.ctx, self.store
        took = f"{(time.monotonic() - ex.started) * 1000:.0f} ms"
        write: Callable[[], Awaitable[Any]]
        note = ""
        match decision:
            case Complete(result_json):
                trigger, write = "complete", lambda: store.complete(task_id, token, result_json)
            case Fail(retry_in, error):
                trigger, write = "fail", lambda: store.fail(task_id, token, retry_in, error)
                note = f", retry in {retry_in:.0f}s"
            case Bury(error, permanent):
                trigger, write = "bury", lambda: store.bury(task_id, token, error, permanent)
                note = f": {error}"
            case Release():
                trigger, write = "release", lambda: store.release(task_id, token)
            case CancelRunning():
                trigger, write = "cancel_running", lambda: store.cancel_running(task_id, token)
            case Drop(reason):
                self.counters.count("dropped")
                ctx.logger.warning("result dropped: %s", reason)
                return
        change = f"RUNNING -> {BY_TRIGGER[trigger].dest} ({trigger}{note})"
        retried = False
        while True:
            try:
                done = bool(await write())
                break
            except TRANSIENT_ERRORS as exc:
                if self._force.is_set():
                    ctx.logger.error(
                        "could not record %s (%s); the lease will expire", change, describe(exc)
                    )
                    return
                retried = True
                ctx.logger.warning("cannot record %s yet (%s); retrying", change, describe(exc))
                await self._wait_for(self._force, timeout=1.0)
        if not done and retried:
            # The first write may have committed before its reply was lost.
            outcome = await store.lease_outcome(task_id, token)
            done = outcome is not None and outcome["ours"] and outcome["state"] != "RUNNING"
        if done:
            self.counters.count(trigger)
            ctx.logger.info("%s, attempt %d/%d, %s", change, ctx.attempt, ctx.max_attempts, took)
        else:
            self.counters.count("dropped")
            ctx.logger.warning(
                "%s refused: the lease was lost (another worker took the task over); "
                "this attempt's outcome is dropped",
                change,
            )

    async def _drain(self) -> None:
        if not self.running:
            return
        grace = 0.0 if self._force.is_set() else self.config.grace_seconds
        log.info("stopping: waiting up to %.0fs for %d running task(s)", grace, len(self.running))
        deadline = time.monotonic() + grace
        force = asyncio.ensure_future(self._force.wait())
        try:
            while self.running and not self._force.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    [*self.running, force], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            force.cancel()
        if self.running:
            log.info("handing %d unfinished task(s) back", len(self.running))
            for ex in self.running.values():
                ex.releasing = True
                self._stop_handler(ex)
            await asyncio.wait(list(self.running), timeout=15)
