"""Periodic tasks: schedules declared in code, and the scheduler every worker runs.

A schedule names an action, a payload and its times: a cron expression (croniter, in a
time zone) or an interval in seconds (slots at whole multiples of it since the Unix epoch).
Every worker runs a `Scheduler` for the schedules its modules declare. When a slot comes,
each of them submits the slot's task with the idempotency key `schedule:<name>:<slot>`:
the unique index lets exactly one of those submissions create it, however many workers
(or API processes) try. Then `last_slot_at` is advanced under a guard on its old value.

Times missed while no worker ran follow the schedule's `missed` policy: "once" runs the
latest missed slot once (and skips the older ones), "skip" runs nothing that is more than
MISFIRE_GRACE seconds late. The database clock decides what is due, as for leases.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import croniter

from tasklease.engine.store import TRANSIENT_ERRORS, KeyTaken, NewTask, Store

log = logging.getLogger("tasklease.schedules")
MISSED_POLICIES = ("once", "skip")
MISFIRE_GRACE = 60.0  # seconds a slot may be late and still count as on time
LOOK_AGAIN = 30.0  # the longest a scheduler sleeps, so a changed schedule is seen soon


class ScheduleError(ValueError):
    """A schedule declaration is wrong."""


@dataclass(frozen=True)
class Schedule:
    name: str
    action: str
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    missed: str = "once"
    payload: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0

    def latest_slot(self, at: datetime) -> datetime:
        """The latest slot at or before `at`."""
        if self.every is not None:
            return datetime.fromtimestamp(
                math.floor(at.timestamp() / self.every) * self.every, tz=UTC
            )
        assert self.cron is not None
        local = at.astimezone(ZoneInfo(self.timezone)) + timedelta(microseconds=1)
        prev: datetime = croniter(self.cron, local).get_prev(datetime)
        return prev.astimezone(UTC)

    def next_slot(self, after: datetime) -> datetime:
        """The first slot strictly after `after`."""
        if self.every is not None:
            return datetime.fromtimestamp(
                (math.floor(after.timestamp() / self.every) + 1) * self.every, tz=UTC
            )
        assert self.cron is not None
        nxt: datetime = croniter(self.cron, after.astimezone(ZoneInfo(self.timezone))).get_next(
            datetime
        )
        return nxt.astimezone(UTC)

    def key(self, slot: datetime) -> str:
        return f"schedule:{self.name}:{slot.astimezone(UTC).isoformat()}"


SCHEDULES: dict[str, Schedule] = {}


def schedule(
    name: str,
    action: str,
    *,
    cron: str | None = None,
    every: float | None = None,
    timezone: str = "UTC",
    missed: str = "once",
    payload: dict[str, Any] | None = None,
    queue: str = "default",
    priority: int = 0,
) -> Schedule:
    """Declare a periodic task: `action` with `payload`, at the times of `cron` (five
    fields, or six with seconds last) in `timezone`, or every `every` seconds."""
    if (cron is None) == (every is None):
        raise ScheduleError(f"schedule {name!r}: give either cron or every")
    if cron is not None and not croniter.is_valid(cron):
        raise ScheduleError(f"schedule {name!r}: {cron!r} is not a valid cron expression")
    if every is not None and not every > 0:
        raise ScheduleError(f"schedule {name!r}: every must be a positive number of seconds")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"schedule {name!r}: unknown time zone {timezone!r}") from None
    if missed not in MISSED_POLICIES:
        raise ScheduleError(f"schedule {name!r}: missed must be 'once' or 'skip', not {missed!r}")
    declared = Schedule(
        name, action, cron, every, timezone, missed, dict(payload or {}), queue, priority
    )
    if name in SCHEDULES and SCHEDULES[name] != declared:
        raise ScheduleError(f"schedule {name!r} is declared twice, differently")
    SCHEDULES[name] = declared
    return declared


@dataclass(frozen=True)
class Decision:
    slot: datetime
    run: bool  # False: the slot is skipped (missed, policy "skip")


def decide(s: Schedule, now: datetime) -> Decision:
    """What to do about the latest slot that has come (the older missed ones are skipped
    under either policy)."""
    slot = s.latest_slot(now)
    late = (now - slot).total_seconds()
    return Decision(slot, s.missed == "once" or late <= MISFIRE_GRACE)


class Scheduler:
    """Creates each due slot's task; runs in every worker, for the schedules it declares."""

    def __init__(self, store: Store, schedules: dict[str, Schedule]) -> None:
        self.store = store
        self.schedules = schedules

    async def declare(self) -> None:
        now = await self.store.db_now()
        for s in self.schedules.values():
            await self.store.declare_schedule(s, s.next_slot(now))
        if self.schedules:
            log.info("schedules: %s", ", ".join(sorted(self.schedules)))

    async def tick(self) -> float:
        """Create the tasks of the slots that have come; seconds until the next one."""
        rows = await self.store.schedules_state(list(self.schedules))
        wait = LOOK_AGAIN
        for row in rows:
            s, now = self.schedules[row["name"]], row["now"]
            if row["next_run_at"] > now:
                wait = min(wait, (row["next_run_at"] - now).total_seconds())
                continue
            d = decide(s, now)
            task_id = None
            if d.run:
                task_id = await self.submit(s, d.slot)
            advanced = await self.store.advance_schedule(
                s.name, row["last_slot_at"], d.slot, s.next_slot(d.slot), task_id
            )
            if advanced and d.run:
                log.info("schedule %s: task %d for %s", s.name, task_id, d.slot.isoformat())
            elif advanced:
                log.info(
                    "schedule %s: %s was missed and skipped (policy skip)",
                    s.name,
                    d.slot.isoformat(),
                )
            wait = 0.0  # look again at once: the next slot may have come too
        return wait

    async def submit(self, s: Schedule, slot: datetime) -> int | None:
        """The slot's task, made now or by another scheduler before (its key says which slot).
        A task of other content holds the key when schedulers disagree on the schedule (a
        deploy under way changed its payload, say): that task stands for the slot."""
        new = NewTask(
            s.action,
            msgspec.json.encode(s.payload).decode(),
            queue=s.queue,
            priority=s.priority,
            due_at=slot,
            idempotency_key=s.key(slot),
        )
        try:
            return int((await self.store.submit_many([new]))[0].task["id"])
        except KeyTaken as taken:
            conflict = taken.conflicts[0]
            # submissions may not take schedule keys (engine.tasks): another action there
            # means a row written around them
            (log.error if "action" in conflict.fields else log.warning)(
                "schedule %s: its key for %s is held by task %s with a different %s",
                s.name,
                slot.isoformat(),
                conflict.task_id,
                ", ".join(conflict.fields),
            )
            return conflict.task_id

    async def run(self) -> None:
        if not self.schedules:
            return
        while True:
            try:
                await self.declare()
                break
            except TRANSIENT_ERRORS as exc:
                log.warning("cannot declare schedules yet (%s)", exc)
                await asyncio.sleep(2)
        while True:
            try:
                wait = await self.tick()
            except TRANSIENT_ERRORS as exc:
                log.warning("scheduler: database unavailable (%s); retrying", exc)
                wait = 2.0
            await asyncio.sleep(max(wait, 0.01))
