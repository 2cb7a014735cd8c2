"""What a finished handler's task becomes, and how it is written: the completer.

`decide` turns how a handler ended into the transition to record (the policy, no I/O).
`Outcomes` writes the completes, fails and buries of many tasks, one statement per kind
for everything that finished while the previous write was in flight, each guarded by its
own lease token. The worker (engine/worker.py) calls into this module; nothing here calls
back into the worker.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from tasklease.engine.registry import Handler, PermanentError, Snooze, TaskContext
from tasklease.engine.retry import Retry, describe
from tasklease.engine.store import TRANSIENT_ERRORS, Store

log = logging.getLogger("tasklease.worker")
MAX_BATCH = 1000


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
            # completions of tasks with dependants, which this statement settles (workflows)
            "settle": lambda items: store.complete_many(items, settle=True),
            "fail": store.fail_many,
            "bury": store.bury_many,
        }
        self.queued: dict[str, list[tuple[tuple[Any, ...], asyncio.Future[bool | None]]]] = {
            kind: [] for kind in self.writers
        }
        self.ready = asyncio.Event()

    async def put(self, kind: str, item: tuple[Any, ...]) -> bool | None:
        """True: recorded. False: refused, the lease was lost. None: gave up (stopping with
        the database unreachable), so the lease will run out."""
        future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self.queued[kind].append((item, future))
        self.ready.set()
        return await future

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
        retry = Retry(f"record {len(batch)} outcome(s)", self.give_up, log, most=1.0)
        while True:
            try:
                moved = await self.writers[kind]([item for item, _ in batch])
                break
            except TRANSIENT_ERRORS as exc:
                if not await retry.after(exc):
                    log.error(
                        "could not record %d outcome(s) (%s); their leases will run out",
                        len(batch),
                        describe(exc),
                    )
                    for _, future in batch:
                        future.set_result(None)
                    return
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
            if not done and retry.failures:
                outcome = await self.store.lease_outcome(item[0], item[1])
                done = outcome is not None and outcome["ours"] and outcome["state"] != "RUNNING"
            future.set_result(done)
