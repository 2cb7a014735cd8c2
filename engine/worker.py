"""The worker: claims due tasks, runs their handlers, records each outcome under its lease.

One claim loop per process leases up to its free slots in one statement. Each leased
task runs as an asyncio task. Every statement on the hot path serves many tasks at once:

- claim: one statement leases a batch, takes over expired leases, and says how long until
  the next task comes due; an idle worker sleeps that long, or until a NOTIFY from a
  submission wakes it (`--poll-interval` is only a safety net);
- heartbeat: one statement every lease/3 seconds extends the leases of all running tasks,
  from a thread of its own (engine/leases.py: a handler that blocks the event loop cannot
  stop it; a lease it cannot renew stops its handler before it runs out);
- outcomes: finished tasks queue their outcome, and one statement per kind (complete, fail,
  bury) writes everything that queued while the previous write was in flight.

Each claim also obeys aging and the global limits, which the claim statement reads from the
database (the `limits` table); at start-up the worker writes there the limits its code
declares (`@handler(global_limit=, rate_limit=)`, `--queue-limit`). A queue whose claim
found nothing rests up to QUIET_SECONDS unless a NOTIFY wakes it.
An attempt that runs past its timeout (the task's, else the action's) is cancelled and
counts as failed. Beside claiming, each worker runs the scheduler of the periodic tasks its
modules declare (engine.schedules) and the retention loop (engine.retention), whose rounds
run in one worker at a time.

Each outcome is decided in `decide` and written under the task's lease token; a token that
no longer holds the lease matches no row, so the result is dropped and logged, never forced.

Stopping (SIGTERM/SIGINT): stop claiming, let running handlers finish within the grace
period, then cancel the rest and hand their tasks back (`release`). A second signal skips
what is left of the grace period.
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

from tasklease.engine import database
from tasklease.engine.fencing import Fence
from tasklease.engine.leases import FENCE_AT, Blocker, Lease, LeaseKeeper
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
from tasklease.engine.registry import (
    DEFAULT_LEASE_SECONDS,
    Handler,
    PermanentError,
    Snooze,
    TaskContext,
)
from tasklease.engine.reporting import REPORT_EVERY, Counters, Reporter, process_id
from tasklease.engine.retention import Retention, RetentionConfig
from tasklease.engine.retry import Retry, describe, wait_for
from tasklease.engine.schedules import SCHEDULES, Scheduler
from tasklease.engine.states import BY_TRIGGER
from tasklease.engine.store import TRANSIENT_ERRORS, Claimed, Limit, Store

log = logging.getLogger("tasklease.worker")
CHANNEL = "tasklease"
DEFAULT_AGING_SECONDS = 300.0
# A claim statement that found nothing is not run again for this long (or until its next
# known due time, or a NOTIFY) while the worker's other statements keep claiming.
QUIET_SECONDS = 1.0


@dataclass
class WorkerConfig:
    concurrency: int = 10
    queues: tuple[str, ...] = ("default",)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    poll_interval: float = 5.0
    grace_seconds: float = 30.0
    worker_id: str = field(default_factory=process_id)
    report_every: float = REPORT_EVERY
    # due for longer than this, a task is taken ahead of higher priorities (None: never)
    aging_seconds: float | None = DEFAULT_AGING_SECONDS
    queue_limits: dict[str, int] = field(default_factory=dict)  # global RUNNING per queue
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    # a handler that cannot be stopped when its lease cannot be kept ends the process
    # (engine/leases.py); False for a worker in a process that is not its own
    exit_to_fence: bool = True


class HandlerExited(Exception):
    """The handler raised SystemExit: a failed attempt, not the worker's end."""


class TaskTimeout(Exception):
    """The attempt ran longer than its timeout and was stopped."""


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
    task: asyncio.Task[None] | None = None
    thread: concurrent.futures.Future[Any] | None = None  # a def handler's run
    in_handler: bool = False
    outliving: bool = False  # waiting for a def handler's thread that was told to stop
    stopped: str | None = None  # RELEASE, LEASE_LOST or CANCEL once the handler is stopped
    holds_slot: bool = False  # counted in Worker.handling


class Worker:
    def __init__(self, store: Store, handlers: dict[str, Handler], config: WorkerConfig) -> None:
        self.store = store
        self.handlers = handlers
        self.config = config
        self.leases = {a: h.lease(config.lease_seconds) for a, h in handlers.items()}
        self.scheduler = Scheduler(
            store, {n: s for n, s in SCHEDULES.items() if s.action in handlers}
        )
        self.running: dict[asyncio.Task[None], _Execution] = {}
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._slot_freed = asyncio.Event()
        # Slots taken: tasks claimed whose handler has not returned yet. A slot is taken at
        # the claim (not when the handler first runs, which would let the next claim see it
        # free) and freed once the handler returns: the outcome is written meanwhile,
        # batched with others, while the next tasks are already claimed.
        self.handling = 0
        self._wake = asyncio.Event()
        self.keeper = LeaseKeeper(
            store.dsn,
            default_seconds=min(self.leases.values(), default=DEFAULT_LEASE_SECONDS),
            handler_codes={
                h.fn.__code__: a for a, h in handlers.items() if hasattr(h.fn, "__code__")
            },
            on_stall=self._loop_blocked,
            exit_to_fence=config.exit_to_fence,
        )
        # queue -> monotonic time before which it is not claimed from again
        self._quiet: dict[str, float] = {}
        # queues whose claim a global limit held back: tried again as soon as this worker's
        # outcomes free some room
        self._held: set[str] = set()
        self._executor = ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix="tasklease-handler"
        )
        self.outcomes = Outcomes(store, self._force, self._outcomes_written)
        self.fence = Fence(store, max_size=config.concurrency)
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
        self.reporter.start()
        self.keeper.start()
        helpers = [
            asyncio.create_task(c)
            for c in (
                self.outcomes.run(),
                self._listen(),
                self.scheduler.run(),
                Retention(self.store.dsn, self.config.retention).run(),
            )
        ]
        try:
            await self._claim_loop()
        finally:
            await self._drain()
            await self.keeper.stop()
            for helper in helpers:
                helper.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)
            await self.fence.close()
            await self.reporter.stop()
            log.info(
                "worker %s stopped: %s",
                self.config.worker_id,
                " ".join(f"{k}={v}" for k, v in self.stats.items()),
            )

    wait_for = staticmethod(wait_for)

    # --- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        declaring = Retry("declare the global limits", self._stopping, log)
        while not self._stopping.is_set():
            try:
                await self._declare_limits()
                break
            except TRANSIENT_ERRORS as exc:
                await declaring.after(exc)
        # started: from here on it claims (its limits are written, which takes a few round
        # trips on a slow link)
        log.info(
            "worker %s started: queues=%s concurrency=%d actions=%s",
            self.config.worker_id,
            ",".join(self.config.queues),
            self.config.concurrency,
            ",".join(sorted(self.handlers)),
        )
        claiming = Retry("claim", self._stopping, log)
        queues = collections.deque(self.config.queues)
        while not self._stopping.is_set():
            if self.config.concurrency - self.handling <= 0:
                self._slot_freed.clear()
                await self.wait_for(self._slot_freed, self._stopping, timeout=None)
                continue
            self._wake.clear()  # before claiming: a NOTIFY meanwhile must not be lost
            queues.rotate(-1)  # each round starts at the next queue, so none starves
            try:
                busy, wait = await self._claim_round(queues)
            except TRANSIENT_ERRORS as exc:
                await claiming.after(exc)
                continue
            claiming.succeeded()
            if not busy:
                # Nothing more is due: sleep until the next task comes due or lease runs out,
                # a NOTIFY of new work, or the safety-net poll, whichever is first.
                await self.wait_for(self._wake, self._stopping, timeout=wait)

    async def _claim_round(self, queues: Sequence[str]) -> tuple[bool, float]:
        """Claim from each queue while slots are free. Returns (some queue had more due work
        than we could take, seconds until the next known due time or lease expiry)."""
        busy, wait = False, self.config.poll_interval
        for queue in queues:
            free = self.config.concurrency - self.handling
            if free <= 0:
                return True, 0.0
            # A queue that had nothing lately rests a moment instead of being asked every
            # round while others keep this worker busy.
            now = time.monotonic()
            quiet_until = self._quiet.get(queue, 0.0)
            if quiet_until > now:
                wait = min(wait, quiet_until - now)
                continue
            sent = time.monotonic()  # the leases taken hold at least until sent + lease
            claim = await self.store.claim(
                queue, self.leases, free, self.config.worker_id, self.config.aging_seconds
            )
            if claim.held_back:
                self._held.add(queue)
            if claim.leased or claim.expired:
                self._quiet.pop(queue, None)
            else:
                rest = QUIET_SECONDS if claim.wait_seconds is None else claim.wait_seconds
                self._quiet[queue] = now + min(QUIET_SECONDS, max(rest, 0.0))
            self.counters.count("expire", len(claim.expired))
            for task_id in claim.expired:
                log.warning(
                    "task %d: lease expired on its last attempt: RUNNING -> DEAD (expire)", task_id
                )
            for claimed in claim.leased:
                self._start(claimed, sent)
            busy = busy or len(claim.leased) == free
            if claim.wait_seconds is not None:
                wait = min(wait, max(claim.wait_seconds, 0.0))
        return busy, wait

    async def _declare_limits(self) -> None:
        """Write the global limits this worker's code declares (an operator's value set with
        `tasklease limits set` stays), and remove those its actions no longer declare."""
        declared = [Limit(f"queue:{q}", n) for q, n in self.config.queue_limits.items()]
        undeclared = []
        for action, h in self.handlers.items():
            # with limit_by, global_limit is per value of the field: key:ACTION, not action:
            if h.global_limit is None or h.limit_by is not None:
                undeclared.append(f"action:{action}")
            else:
                declared.append(Limit(f"action:{action}", h.global_limit))
            if h.global_limit is None or h.limit_by is None:
                undeclared.append(f"key:{action}")
            else:
                declared.append(Limit(f"key:{action}", h.global_limit, by=h.limit_by))
            if h.rate_limit is None:
                undeclared.append(f"rate:{action}")
            else:
                declared.append(Limit(f"rate:{action}", *h.rate_limit))
        for limit in declared:
            await self.store.set_limit(limit, declared=True)
        removed = await self.store.unset_limits(undeclared, declared_only=True)
        if removed:
            log.info("global limits no longer declared, removed: %s", ", ".join(removed))
        mine = {limit.key for limit in declared} | set(undeclared)
        for row in await self.store.limits():
            if row["key"] in mine:
                per = f" per {row['per_seconds']:g}s" if row["per_seconds"] else ""
                per += f" per value of {row['by']}" if row["by"] else ""
                by = "" if row["declared"] else " (set by an operator)"
                log.info("global limit %s = %d%s%s", row["key"], row["value"], per, by)

    def _outcomes_written(self) -> None:
        """Tasks left RUNNING: a claim that a global limit held back may get through now.
        (A task counts against a limit until its outcome is written, and this worker claims
        again as soon as a handler returns: waiting out a fixed pause instead would leave
        slots idle while the limit is in fact free.)"""
        if self._held:
            for key in self._held:
                self._quiet.pop(key, None)
            self._held.clear()
            self._wake.set()

    async def _listen(self) -> None:
        """LISTEN for submissions on a connection of its own; reconnect when it drops. Behind
        a pooler with no direct DSN to listen on (TASKLEASE_PGBOUNCER=1), only poll."""
        if self.store.listen_dsn is None:
            log.info(
                "behind a pooler (TASKLEASE_PGBOUNCER=1): not listening for new tasks, "
                "polling every %gs (--poll-interval)",
                self.config.poll_interval,
            )
            return
        delay = 0.5
        while True:
            conn = None
            try:
                conn = await database.connect(self.store.listen_dsn)
                dropped = asyncio.Event()
                conn.add_termination_listener(lambda _, d=dropped: d.set())
                await conn.add_listener(CHANNEL, self._notified)
                self._quiet.clear()
                self._wake.set()  # anything submitted while we were not listening
                delay = 0.5
                await dropped.wait()
            except TRANSIENT_ERRORS as exc:
                log.debug("cannot listen for new tasks (%s); polling meanwhile", describe(exc))
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _notified(self, conn: Any, pid: int, channel: str, queue: str) -> None:
        if queue in self.config.queues:
            self._quiet.pop(queue, None)
            self._wake.set()

    def _start(self, claimed: Claimed, sent: float) -> None:
        handler = self.handlers[claimed.action]
        lease_seconds = claimed.lease_seconds
        late = time.monotonic() - sent
        if late >= lease_seconds * FENCE_AT:
            # The claim's answer took so long (a slow or cut link) that the lease may have run
            # out and the task been taken over meanwhile: running it now could overlap the
            # other run. Self-fencing from the start; the lease runs out, as for a crash.
            self.counters.count(claimed.trigger)
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
            worker=self.config.worker_id,
            logger=_TaskLogger(log, {"task_id": claimed.id, "action": claimed.action}),
            _heartbeat=lambda: self._heartbeat_one(ex),
            _fence=self.fence,
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
            self._slot_freed.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        ex = self.running.pop(task, None)
        if ex is not None:
            self.keeper.forget(ex.claimed.lease_token)
            self._free_slot(ex)  # a task cancelled before its handler ran
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
            payload = ex.handler.decode(ex.claimed.payload)
            if ex.handler.is_async:
                work = ex.handler.fn(ex.ctx, payload)
            else:
                ex.thread = self._executor.submit(ex.handler.fn, ex.ctx, payload)
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

    def _loop_blocked(self, blocker: Blocker, seconds: float) -> None:
        self.counters.block(blocker.action or "", seconds)

    async def _heartbeat_one(self, ex: _Execution) -> bool:
        """ctx.heartbeat(): extend this task's lease now."""
        sent = time.monotonic()
        row = await self.store.heartbeat(ex.claimed.id, ex.claimed.lease_token, ex.lease_seconds)
        if row is not None:
            self.keeper.renewed(ex.claimed.lease_token, sent)
        self._lease_answer(ex, row is not None, bool(row and row["cancel_requested"]))
        return row is not None

    # --- recording ---------------------------------------------------------------------------

    async def _record(self, ex: _Execution, decision: Decision) -> None:
        task_id, token, ctx = ex.claimed.id, ex.claimed.lease_token, ex.ctx
        note = ""
        done: bool | None
        match decision:
            case Complete(result_json):
                trigger = "complete"
                try:
                    done = await self.outcomes.put(trigger, (task_id, token, result_json))
                except Exception as exc:
                    error = storable(f"result cannot be stored: {describe(exc)}")
                    return await self._record(ex, Bury(error, permanent=True))
            case Fail(retry_in, error):
                trigger, note = "fail", f", retry in {retry_in:.0f}s"
                done = await self.outcomes.put(trigger, (task_id, token, retry_in, error))
                if done:
                    self._wake_in(retry_in)
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
                    self._wake_in(seconds)
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

    def _wake_in(self, seconds: float) -> None:
        """A task this worker failed comes due again then: look for it."""
        asyncio.get_running_loop().call_later(max(seconds, 0.0), self._wake.set)

    # --- stopping ----------------------------------------------------------------------------

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
            for ex in list(self.running.values()):
                self._stop_handler(ex, RELEASE)
            await asyncio.wait(list(self.running), timeout=15)
