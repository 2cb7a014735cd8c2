"""The worker: claims due tasks, runs their handlers, records each outcome under its lease.

Three parts, calls going one way: the claim loop here (with LISTEN and the services), the
executor (executor.py) that runs each leased task as an asyncio task, and the batched
outcome writer (outcomes.py). One claim loop per process leases up to its free slots in one
statement. Every statement on the hot path serves many tasks at once:

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
modules declare (engine.scheduler) and the retention loop (engine.retention), whose rounds
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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tasklease.engine import database
from tasklease.engine.executor import Executor
from tasklease.engine.fencing import Fence
from tasklease.engine.leases import LeaseKeeper
from tasklease.engine.outcomes import Outcomes
from tasklease.engine.registry import DEFAULT_LEASE_SECONDS, Handler
from tasklease.engine.reporting import REPORT_EVERY, Counters, Reporter, process_id
from tasklease.engine.retention import Retention, RetentionConfig
from tasklease.engine.retry import Retry, describe, keep_running, wait_for
from tasklease.engine.scheduler import Scheduler
from tasklease.engine.schedules import SCHEDULES
from tasklease.engine.store import TRANSIENT_ERRORS, Limit, Store

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


class Worker:
    def __init__(self, store: Store, handlers: dict[str, Handler], config: WorkerConfig) -> None:
        self.store = store
        self.handlers = handlers
        self.config = config
        self.leases = {a: h.lease(config.lease_seconds) for a, h in handlers.items()}
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._wake = asyncio.Event()
        # queue -> monotonic time before which it is not claimed from again
        self._quiet: dict[str, float] = {}
        # queues whose claim a global limit held back: tried again as soon as this worker's
        # outcomes free some room
        self._held: set[str] = set()
        self.counters = Counters()
        self.stats = self.counters.transitions
        self.scheduler = Scheduler(
            store, {n: s for n, s in SCHEDULES.items() if s.action in handlers}, self._stopping
        )
        self.keeper = LeaseKeeper(
            store.dsn,
            default_seconds=min(self.leases.values(), default=DEFAULT_LEASE_SECONDS),
            handler_codes={
                h.fn.__code__: a for a, h in handlers.items() if hasattr(h.fn, "__code__")
            },
            on_stall=lambda blocker, seconds: self.counters.block(blocker.action or "", seconds),
            exit_to_fence=config.exit_to_fence,
        )
        self.outcomes = Outcomes(store, self._force, self._outcomes_written)
        self.fence = Fence(store, max_size=config.concurrency)
        self.executor = Executor(
            store,
            handlers,
            concurrency=config.concurrency,
            worker_id=config.worker_id,
            keeper=self.keeper,
            outcomes=self.outcomes,
            fence=self.fence,
            counters=self.counters,
            force=self._force,
            slot_freed=self._slot_freed.set,
            due_in=self._wake_in,
        )
        self.reporter = Reporter(
            store,
            self.counters,
            kind="worker",
            process=config.worker_id,
            queues=config.queues,
            concurrency=config.concurrency,
            running=lambda: len(self.executor.running),
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
        services = {
            "the outcome writer": self.outcomes.run,
            "the listener": self._listen,
            "the scheduler": self.scheduler.run,
            "retention": Retention(self.store.dsn, self.config.retention).run,
        }
        helpers = [asyncio.create_task(keep_running(w, run, log)) for w, run in services.items()]
        try:
            await self._claim_loop()
        finally:
            await self.executor.drain(self.config.grace_seconds)
            await self.keeper.stop()
            for helper in helpers:
                helper.cancel()
            self.executor.close()
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
            if self.config.concurrency - self.executor.handling <= 0:
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
            free = self.config.concurrency - self.executor.handling
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
            self.executor.start(claim.leased, sent)
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

    def _wake_in(self, seconds: float) -> None:
        """A task this worker failed or snoozed comes due again then: look for it."""
        asyncio.get_running_loop().call_later(max(seconds, 0.0), self._wake.set)
