"""The worker's leases, kept from a thread of their own: renewals that a handler blocking the
event loop cannot stop, and self-fencing, so that no task runs twice at once while the
workers running it are alive.

The worker's event loop runs the handlers. An async handler that blocks it (`time.sleep`, a
long computation, a sync driver) would also stop heartbeats run on that loop: the leases
would run out while their handlers still ran, and other workers would run the same tasks at
the same time. So the LeaseKeeper renews every lease the worker holds from a thread with its
own event loop and its own connection:

- Renewal: one statement every third of the shortest lease held (a task's own
  `lease_seconds`, else its action's). Its answers (a lease lost, a cancel requested) are
  handed to the worker's loop.
- A blocked loop: the worker's loop ticks every LOOP_TICK seconds. When it has not for
  STALL_SECONDS, the keeper logs which handler blocks it (action, task, file:line, read from
  the loop thread's stack) and the worker counts it (metric
  `tasklease_event_loop_blocked_total`). The keeper goes on renewing: the blocked handler is
  still running, so its task must not go to another worker.
- Self-fencing: a lease lasts at least until the moment the statement that set it was sent,
  plus its lease seconds (the database's `now()` in that statement is later than the send).
  When a lease cannot be renewed (the database unreachable, a network partition), its handler
  is stopped at FENCE_AT of that time; if it is still running at KILL_AT (a thread cannot be
  interrupted, an async handler ignored its cancellation, or the loop is blocked), the whole
  worker process ends with EXIT_FENCED, before any other worker can take the task over by
  the database's clock. A lease found lost is fenced at once, and the process ends if its
  handler still runs an eighth of a lease later.

The clock assumption: only rates matter, not offsets. This machine's monotonic clock and
the database's clock must agree on how long a lease lasts to within an eighth of it (12.5 %;
real clocks drift by parts per million). A process that is paused (SIGSTOP, a frozen VM)
cannot fence itself; what it writes afterwards is still refused under the lease token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import asyncpg

from tasklease.engine import database
from tasklease.engine.queries import SQL
from tasklease.engine.store import TRANSIENT_ERRORS

log = logging.getLogger("tasklease.leases")

FENCE_AT = 3 / 4  # of a lease after the last renewal sent: stop the handler
KILL_AT = 7 / 8  # ... and if it still runs: end the process
EXIT_FENCED = 75  # the worker's exit status when it ended itself to fence a lease
LOOP_TICK = 0.25
STALL_SECONDS = 1.0


@dataclass(eq=False)
class Lease:
    """One task's lease as this worker holds it. `answer` and `fence` run on the worker's
    loop: answer(held, cancel_requested) after each renewal, fence() to stop the handler."""

    task_id: int
    token: uuid.UUID
    seconds: float
    action: str
    valid_until: float  # time.monotonic() by which the lease surely still holds
    answer: Callable[[bool, bool], None]
    fence: Callable[[], None]
    executing: bool = True  # the handler (or its thread) still runs
    lost: bool = False
    fenced_at: float | None = None

    def renewed(self, sent: float) -> None:
        self.valid_until = max(self.valid_until, sent + self.seconds)


@dataclass(frozen=True)
class Blocker:
    """What the worker's loop thread was running when it was found blocked."""

    action: str | None
    task_id: int | None
    where: str

    def __str__(self) -> str:
        if self.action is None:
            return f"no handler on its stack (at {self.where})"
        return f"handler {self.action!r} (task {self.task_id}) at {self.where}"


class LeaseKeeper:
    def __init__(
        self,
        dsn: str,
        *,
        default_seconds: float,
        handler_codes: Mapping[types.CodeType, str],
        on_stall: Callable[[Blocker, float], None] = lambda blocker, seconds: None,
        exit_to_fence: bool = True,
    ) -> None:
        self.dsn = dsn
        self.default_seconds = default_seconds
        self.handler_codes = handler_codes  # a handler's code -> its action
        self.on_stall = on_stall  # called on the worker's loop once a stall is over
        # end the process when a handler cannot be stopped (False: a worker inside a process
        # that is not its own, as the tests run them, only says so)
        self.exit_to_fence = exit_to_fence
        # Written by the worker's loop (hold, forget), read by the keeper as a copy. No lock:
        # a dict's set, pop and copy() are atomic, and a lock taken on both sides cost the
        # worker a GIL hand-over (up to the 5 ms switch interval) whenever they met.
        self._leases: dict[uuid.UUID, Lease] = {}
        self._worker_loop: asyncio.AbstractEventLoop | None = None
        self._worker_thread = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._conn: asyncpg.Connection | None = None
        self._loop_seen = time.monotonic()
        self._stall: tuple[float, Blocker] | None = None
        self._stopping = False
        self._every = default_seconds / 3  # the renewal interval planned

    # --- the worker's side (its event loop) --------------------------------------------------

    def start(self) -> None:
        self._worker_loop = asyncio.get_running_loop()
        self._worker_thread = threading.get_ident()
        self._loop_seen = time.monotonic()
        self._worker_loop.call_soon(self._tick)
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(ready)), name="tasklease-leases", daemon=True
        )
        self._thread.start()
        ready.wait(5)

    async def stop(self) -> None:
        self._stopping = True
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    def hold(self, lease: Lease) -> None:
        """Renew this lease from now on (the task was just claimed)."""
        self._leases[lease.token] = lease
        if lease.seconds / 3 < self._every and self._loop is not None and self._wake is not None:
            self._every = lease.seconds / 3  # renew sooner than planned: wake the keeper
            self._loop.call_soon_threadsafe(self._wake.set)

    def done_executing(self, token: uuid.UUID) -> None:
        """The handler has returned (its thread too): nothing left to fence."""
        lease = self._leases.get(token)
        if lease is not None:
            lease.executing = False

    def forget(self, token: uuid.UUID) -> None:
        """The outcome is written (or the task was completed in the handler's transaction)."""
        lease = self._leases.pop(token, None)
        if lease is not None:
            lease.executing = False

    def renewed(self, token: uuid.UUID, sent: float) -> None:
        """A renewal made elsewhere (ctx.heartbeat()) that was sent at `sent`."""
        lease = self._leases.get(token)
        if lease is not None:
            lease.renewed(sent)

    def _tick(self) -> None:
        self._loop_seen = time.monotonic()
        if not self._stopping and self._worker_loop is not None:
            self._worker_loop.call_later(LOOP_TICK, self._tick)

    def _to_worker(self, fn: Callable[..., None], *args: object) -> None:
        if self._worker_loop is not None and not self._worker_loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._worker_loop.call_soon_threadsafe(fn, *args)

    # --- the keeper's thread -----------------------------------------------------------------

    def _held(self) -> list[Lease]:
        """The leases to renew, one per task (the newest, should a task have been claimed
        again after this worker lost it)."""
        leases = self._leases.copy().values()
        return list({lease.task_id: lease for lease in leases if not lease.lost}.values())

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        ready.set()
        watch = asyncio.create_task(self._watch())
        try:
            await self._renew_loop()
        finally:
            watch.cancel()
            if self._conn is not None:
                self._conn.terminate()

    async def _renew_loop(self) -> None:
        assert self._wake is not None
        last, failures = 0.0, 0
        while not self._stopping:
            held = self._held()
            every = min((lease.seconds for lease in held), default=self.default_seconds) / 3
            self._every = every
            if failures:
                every = min(every, 0.25 * failures)
            remaining = last + every - time.monotonic()
            if remaining > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
                continue
            last = time.monotonic()
            if not held:
                continue
            sent = time.monotonic()
            try:
                alive = await asyncio.wait_for(
                    self._renew(held), timeout=max(min(every, 10.0), 1.0)
                )
            except Exception as exc:
                # A connection that does not answer may be cut without a word (a partition):
                # drop it and renew on a new one.
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                failures += 1
                if not isinstance(exc, (*TRANSIENT_ERRORS, TimeoutError)):
                    log.exception("renewing %d lease(s) failed; retrying", len(held))
                else:
                    (log.warning if failures == 1 else log.debug)(
                        "cannot renew %d lease(s) (%s); retrying",
                        len(held),
                        f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                    )
                continue
            if failures:
                log.info("leases renewed again")
                failures = 0
            for lease in held:
                if lease.token not in self._leases:
                    continue
                if lease.task_id in alive:
                    lease.renewed(sent)
                    self._to_worker(lease.answer, True, alive[lease.task_id])
                else:
                    lease.lost = True
                    self._to_worker(lease.answer, False, False)

    async def _renew(self, held: list[Lease]) -> dict[int, bool]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await database.connect(self.dsn)
        rows = await self._conn.fetch(
            SQL["task_heartbeat_many_if_leased"],
            [lease.task_id for lease in held],
            [lease.token for lease in held],
            [lease.seconds for lease in held],
        )
        return {r["id"]: r["cancel_requested"] for r in rows}

    async def _watch(self) -> None:
        """Fence what cannot be renewed; say when the worker's loop is blocked."""
        last = time.monotonic()
        while True:
            now = time.monotonic()
            # This thread did not run either for a while: the process was paused (SIGSTOP)
            # or starved, not the loop blocked; give the loop a tick to run first.
            if now - last < STALL_SECONDS:
                self._check_loop(now)
            last = now
            shortest = self.default_seconds
            for lease in self._leases.copy().values():
                shortest = min(shortest, lease.seconds)
                if lease.executing:
                    self._fence(lease, now)
            await asyncio.sleep(min(max(shortest / 16, 0.02), 0.25))

    def _fence(self, lease: Lease, now: float) -> None:
        if lease.fenced_at is None and (
            lease.lost or now >= lease.valid_until - lease.seconds * (1 - FENCE_AT)
        ):
            lease.fenced_at = now
            if lease.lost:
                log.warning(
                    "task %d (%s): lease lost; stopping its handler", lease.task_id, lease.action
                )
            else:
                log.warning(
                    "task %d (%s): lease not renewed for %.1fs of %gs; stopping its handler "
                    "before the lease can run out (self-fencing)",
                    lease.task_id,
                    lease.action,
                    now - (lease.valid_until - lease.seconds),
                    lease.seconds,
                )
            self._to_worker(lease.fence)
        if lease.fenced_at is not None:
            kill_at = max(
                lease.valid_until - lease.seconds * (1 - KILL_AT),
                lease.fenced_at + lease.seconds * (KILL_AT - FENCE_AT),
            )
            if now >= kill_at and lease.executing and not self._stopping:
                log.critical(
                    "task %d (%s): its handler still runs %.1fs after it was told to stop, and "
                    "its lease %s: %s",
                    lease.task_id,
                    lease.action,
                    now - lease.fenced_at,
                    "is lost" if lease.lost else "could not be renewed",
                    f"ending this worker process (status {EXIT_FENCED}) so that the task "
                    "cannot run twice at once"
                    if self.exit_to_fence
                    else "it may run twice at once (this worker may not end its process)",
                )
                if self.exit_to_fence:
                    logging.shutdown()
                    os._exit(EXIT_FENCED)
                lease.executing = False  # said once

    def _check_loop(self, now: float) -> None:
        seen = self._loop_seen
        if self._stall is None:
            if now - seen >= STALL_SECONDS and not self._stopping:
                blocker = self.blocker()
                self._stall = (seen, blocker)
                log.error(
                    "the worker's event loop has not run for %.1fs: %s blocks it. An async "
                    "handler must not block (use a def handler, or asyncio.to_thread); its "
                    "leases are kept meanwhile, and every task of this worker waits",
                    now - seen,
                    blocker,
                )
        elif seen > self._stall[0]:
            began, blocker = self._stall
            self._stall = None
            log.warning(
                "the worker's event loop runs again after %.1fs (%s)", seen - began, blocker
            )
            self._to_worker(self.on_stall, blocker, seen - began)

    def blocker(self) -> Blocker:
        """The handler on the worker loop thread's stack, innermost first."""
        frame = sys._current_frames().get(self._worker_thread)
        if frame is None:
            return Blocker(None, None, "unknown")
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        while frame is not None:
            action = self.handler_codes.get(frame.f_code)
            if action is not None:
                args = frame.f_code.co_varnames[: frame.f_code.co_argcount]
                ctx = frame.f_locals.get(args[0]) if args else None
                return Blocker(action, getattr(ctx, "task_id", None), where)
            frame = frame.f_back
        return Blocker(None, None, where)
