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

Each claim also obeys the claim rules (engine.store.ClaimRules): aging, the queue's global
limit (`--queue-limit`) and the actions' global and rate limits (`@handler(global_limit=,
rate_limit=)`); a worker with limited actions claims them in a statement of their own, and
a claim statement that found nothing rests up to QUIET_SECONDS unless a NOTIFY wakes it.
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

import asyncpg
import msgspec

from tasklease.engine.fencing import Fence
from tasklease.engine.leases import FENCE_AT, Blocker, Lease, LeaseKeeper
from tasklease.engine.registry import (
    DEFAULT_LEASE_SECONDS,
    Handler,
    PermanentError,
    Snooze,
    TaskContext,
)
from tasklease.engine.reporting import REPORT_EVERY, Counters, Reporter, process_id
from tasklease.engine.retention import Retention, RetentionConfig
from tasklease.engine.schedules import SCHEDULES, Scheduler
from tasklease.engine.states import BY_TRIGGER
from tasklease.engine.store import TRANSIENT_ERRORS, ActionLimit, Claimed, ClaimRules, Store

log = logging.getLogger("tasklease.worker")
CHANNEL = "tasklease"
MAX_BATCH = 1000
DEFAULT_AGING_SECONDS = 300.0
# A claim statement that found nothing is not run again for this long (or until its next
# known due time, or a NOTIFY) while the worker's other statements keep claiming.
QUIET_SECONDS = 1.0
# For this long after a claim statement found a global limit reached, it is not run while
# this worker's outcomes are being written: tasks count against a limit until their outcome
# is written, so a claim made before they land gets less than it could (and takes turns).
NEAR_LIMIT_SECONDS = 1.0


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
class Snoozed:
    seconds: float
    reason: str | None


class HandlerExited(Exception):
    """The handler raised SystemExit: a failed attempt, not the worker's end."""


class TaskTimeout(Exception):
    """The attempt ran longer than its timeout and was stopped."""


@dataclass(frozen=True)
class CancelRunning:
    pass


@dataclass(frozen=True)
class Drop:
    reason: str


@dataclass(frozen=True)
class Committed:
    """The handler's ctx.transaction() completed the task: nothing left to write."""


Decision = Complete | Fail | Bury | Release | Snoozed | CancelRunning | Drop | Committed
# Why a running handler was stopped: the worker is stopping, the lease was lost, or an
# operator asked for the task to be cancelled.
RELEASE, LEASE_LOST, CANCEL = "release", "lease lost", "cancel"


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def storable(text: str) -> str:
    """Text PostgreSQL takes: lone surrogates and NULs written out as escapes."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")


def decide(
    handler: Handler,
    ctx: TaskContext,
    *,
    result: Any = None,
    error: BaseException | None = None,
    stopped: str | None = None,
) -> Decision:
    """The policy: from how the handler ended to the transition to record."""
    if ctx.completed:
        return Committed()
    if ctx.lease_lost and stopped is None:
        return Drop("the lease was lost before the handler's transaction could commit")
    if stopped == RELEASE:
        return Release()
    if stopped == CANCEL:
        return CancelRunning()
    if stopped == LEASE_LOST:
        return Drop("the lease was lost while the handler ran")
    if error is None:
        try:
            return Complete(msgspec.json.encode(result).decode())
        except Exception as err:  # not JSON, a lone surrogate, nested past the encoder's limit
            return Bury(storable(f"result cannot be encoded as JSON: {describe(err)}"), True)
    if isinstance(error, Snooze):
        return Snoozed(error.seconds, error.reason)
    if isinstance(error, PermanentError):
        return Bury(storable(describe(error)), permanent=True)
    # last_error: the one-line description, then the traceback (history rows keep the first line)
    trace = ""
    if error.__traceback__ is not None:
        trace = "\n\n" + "".join(traceback.format_exception(error)).rstrip()
    if ctx.is_last_attempt:
        return Bury(
            storable(f"{describe(error)} (attempt {ctx.attempt} of {ctx.max_attempts}){trace}"),
            permanent=False,
        )
    return Fail(handler.retry_delay(ctx.attempt), storable(describe(error) + trace))


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


class Outcomes:
    """Writes finished tasks' outcomes, many per statement.

    `put` queues one outcome and waits for its write. A writer loop takes whatever has
    queued of each kind and writes it with one statement (so one commit), while new
    outcomes queue for the next: under load the batches grow, when idle an outcome is
    written at once. A write that fails on the connection is retried; if a retried write
    finds the row already moved, `task_lease_outcome` tells whether the first attempt had
    committed before its reply was lost.
    """

    def __init__(
        self, store: Store, give_up: asyncio.Event, written: Callable[[], None] = lambda: None
    ) -> None:
        self.store = store
        self.give_up = give_up
        self.written = written  # called after a write that moved tasks out of RUNNING
        self.writers: dict[str, Callable[[Sequence[Any]], Awaitable[set[int]]]] = {
            "complete": store.complete_many,
            "fail": store.fail_many,
            "bury": store.bury_many,
        }
        self.queued: dict[str, list[tuple[tuple[Any, ...], asyncio.Future[bool | None]]]] = {
            kind: [] for kind in self.writers
        }
        self.ready = asyncio.Event()
        # outcomes put and not yet written (or given up): `settled` is set when there are none
        self.unsettled = 0
        self.settled = asyncio.Event()
        self.settled.set()

    async def put(self, kind: str, item: tuple[Any, ...]) -> bool | None:
        """True: recorded. False: refused, the lease was lost. None: gave up (stopping with
        the database unreachable), so the lease will run out."""
        future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self.queued[kind].append((item, future))
        self.ready.set()
        self.unsettled += 1
        self.settled.clear()
        try:
            return await future
        finally:
            self.unsettled -= 1
            if not self.unsettled:
                self.settled.set()

    async def run(self) -> None:
        while True:
            await self.ready.wait()
            self.ready.clear()
            for kind, queue in self.queued.items():
                while queue:
                    batch = queue[:MAX_BATCH]
                    del queue[:MAX_BATCH]
                    await self._write(kind, batch)

    async def _write(
        self, kind: str, batch: list[tuple[tuple[Any, ...], asyncio.Future[bool | None]]]
    ) -> None:
        retried = False
        while True:
            try:
                moved = await self.writers[kind]([item for item, _ in batch])
                break
            except TRANSIENT_ERRORS as exc:
                if self.give_up.is_set():
                    log.error(
                        "could not record %d outcome(s) (%s); their leases will run out",
                        len(batch),
                        describe(exc),
                    )
                    for _, future in batch:
                        future.set_result(None)
                    return
                retried = True
                log.warning(
                    "cannot record %d outcome(s) yet (%s); retrying", len(batch), describe(exc)
                )
                await Worker.wait_for(self.give_up, timeout=1.0)
            except Exception as exc:
                # Not the connection: some item cannot be stored (a result PostgreSQL refuses,
                # a value the driver cannot encode). Write the others alone; the culprit's own
                # write fails with this error.
                if len(batch) == 1:
                    batch[0][1].set_exception(exc)
                    return
                for one in batch:
                    await self._write(kind, [one])
                return
        if moved:
            self.written()
        for item, future in batch:
            done = item[0] in moved
            if not done and retried:
                outcome = await self.store.lease_outcome(item[0], item[1])
                done = outcome is not None and outcome["ours"] and outcome["state"] != "RUNNING"
            future.set_result(done)


class Worker:
    def __init__(self, store: Store, handlers: dict[str, Handler], config: WorkerConfig) -> None:
        self.store = store
        self.handlers = handlers
        self.config = config
        self.leases = {a: h.lease(config.lease_seconds) for a, h in handlers.items()}
        limits = {
            a: ActionLimit(h.global_limit, *(h.rate_limit or (None, None)))
            for a, h in handlers.items()
            if h.global_limit is not None or h.rate_limit is not None
        }
        self.claims = {q: self._claims(q, limits) for q in config.queues}
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
        # (queue, statement) -> monotonic time before which that claim is not run again
        self._quiet: dict[tuple[str, int], float] = {}
        # claims a global limit held back: tried again as soon as outcomes free some room
        self._held: set[tuple[str, int]] = set()
        # (queue, statement) -> monotonic time its claim last found a global limit reached
        # (see NEAR_LIMIT_SECONDS)
        self._limit_reached: dict[tuple[str, int], float] = {}
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
        log.info(
            "worker %s started: queues=%s concurrency=%d actions=%s",
            self.config.worker_id,
            ",".join(self.config.queues),
            self.config.concurrency,
            ",".join(sorted(self.handlers)),
        )
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

    @staticmethod
    async def wait_for(*events: asyncio.Event, timeout: float | None) -> None:
        """Until one of the events is set, or the timeout passes."""
        waiters = {asyncio.ensure_future(e.wait()) for e in events}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    # --- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        errors = 0
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
                errors += 1
                delay = min(0.25 * 2**errors, 10.0)
                log.warning("cannot claim (%s); retrying in %.1fs", describe(exc), delay)
                await self.wait_for(self._stopping, timeout=delay)
                continue
            if errors:
                log.info("database reachable again")
                errors = 0
            if not busy:
                # Nothing more is due: sleep until the next task comes due or lease runs out,
                # a NOTIFY of new work, or the safety-net poll, whichever is first.
                await self.wait_for(self._wake, self._stopping, timeout=wait)

    def _claims(
        self, queue: str, limits: dict[str, ActionLimit]
    ) -> list[tuple[dict[str, float], ClaimRules]]:
        """The claims of one round in `queue`: (actions with their leases, rules) each.

        Only claimers of a limited key take its (shards') locks, so the actions with a
        global or rate limit are claimed apart from the others, first (else a backlog of the
        others would fill every slot before them); the others are claimed without any lock.
        A queue with a limit of its own is claimed in one statement under that limit."""
        aging = self.config.aging_seconds
        queue_limit = self.config.queue_limits.get(queue)
        if queue_limit is not None:
            return [(self.leases, ClaimRules(aging, queue_limit, limits))]
        limited = {a: s for a, s in self.leases.items() if a in limits}
        free = {a: s for a, s in self.leases.items() if a not in limits}
        claims = [(limited, ClaimRules(aging, None, limits))] if limited else []
        return claims + ([(free, ClaimRules(aging))] if free else [])

    async def _claim_round(self, queues: Sequence[str]) -> tuple[bool, float]:
        """Claim from each queue while slots are free. Returns (some queue had more due work
        than we could take, seconds until the next known due time or lease expiry)."""
        busy, wait = False, self.config.poll_interval
        for queue, i, (leases, rules) in (
            (q, i, claim) for q in queues for i, claim in enumerate(self.claims[q])
        ):
            free = self.config.concurrency - self.handling
            if free <= 0:
                return True, 0.0
            # A statement that found nothing lately (say, that of the limited actions while
            # the others have a backlog) rests a moment instead of running every round.
            now = time.monotonic()
            quiet_until = self._quiet.get((queue, i), 0.0)
            if quiet_until > now:
                wait = min(wait, quiet_until - now)
                continue
            # Near a global limit, this worker's outcomes in flight still count against it:
            # let them land first (NEAR_LIMIT_SECONDS).
            if (
                self.outcomes.unsettled
                and now - self._limit_reached.get((queue, i), -NEAR_LIMIT_SECONDS)
                < NEAR_LIMIT_SECONDS
            ):
                await self.wait_for(self.outcomes.settled, self._stopping, timeout=QUIET_SECONDS)
                free = self.config.concurrency - self.handling
            sent = time.monotonic()  # the leases taken hold at least until sent + lease
            claim = await self.store.claim(queue, leases, free, self.config.worker_id, rules)
            if claim.held_back:
                self._held.add((queue, i))
                self._limit_reached[(queue, i)] = time.monotonic()
            if claim.leased or claim.expired:
                self._quiet.pop((queue, i), None)
            else:
                rest = QUIET_SECONDS if claim.wait_seconds is None else claim.wait_seconds
                self._quiet[(queue, i)] = now + min(QUIET_SECONDS, max(rest, 0.0))
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
        """LISTEN for submissions on a connection of its own; reconnect when it drops."""
        delay = 0.5
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.store.dsn)
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
            for key in [k for k in self._quiet if k[0] == queue]:
                del self._quiet[key]
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
        while True:
            try:
                return await write()
            except TRANSIENT_ERRORS as exc:
                if self._force.is_set():
                    log.error(
                        "could not record an outcome (%s); its lease will run out", describe(exc)
                    )
                    return None
                log.warning("cannot record an outcome yet (%s); retrying", describe(exc))
                await self.wait_for(self._force, timeout=1.0)

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
