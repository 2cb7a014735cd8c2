"""The executor: runs each claimed task's handler and has its outcome written.

The claim loop (worker.py) hands it each task it leases (`start`); it owns the slots those
tasks hold, the handlers' asyncio tasks and the thread pool of `def` handlers. For each task
it asks the lease keeper (leases.py) to renew the lease, stops the handler when the lease is
lost, a cancel is requested or its timeout passes, decides the outcome (outcomes.decide) and
writes it under the lease token: complete, fail and bury through the batched writer
(outcomes.Outcomes), the rare ones (release, snooze, cancel_running) one statement each.
It calls nothing back in the worker: it tells it that a slot came free (`slot_freed`) and
when a task it failed or snoozed comes due again (`due_in`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tasklease.engine.fencing import Fence
from tasklease.engine.leases import FENCE_AT, Lease, LeaseKeeper
from tasklease.engine.outcomes import (
    CANCEL,
    LEASE_LOST,
    RELEASE,
    Bury,
    CancelRunning,
    Committed,
    Complete,
    Decision,
    Drop,
    Fail,
    Outcomes,
    Release,
    Snoozed,
    decide,
    storable,
)
from tasklease.engine.registry import Dependency, Handler, PermanentError, Snooze, TaskContext
from tasklease.engine.reporting import Counters
from tasklease.engine.retry import Retry, describe
from tasklease.engine.states import BY_TRIGGER
from tasklease.engine.store import TRANSIENT_ERRORS, Claimed, Store

log = logging.getLogger("tasklease.worker")


class HandlerExited(Exception):
    """The handler raised SystemExit: a failed attempt, not the worker's end."""


class TaskTimeout(Exception):
    """The attempt ran longer than its timeout and was stopped."""


@dataclass
class _Execution:
    claimed: Claimed
    handler: Handler
    ctx: TaskContext
    lease_seconds: float
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    thread: concurrent.futures.Future[Any] | None = None  # a def handler's run
    in_handler: bool = False
    outliving: bool = False  # waiting for a def handler's thread that was told to stop
    stopped: str | None = None  # RELEASE, LEASE_LOST or CANCEL once the handler is stopped
    holds_slot: bool = False  # counted in Worker.handling
    # a workflow's task: its dependencies, read for all of its claim at once
    dependencies: asyncio.Future[dict[int, list[Dependency]]] | None = None


async def _attempt_over() -> bool:
    """ctx.heartbeat() once the attempt has ended."""
    return False


class Executor:
    def __init__(
        self,
        store: Store,
        handlers: dict[str, Handler],
        *,
        concurrency: int,
        worker_id: str,
        keeper: LeaseKeeper,
        outcomes: Outcomes,
        fence: Fence,
        counters: Counters,
        force: asyncio.Event,
        slot_freed: Callable[[], None],
        due_in: Callable[[float], None],
    ) -> None:
        self.store, self.handlers, self.worker_id = store, handlers, worker_id
        self.keeper, self.outcomes, self.fence, self.counters = keeper, outcomes, fence, counters
        self._force = force  # set: stop waiting (a second signal, or the last write's retries)
        self.slot_freed, self.due_in = slot_freed, due_in
        self.running: dict[asyncio.Task[None], _Execution] = {}
        # Slots taken: tasks claimed whose handler has not returned yet. A slot is taken at
        # the claim (not when the handler first runs, which would let the next claim see it
        # free) and freed once the handler returns: the outcome is written meanwhile,
        # batched with others, while the next tasks are already claimed.
        self.handling = 0
        self._threads = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="tasklease-handler"
        )

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def start(self, leased: Sequence[Claimed], sent: float) -> None:
        """Run the tasks of one claim (`sent`: when it was sent, by the monotonic clock). The
        dependencies of a workflow's tasks are read for all of them at once, while they
        start."""
        waiting = [c.id for c in leased if c.dependencies]
        deps = asyncio.ensure_future(self._dependencies(waiting)) if waiting else None
        for trigger, n in collections.Counter(c.trigger for c in leased).items():
            self.counters.count(trigger, n)
        for claimed in leased:
            self._start(claimed, sent, deps if claimed.dependencies else None)

    async def _dependencies(self, task_ids: list[int]) -> dict[int, list[Dependency]]:
        """What the tasks of one claim waited for, by task: one query for all of them."""
        found: dict[int, list[Dependency]] = {}
        for r in await self.store.dependency_results(task_ids):
            found.setdefault(r["task_id"], []).append(
                Dependency(
                    r["id"],
                    r["action"],
                    r["state"],
                    None if r["result"] is None else msgspec.json.decode(r["result"]),
                    r["on_failure"],
                )
            )
        return found

    def _start(
        self,
        claimed: Claimed,
        sent: float,
        dependencies: asyncio.Future[dict[int, list[Dependency]]] | None,
    ) -> None:
        handler = self.handlers[claimed.action]
        lease_seconds = claimed.lease_seconds
        late = time.monotonic() - sent
        if late >= lease_seconds * FENCE_AT:
            # The claim's answer took so long (a slow or cut link) that the lease may have run
            # out and the task been taken over meanwhile: running it now could overlap the
            # other run. Self-fencing from the start; the lease runs out, as for a crash.
            self.counters.count("fenced")
            log.warning(
                "task %d (%s): claim answered too late (%.1fs after it was sent, lease %gs); "
                "not running it (self-fencing): its lease runs out and it is taken over",
                claimed.id,
                claimed.action,
                late,
                lease_seconds,
            )
            return
        ctx = TaskContext(
            task_id=claimed.id,
            action=claimed.action,
            attempt=claimed.attempt,
            max_attempts=claimed.max_attempts,
            lease_token=claimed.lease_token,
            idempotency_key=claimed.idempotency_key,
            queue=claimed.queue,
            worker=self.worker_id,
            _heartbeat=lambda: self._heartbeat_one(ex),
            _fence=self.fence,
        )
        ex = _Execution(claimed, handler, ctx, lease_seconds, dependencies=dependencies)
        if log.isEnabledFor(logging.INFO):
            ctx.logger.info(
                "%s -> RUNNING (%s, attempt %d/%d)",
                claimed.from_state,
                claimed.trigger,
                claimed.attempt,
                claimed.max_attempts,
            )
        self.handling += 1
        ex.holds_slot = True
        ex.task = asyncio.create_task(self._execute(ex))
        self.running[ex.task] = ex
        ex.task.add_done_callback(self._finished)
        self.keeper.hold(
            Lease(
                claimed.id,
                claimed.lease_token,
                lease_seconds,
                claimed.action,
                valid_until=sent + lease_seconds,
                answer=lambda held, cancel: self._lease_answer(ex, held, cancel),
                fence=lambda: self._fence(ex),
            )
        )

    def _free_slot(self, ex: _Execution) -> None:
        if ex.holds_slot:
            ex.holds_slot = False
            self.handling -= 1
            self.slot_freed()

    def _finished(self, task: asyncio.Task[None]) -> None:
        ex = self.running.pop(task, None)
        if ex is not None:
            self.keeper.forget(ex.claimed.lease_token)
            self._free_slot(ex)  # a task cancelled before its handler ran
            # The attempt is over: no lease left to extend. This also breaks the reference
            # cycle ex -> ctx -> ctx._heartbeat -> ex, so that reference counting frees the
            # execution now; left to the garbage collector, 11 objects a task, its passes
            # took ~15 % of a drain's time (docs/benchmarks.md, "Executions freed at once").
            ex.ctx._heartbeat = _attempt_over
        if not task.cancelled() and task.exception() is not None:
            log.error("execution crashed", exc_info=task.exception())

    # --- running -----------------------------------------------------------------------------

    async def _execute(self, ex: _Execution) -> None:
        result: Any = None
        error: BaseException | None = None
        ex.in_handler = True
        timeout = ex.claimed.timeout_seconds or ex.handler.timeout
        limit: asyncio.Timeout | None = None
        try:
            if ex.dependencies is not None:  # a workflow's task: its dependencies' results
                found = await asyncio.shield(ex.dependencies)
                ex.ctx.dependencies = found.get(ex.claimed.id, [])
            payload = ex.handler.decode(ex.claimed.payload)
            if ex.handler.is_async:
                work = ex.handler.fn(ex.ctx, payload)
            else:
                ex.thread = self._threads.submit(ex.handler.fn, ex.ctx, payload)
                work = asyncio.wrap_future(ex.thread)
            if timeout is None:
                result = await work
            else:
                async with asyncio.timeout(timeout) as limit:
                    result = await work
        except TimeoutError as exc:
            error = (
                TaskTimeout(f"timed out after {timeout:g}s")
                if limit is not None and limit.expired()
                else exc
            )
        except asyncio.CancelledError:
            if ex.stopped is None:  # not ours: the event loop itself is going away
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except SystemExit as exc:
            # a handler's sys.exit() must not stop the worker and every task it runs
            error = HandlerExited(f"the handler called sys.exit({exc.code!r})")
        except Exception as exc:
            error = exc
        finally:
            ex.ctx._stop = True
            if ex.thread is not None and not ex.thread.done():
                await self._outlive(ex, error)
            ex.in_handler = False
            self.keeper.done_executing(ex.claimed.lease_token)
            self._free_slot(ex)
        if ex.stopped is None:
            self.counters.observe(ex.claimed.action, time.monotonic() - ex.started)
        if ex.ctx.completed and result is not None:
            ex.ctx.logger.warning(
                "the handler returned a result after its transaction completed the task: not "
                "stored (give it to ctx.set_result() inside the transaction)"
            )
        if ex.ctx.completed and error is not None:
            ex.ctx.logger.warning(
                "the handler raised after its transaction completed the task (the task stays "
                "COMPLETED): %s",
                describe(error),
            )
            error = None
        if error is not None and not isinstance(error, PermanentError | Snooze):
            ex.ctx.logger.warning(
                "attempt %d failed: %s\n%s",
                ex.ctx.attempt,
                describe(error),
                "".join(traceback.format_exception(error)).rstrip(),
            )
        decision = decide(ex.handler, ex.ctx, result=result, error=error, stopped=ex.stopped)
        # the error's traceback holds this frame, which holds the error: a cycle that would
        # keep the execution for the garbage collector
        error = None
        try:
            await self._record(ex, decision)
        except Exception as exc:
            # whatever goes wrong recording an outcome becomes an outcome, with its reason,
            # instead of a task left RUNNING until its lease runs out
            ex.ctx.logger.exception("recording %s failed", type(decision).__name__)
            reason = storable(f"the outcome could not be recorded: {describe(exc)}")
            await self._record(ex, Bury(reason, permanent=True))

    async def _outlive(self, ex: _Execution, error: BaseException | None) -> None:
        """A def handler told to stop (timeout, cancel, lease, shutdown) whose thread still
        runs: a thread cannot be interrupted, so the attempt ends when it returns. Until then
        the task stays RUNNING under this worker's lease (renewed as usual) and keeps its
        slot, so it is not run again anywhere meanwhile; its outcome is the stop's."""
        assert ex.thread is not None
        why = describe(error) if error is not None else (ex.stopped or "stopped")
        ex.ctx.logger.warning(
            "%s, but its thread still runs (ctx.stop_requested is set): the task is held under "
            "its lease until the handler returns",
            why,
        )
        began = time.monotonic()
        ex.outliving = True
        await asyncio.wait([asyncio.wrap_future(ex.thread)])
        ex.ctx.logger.info("its thread returned %.1fs later", time.monotonic() - began)

    def _stop_handler(self, ex: _Execution, why: str) -> None:
        if ex.in_handler and ex.stopped is None and ex.task is not None:
            ex.stopped = why
            ex.ctx._stop = True
            if not ex.outliving:  # else only its thread is left, which returns in its time
                ex.task.cancel()

    def _lease_answer(self, ex: _Execution, held: bool, cancel_requested: bool) -> None:
        """React to a renewal: a lost lease or a cancel request stops the handler."""
        if ex.task not in self.running:
            return
        if not held:
            if ex.ctx.completed:  # completed in the handler's transaction: nothing to hold
                self.keeper.forget(ex.claimed.lease_token)
            elif not ex.ctx.lease_lost:
                ex.ctx.lease_lost = True
                if ex.in_handler:
                    ex.ctx.logger.warning(
                        "lease lost (taken over after it expired); stopping the handler"
                    )
                self._stop_handler(ex, LEASE_LOST)
        elif cancel_requested and not ex.ctx.cancel_requested:
            ex.ctx.cancel_requested = True
            ex.ctx.logger.info("cancellation requested; stopping the handler")
            self._stop_handler(ex, CANCEL)

    def _fence(self, ex: _Execution) -> None:
        """The lease keeper could not renew this lease in time (engine/leases.py): stop the
        handler before the lease can run out and another worker take the task over. Its
        outcome is dropped; the task is taken over once its lease has run out."""
        if ex.task not in self.running or ex.ctx.completed:
            self.keeper.forget(ex.claimed.lease_token)
            return
        if ex.in_handler and ex.stopped is None:
            self.counters.count("fenced")
        ex.ctx.lease_lost = True
        self._stop_handler(ex, LEASE_LOST)

    async def _heartbeat_one(self, ex: _Execution) -> bool:
        """ctx.heartbeat(): extend this task's lease now."""
        sent = time.monotonic()
        row = await self.store.heartbeat(ex.claimed.id, ex.claimed.lease_token, ex.lease_seconds)
        if row is not None:
            self.keeper.renewed(ex.claimed.lease_token, sent)
        self._lease_answer(ex, row is not None, bool(row and row["cancel_requested"]))
        return row is not None

    async def _record(self, ex: _Execution, decision: Decision) -> None:
        task_id, token, ctx = ex.claimed.id, ex.claimed.lease_token, ex.ctx
        note = ""
        done: bool | None
        match decision:
            case Complete(result_json):
                trigger = "complete"
                kind = "settle" if ex.claimed.dependants else trigger
                try:
                    done = await self.outcomes.put(kind, (task_id, token, result_json))
                except Exception as exc:
                    error = storable(f"result cannot be stored: {describe(exc)}")
                    return await self._record(ex, Bury(error, permanent=True))
            case Fail(retry_in, error):
                trigger, note = "fail", f", retry in {retry_in:.0f}s"
                done = await self.outcomes.put(trigger, (task_id, token, retry_in, error))
                if done:
                    self.due_in(retry_in)
            case Bury(error, permanent):
                trigger, note = "bury", ": " + error.partition("\n")[0]
                done = await self.outcomes.put(trigger, (task_id, token, error, permanent))
            case Release():
                trigger = "release"
                done = await self._write_one(lambda: self.store.release(task_id, token))
            case Snoozed(seconds, reason):
                trigger, note = "snooze", f" for {seconds:g}s"
                done = await self._write_one(
                    lambda: self.store.snooze(task_id, token, seconds, reason)
                )
                if done:
                    self.due_in(seconds)
            case CancelRunning():
                trigger = "cancel_running"
                done = await self._write_one(lambda: self.store.cancel_running(task_id, token))
            case Drop(reason):
                self.counters.count("dropped")
                ctx.logger.warning("result dropped: %s", reason)
                return
            case Committed():
                trigger, done = "complete", True
                note = " in the handler's transaction"
        if done:
            self.counters.count(trigger)
            if log.isEnabledFor(logging.INFO):
                ctx.logger.info(
                    "RUNNING -> %s (%s%s), attempt %d/%d, %.0f ms",
                    BY_TRIGGER[trigger].dest,
                    trigger,
                    note,
                    ctx.attempt,
                    ctx.max_attempts,
                    (time.monotonic() - ex.started) * 1000,
                )
        elif done is False:
            self.counters.count("dropped")
            ctx.logger.warning(
                "RUNNING -> %s (%s%s) refused: the lease was lost (another worker took the "
                "task over); this attempt's outcome is dropped",
                BY_TRIGGER[trigger].dest,
                trigger,
                note,
            )

    async def _write_one(self, write: Callable[[], Awaitable[bool]]) -> bool | None:
        """The rare outcomes (release, cancel_running), one statement each, retried."""
        retry = Retry("record an outcome", self._force, log, most=1.0)
        while True:
            try:
                return await write()
            except TRANSIENT_ERRORS as exc:
                if not await retry.after(exc):
                    log.error(
                        "could not record an outcome (%s); its lease will run out", describe(exc)
                    )
                    return None

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds (none once `force` is set) for the running handlers,
        then stop the rest and hand their tasks back (`release`)."""
        if not self.running:
            return
        grace = 0.0 if self._force.is_set() else grace
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
            for ex in list(self.running.values()):
                self._stop_handler(ex, RELEASE)
            await asyncio.wait(list(self.running), timeout=15)
